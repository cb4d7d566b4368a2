"""Strategies that make the deployed network better: searched, transferred and uniform (Table 6).

On the embedded tasks whose answer is known (motion only, appearance only, motion at
fine scale only), for each template seed: the tiny DenseNet template is trained and
analysed (``--mode=train``, ``--mode=analyze``), then ``--mode=generalize`` trains
``resnet_tiny`` and ``mobilenetv2_tiny`` stand-alone (``--generalize_seeds`` training
seeds per cell, the task's own recipe and budget) with each way to choose:

  searched     the Opt of a v-DropPath template of that backbone (trained and analysed by
               generalize under <run>/searched/<backbone>, the task's recipe and seed)
  opt          transferred from the DenseNet template: per branch, over its positions at
               the same spatial scale (fusion_rules.from_marginals_by_branch)
  opt_depth    the earlier transfer rule: most probable unit at the same relative depth
  paper        the paper's hand rule for the task's dataset family
  S, ST, S+ST  uniform

and, for motion, the fidelity of the resnet_tiny search (Kendall tau between inherited
and stand-alone accuracy over 12 strategies drawn uniformly from its space).  Every
accuracy is video top-1 on the test split, 8 frames x 1 clip x 1 centre crop of 32^2;
every cost is MACs per clip (FLOPs ~ 2x).  Targets (mean over template seeds; sigma: the
std of the compared cell over template seeds):

  motion, each backbone       searched >= best uniform - 1 sigma and >= S + 10;
                              opt (new rule) >= best uniform - 1 sigma
  appearance, each backbone   searched >= S+ST - 1 sigma at <= 0.8 x S+ST's MACs
  fine motion, each backbone  searched keeps T in the lower half of its positions and
                              drops it in the upper half more than S+ST does

Prints a JSON line per finished job and the final JSON report; writes
``<out>/transfer.{json,md,png}`` (and, with ``--docs``, the table into the generated block of
docs/transfer.md, the hand-written text around it kept, and the chart into docs/img/).
Resumable: finished runs and cells are skipped.  Long: ~40 min per task and template
seed on 2 cores (7 h for the default 3 x 3); never part of ``make test``.

    .venv/bin/python benchmarks/transfer.py --out runs/transfer
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
from probability_space import _main  # noqa: E402  (one runner of the entry point)

TASKS = {"motion": "synthetic_motion", "appearance": "synthetic_appearance",
         "fine_motion": "synthetic_fine_motion"}
BACKBONES = ("resnet_tiny", "mobilenetv2_tiny")
SPECS = ("searched", "opt", "opt_depth", "paper", "S", "ST", "S+ST")
UNIFORM = ("S", "ST", "S+ST")
PROTOCOL = "video top-1 on test, 8 frames x 1 clip x 1 centre crop of 32x32"


class Bench:
    def __init__(self, out, seeds, standalone_seeds, tasks, backbones, fidelity_strategies,
                 generalize_epochs=0, weight_term="", specs=SPECS):
        self.out, self.seeds, self.standalone_seeds = out, seeds, standalone_seeds
        self.generalize_epochs, self.weight_term, self.specs = generalize_epochs, weight_term, specs
        self.tasks, self.backbones, self.fidelity_strategies = tasks, backbones, fidelity_strategies
        os.makedirs(os.path.join(out, "logs"), exist_ok=True)

    def data_dir(self, task):
        return os.path.join(self.out, "data", TASKS[task])

    def run_dir(self, task, seed):
        return os.path.join(self.out, "runs", task, f"seed{seed}")

    def common(self, task):
        return [f"--flagfile=configs/{TASKS[task]}.flags", f"--data_dir={self.data_dir(task)}",
                "--progress=0"]

    def _step(self, name, done_path, args):
        if os.path.exists(done_path):
            return
        seconds = _main(args, os.path.join(self.out, "logs", f"{name}.log"))
        print(json.dumps({"job": name, "seconds": round(seconds, 1)}), flush=True)

    def run(self, fidelity: bool):
        for task in self.tasks:
            self._step(f"prepare_{task}", os.path.join(self.data_dir(task), "manifest.json"),
                       [*self.common(task), "--mode=prepare"])
        for seed in range(self.seeds):
            for task in self.tasks:
                run = self.run_dir(task, seed)
                self.check_weight_term(task, run)
                base = [*self.common(task), f"--model_dir={run}", f"--seed={seed}", "--backbones=",
                        *([f"--weight_term={self.weight_term}"] if self.weight_term else [])]
                self._step(f"{task}_{seed}_train", os.path.join(run, "train_summary.json"),
                           [*base, "--mode=train"])
                self._step(f"{task}_{seed}_analyze", os.path.join(run, "analysis", "summary.json"),
                           [*base, "--mode=analyze"])
                self._step(f"{task}_{seed}_generalize", self._table_done(run),
                           [f"--model_dir={run}", "--mode=generalize", "--progress=0",
                            f"--backbones={','.join(self.backbones)}",
                            f"--backbone_strategies={','.join(self.specs)}",
                            f"--generalize_seeds={self.standalone_seeds}",
                            *([f"--generalize_epochs={self.generalize_epochs}"]
                              if self.generalize_epochs else [])])
                if fidelity and task == "motion" and "resnet_tiny" in self.backbones:
                    searched = os.path.join(run, "searched", "resnet_tiny")
                    self._step(f"fidelity_{seed}", os.path.join(
                        searched, "analysis", "fidelity_uniform.json"),
                        [*self.common(task), "--preset=resnet_tiny", f"--model_dir={searched}",
                         f"--seed={seed}", "--mode=fidelity", "--fidelity_pool=uniform",
                         f"--fidelity_strategies={self.fidelity_strategies}",
                         "--recalibrate_batches=16"])

    def check_weight_term(self, task, run):
        """Stop when ``run`` was trained with another weight term than asked for: its
        steps would be skipped and its cells reported under the wrong label."""
        from stfusion_tf import run_record
        got = ((run_record.read(run) or {}).get("flags") or {}).get("weight_term")
        if not got:
            return
        want = self.weight_term or _config_flag(task, "weight_term")
        if want and got != want:
            sys.exit(f"{run} was trained with --weight_term={got}, not {want}: give another --out")

    def _table_done(self, run):
        """generalization.json once it holds every cell (else a marker that never exists)."""
        path = os.path.join(run, "analysis", "generalization.json")
        if not os.path.exists(path):
            return path
        cells = {(c["backbone"], c["spec"]) for c in _read(path)["cells"]}
        want = {(b, s) for b in self.backbones for s in self.specs}
        return path if want <= cells else path + ".incomplete"


def _config_flag(task, name):
    """``--name`` in the task's config file (None when it does not set it)."""
    with open(os.path.join(ROOT, "configs", f"{TASKS[task]}.flags")) as f:
        for line in f:
            if line.strip().startswith(f"--{name}="):
                return line.strip().split("=", 1)[1]
    return None


def _read(path):
    with open(path) as f:
        return json.load(f)


def searched_weight_terms(bench) -> list[str]:
    """The weight terms the backbones' own (searched) templates were trained with, from
    the run records: --searched_weight_term, else --weight_term."""
    from stfusion_tf import run_record
    out = set()
    for task in bench.tasks:
        for seed in range(bench.seeds):
            flags = (run_record.read(bench.run_dir(task, seed)) or {}).get("flags") or {}
            if flags:
                out.add(flags.get("searched_weight_term") or flags.get("weight_term"))
    return sorted(out)


def collect(bench) -> dict:
    """Per task, backbone and spec: the cell of each template seed and their mean / std."""
    out = {}
    for task in bench.tasks:
        for seed in range(bench.seeds):
            bench.check_weight_term(task, bench.run_dir(task, seed))
            path = os.path.join(bench.run_dir(task, seed), "analysis", "generalization.json")
            if not os.path.exists(path):
                continue
            for c in _read(path)["cells"]:
                cell = out.setdefault(task, {}).setdefault(c["backbone"], {}).setdefault(
                    c["spec"], {"seeds": [], "seed_ids": [], "codes": [], "macs": [],
                                "train_std": []})
                cell["seeds"].append(c["video_top1"])
                cell["seed_ids"].append(seed)
                cell["train_std"].append(c.get("video_top1_std") or 0.0)
                cell["codes"].append(c.get("code"))
                cell["macs"].append(c.get("macs"))
    for task in out.values():
        for cells in task.values():
            for c in cells.values():
                v = np.array(c["seeds"], float)
                c["mean"] = float(v.mean())
                # One template seed: the spread over its stand-alone training seeds instead.
                c["std"] = float(v.std(ddof=1)) if len(v) > 1 else float(c["train_std"][0])
                c["std_over"] = "template seeds" if len(v) > 1 else "training seeds"
                macs = [m for m in c["macs"] if m is not None]
                c["mean_macs"] = float(np.mean(macs)) if macs else None
    return out


def _t_profile(codes) -> dict | None:
    """Share of positions keeping T in the lower and upper half of each code."""
    lows, highs = [], []
    for code in codes:
        letters = [c for c in (code or "") if c in "STF-"]
        if not letters:
            continue
        t = np.array([c in "TF" for c in letters], float)
        half = len(t) // 2
        lows.append(t[:half].mean() if half else t.mean())
        highs.append(t[half:].mean())
    if not lows:
        return None
    return {"lower": float(np.mean(lows)), "upper": float(np.mean(highs)),
            "upper_minus_lower": float(np.mean(highs) - np.mean(lows))}


def paired_gap(a: dict, b: dict) -> dict | None:
    """a - b per template seed (both cells from the same template seed's run), with the
    95% t-interval of its mean: whether a miss is larger than the seed-to-seed noise.
    Reported beside a target, never used to decide it."""
    common = sorted(set(a["seed_ids"]) & set(b["seed_ids"]))
    if len(common) < 2:
        return None
    d = np.array([a["seeds"][a["seed_ids"].index(s)] - b["seeds"][b["seed_ids"].index(s)]
                  for s in common], float)
    from scipy import stats
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return {"mean": float(d.mean()), "per_seed": d.tolist(), "n": len(d),
            "ci95": [float(d.mean() - half), float(d.mean() + half)]}


def _gap_text(gap: dict | None, name: str) -> str:
    if not gap:
        return ""
    lo, hi = gap["ci95"]
    return (f"; {name} per template seed {100 * gap['mean']:+.1f} "
            f"(95% CI {100 * lo:+.1f} to {100 * hi:+.1f}, n={gap['n']})")


def targets(cells) -> list[dict]:
    rows = []

    def add(task, backbone, name, held, detail, gap=None):
        rows.append({"task": task, "backbone": backbone, "target": name,
                     "held": None if held is None else bool(held), "detail": detail,
                     **({"paired_gap": gap} if gap else {})})

    for backbone in BACKBONES:
        m = cells.get("motion", {}).get(backbone, {})
        if all(k in m for k in UNIFORM):
            best = max(UNIFORM, key=lambda u: m[u]["mean"])
            b = m[best]
        if "searched" in m and all(k in m for k in UNIFORM):
            gap = paired_gap(m["searched"], b)
            add("motion", backbone, "searched >= best uniform - 1 sigma and >= S + 10",
                m["searched"]["mean"] >= b["mean"] - b["std"]
                and m["searched"]["mean"] >= m["S"]["mean"] + 0.10,
                f"searched {100 * m['searched']['mean']:.1f}, best uniform {best} "
                f"{100 * b['mean']:.1f} +- {100 * b['std']:.1f}, S {100 * m['S']['mean']:.1f}"
                + _gap_text(gap, f"searched - {best}"), gap)
        if "opt" in m and all(k in m for k in UNIFORM):
            gap = paired_gap(m["opt"], b)
            add("motion", backbone, "opt (new rule) >= best uniform - 1 sigma",
                m["opt"]["mean"] >= b["mean"] - b["std"],
                f"opt {100 * m['opt']['mean']:.1f}, opt_depth "
                f"{100 * m.get('opt_depth', {}).get('mean', float('nan')):.1f}"
                + _gap_text(gap, f"opt - {best}"), gap)
        a = cells.get("appearance", {}).get(backbone, {})
        if "searched" in a and "S+ST" in a:
            f = a["S+ST"]
            ratio = (a["searched"]["mean_macs"] or 0) / max(f["mean_macs"] or 1, 1)
            gap = paired_gap(a["searched"], f)
            add("appearance", backbone, "searched >= S+ST - 1 sigma at <= 0.8x its MACs",
                a["searched"]["mean"] >= f["mean"] - f["std"] and ratio <= 0.8,
                f"searched {100 * a['searched']['mean']:.1f} at {ratio:.2f}x MACs, S+ST "
                f"{100 * f['mean']:.1f} +- {100 * f['std']:.1f}"
                + _gap_text(gap, "searched - S+ST"), gap)
        fm = cells.get("fine_motion", {}).get(backbone, {})
        if "searched" in fm:
            prof = _t_profile(fm["searched"]["codes"])
            add("fine_motion", backbone, "searched keeps T low and drops it high (vs S+ST: 0)",
                None if prof is None else prof["upper_minus_lower"] < 0,
                f"T share lower {prof['lower']:.2f}, upper {prof['upper']:.2f}" if prof else "–")
    return rows


def fidelity_rows(bench) -> list[dict]:
    rows = []
    for seed in range(bench.seeds):
        path = os.path.join(bench.run_dir("motion", seed), "searched", "resnet_tiny", "analysis",
                            "fidelity_uniform.json")
        if os.path.exists(path):
            rep = _read(path)
            rows.append({"seed": seed, "kendall_tau": rep.get("kendall_tau"),
                         "recalibrated_tau": (rep.get("recalibrated") or {}).get("kendall_tau"),
                         "num_strategies": rep.get("num_strategies")})
    return rows


def markdown(cells, checks, fidelity, seconds, budget="the task configs'", weight_term="",
             searched_terms=()) -> str:
    lines = ["# Searched, transferred and uniform strategies on the backbones (Table 6)", "",
             f"Stand-alone budget: {budget} epochs. "
             + (f"Templates' weight term: `{weight_term}`. " if weight_term else "")
             + (f"Searched templates' weight term: `{', '.join(searched_terms)}`. "
                if searched_terms else "") +
             f"Video top-1 % ({PROTOCOL}), mean +- std over template seeds (each cell the mean "
             "of its stand-alone training seeds; with one template seed, the std over its "
             "training seeds); GMACs per clip in brackets.", ""]
    for task, backbones in cells.items():
        lines += [f"## {task}", "", "| backbone | " + " | ".join(SPECS) + " |",
                  "|---|" + "---|" * len(SPECS)]
        for backbone, c in backbones.items():
            row = []
            for s in SPECS:
                if s not in c:
                    row.append("–")
                    continue
                g = f" [{c[s]['mean_macs'] / 1e9:.4f}]" if c[s]["mean_macs"] else ""
                row.append(f"{100 * c[s]['mean']:.1f} +- {100 * c[s]['std']:.1f}{g}")
            lines.append(f"| {backbone} | " + " | ".join(row) + " |")
        lines.append("")
        for backbone, c in backbones.items():
            for s in ("searched", "opt", "opt_depth"):
                if s in c:
                    lines.append(f"- {backbone} {s}: codes {', '.join(f'`{x}`' for x in c[s]['codes'])}")
        lines.append("")
    lines += ["## Targets", "", "| task | backbone | target | held | measured |", "|---|---|---|---|---|"]
    for r in checks:
        held = {True: "yes", False: "no", None: "–"}[r["held"]]
        lines.append(f"| {r['task']} | {r['backbone']} | {r['target']} | {held} | {r['detail']} |")
    if fidelity:
        lines += ["", "## Fidelity of the resnet_tiny search (motion, uniform pool)", "",
                  "| seed | strategies | Kendall tau | with BN re-calibration |", "|---|---|---|---|"]
        for r in fidelity:
            lines.append(f"| {r['seed']} | {r['num_strategies']} | {_num(r['kendall_tau'])} | "
                         f"{_num(r['recalibrated_tau'])} |")
    lines += ["", "Collected from finished runs (--report_only): their training time is in the "
              "run's own report." if seconds is None else
              f"Running time of this invocation: {seconds / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def _markers(label: str = "") -> tuple[str, str]:
    """The generated block's fences; a run at another stand-alone budget has its own."""
    tag = f"--docs{' ' + label if label else ''}"
    return (f"<!-- benchmarks/transfer.py {tag}: begin -->",
            f"<!-- benchmarks/transfer.py {tag}: end -->")


BEGIN, END = _markers()


def _splice(doc: str, generated: str, label: str = "") -> str:
    """``doc`` with its generated block (between its markers) replaced by ``generated``
    (appended if it has none): the hand-written text around it stays."""
    begin, end = _markers(label)
    block = f"{begin}\n{generated.replace('# ', '## ', 1)}{end}\n"
    if begin in doc and end in doc:
        head, rest = doc.split(begin, 1)
        return head + block + rest.split(end, 1)[1].lstrip("\n")
    return (doc.rstrip("\n") + "\n\n" if doc else "") + block


def _num(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def chart(cells) -> bytes | None:
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(t, b) for t in cells for b in cells[t]]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), dpi=110,
                             squeeze=False)
    for ax, (task, backbone) in zip(axes[0], panels):
        c = cells[task][backbone]
        specs = [s for s in SPECS if s in c]
        ax.bar(range(len(specs)), [100 * c[s]["mean"] for s in specs],
               yerr=[100 * c[s]["std"] for s in specs], color=[
                   "#d62728" if s == "searched" else "#ff7f0e" if s.startswith("opt") else "#888888"
                   for s in specs])
        ax.set_xticks(range(len(specs)), specs, rotation=60, fontsize=7)
        ax.set_title(f"{task}\n{backbone}", fontsize=8)
        ax.set_ylim(0, 100)
    axes[0][0].set_ylabel("video top-1 % (test)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/transfer")
    ap.add_argument("--seeds", type=int, default=3, help="template seeds")
    ap.add_argument("--standalone_seeds", type=int, default=3, help="training seeds per cell")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--backbones", default=",".join(BACKBONES))
    ap.add_argument("--fidelity_strategies", type=int, default=12)
    ap.add_argument("--no_fidelity", action="store_true")
    ap.add_argument("--generalize_epochs", type=int, default=0,
                    help="stand-alone budget of every Table 6 network (0: the task config's "
                         "--generalize_epochs, else its --epochs: motion 8, appearance 20, "
                         "fine motion 26); "
                         "another budget writes its own block and chart with --docs")
    ap.add_argument("--weight_term", default="", choices=("", "norm", "prior", "compute"),
                    help="the templates' weight term (default: the task config's, prior); "
                         "another writes its own block, chart and results file with --docs")
    ap.add_argument("--specs", default=",".join(SPECS),
                    help="strategies trained stand-alone (a subset: fewer cells, same seeds)")
    ap.add_argument("--report_only", action="store_true", help="collect what is there, train nothing")
    ap.add_argument("--docs", action="store_true",
                    help="also write the table into docs/transfer.md's generated block, and its chart")
    a = ap.parse_args()
    t0 = time.time()
    bench = Bench(a.out, a.seeds, a.standalone_seeds, a.tasks.split(","), a.backbones.split(","),
                  a.fidelity_strategies, a.generalize_epochs, a.weight_term,
                  tuple(a.specs.split(",")))
    unknown = set(bench.specs) - set(SPECS)
    if unknown:
        sys.exit(f"--specs: unknown {', '.join(sorted(unknown))}; valid: {', '.join(SPECS)}")
    label = " ".join(x for x in (f"generalize_epochs={a.generalize_epochs}" if a.generalize_epochs
                                 else "", f"weight_term={a.weight_term}" if a.weight_term else "") if x)
    budget = (str(a.generalize_epochs) if a.generalize_epochs
              else "the task configs' (motion 8, appearance 20, fine motion 26)")
    if not a.report_only:
        bench.run(fidelity=not a.no_fidelity)
    cells = collect(bench)
    checks = targets(cells)
    fid = fidelity_rows(bench)
    searched_terms = searched_weight_terms(bench)
    report = {"protocol": PROTOCOL, "cost": "MACs per clip", "standalone_epochs": budget,
              "weight_term": a.weight_term or "the task config's",
              "searched_weight_terms": searched_terms,
              "cells": cells, "targets": checks, "fidelity": fid,
              "seconds": None if a.report_only else round(time.time() - t0, 1)}
    from stfusion_tf import files
    files.write_json(os.path.join(a.out, "transfer.json"), report)
    md = markdown(cells, checks, fid, None if a.report_only else time.time() - t0, budget,
                  a.weight_term, searched_terms)
    files.write_text(os.path.join(a.out, "transfer.md"), md)
    png = chart(cells)
    if png:
        files.write_text(os.path.join(a.out, "transfer.png"), png)
    if a.docs:
        # The report beside the docs: the run directories are scratch, this survives them.
        suffix = (f"_e{a.generalize_epochs}" if a.generalize_epochs else "") + (
            f"_{a.weight_term}" if a.weight_term else "")
        files.write_json(os.path.join(HERE, "results", f"transfer{suffix}.json"), report)
        img = f"transfer{suffix}.png"
        docs = os.path.join(ROOT, "docs", "transfer.md")
        files.write_text(docs, _splice(open(docs).read() if os.path.exists(docs) else "", md.replace(
            "\n## Targets", f"\n![Table 6 per task and backbone](img/{img})\n\n## Targets", 1),
            label))
        if png:
            files.write_text(os.path.join(ROOT, "docs", "img", img), png)
    print(json.dumps(report, default=str))


if __name__ == "__main__":
    main()
