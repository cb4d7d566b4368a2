"""Does the probability space learn from the data?  Tasks whose right answer is known.

Trains the tiny template on the embedded tasks with several seeds, through the
project's own entry point, and checks each expectation:

  motion vs appearance  mean P(ST)+P(S+ST) (T-branch use) higher on synthetic_motion
                        than on synthetic_appearance by >= 0.15, every seed, both
                        templates >= 90% video top-1 on val
  separation            on motion, some position with p_T <= 0.03 and one with p_S >= 0.4
  depth profile         synthetic_fine_motion (motion only at fine scale): T-branch use
                        lower in the upper half than in the lower half, every seed
  temporal resolution   motion with --temporal_pool (window 3, stride 2): mean P(S)
                        higher than without, every seed (supplement Fig. 6)
  stand-alone           on motion, Opt / S+ST / S / ST trained stand-alone (densenet_tiny,
                        the template's budget): Opt >= best uniform - 1 std, Opt >= S + 10
  fidelity              Kendall tau >= 0.6 between inherited-weight and stand-alone accuracy
                        over >= 12 strategies whose stand-alone accuracies spread >= 10 points
                        (drawn uniformly from the space: ``--fidelity_pool``); reported also
                        with BatchNorm re-calibrated per strategy (16 batches)

Prints one JSON line per finished job and the final JSON report; writes
``<out>/probability_space.{json,md,png}``.  Resumable: finished jobs are skipped.

    .venv/bin/python benchmarks/probability_space.py --out runs/science   # ~50 min on 2 cores

(measured: 41 min 31 s with ``--standalone_epochs=12``; the stand-alone step at the default
20 epochs 10 min 31 s on its own; docs/science.md).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TASKS = {  # name: (flagfile, extra flags)
    "motion": ("synthetic_motion", []),
    "appearance": ("synthetic_appearance", []),
    "fine_motion": ("synthetic_fine_motion", []),
    "motion_tpool": ("synthetic_motion", ["--num_frames=16", "--temporal_pool"]),
}
DATASET = {"synthetic_motion": "synthetic_motion", "synthetic_appearance": "synthetic_appearance",
           "synthetic_fine_motion": "synthetic_fine_motion"}


def _main(args, log_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    t0 = time.time()
    with open(log_path, "w") as log:
        r = subprocess.run([sys.executable, "-m", "stfusion_tf.main", *args], cwd=ROOT, env=env,
                           stdout=log, stderr=subprocess.STDOUT)
    if r.returncode:
        raise RuntimeError(f"failed ({r.returncode}): {' '.join(args)}; see {log_path}")
    return time.time() - t0


class Bench:
    def __init__(self, out, seeds, jobs, standalone_epochs, fidelity_strategies, tasks=TASKS,
                 flags=()):
        self.out, self.seeds, self.jobs, self.tasks, self.flags = out, seeds, jobs, tasks, flags
        self.standalone_epochs, self.fidelity_strategies = standalone_epochs, fidelity_strategies
        os.makedirs(os.path.join(out, "logs"), exist_ok=True)

    def data_dir(self, flagfile):
        return os.path.join(self.out, "data", DATASET[flagfile])

    def run_dir(self, task, seed):
        return os.path.join(self.out, "runs", task, f"seed{seed}")

    def common(self, flagfile):
        return [f"--flagfile=configs/{flagfile}.flags", f"--data_dir={self.data_dir(flagfile)}",
                "--progress=0", "--backbones=", *self.flags]

    def parallel(self, jobs):
        """Runs (name, fn) jobs ``self.jobs`` at a time; prints a line per finished job."""
        with cf.ThreadPoolExecutor(self.jobs) as pool:
            futures = {pool.submit(fn): name for name, fn in jobs}
            for f in cf.as_completed(futures):
                print(json.dumps({"job": futures[f], "seconds": round(f.result(), 1)}), flush=True)

    def prepare(self):
        for flagfile in sorted({TASKS[t][0] for t in self.tasks}):
            if not os.path.exists(os.path.join(self.data_dir(flagfile), "manifest.json")):
                _main([*self.common(flagfile), "--mode=prepare"],
                      os.path.join(self.out, "logs", f"prepare_{flagfile}.log"))

    def template_job(self, task, seed):
        flagfile, extra = TASKS[task]
        run = self.run_dir(task, seed)

        def job():
            if os.path.exists(os.path.join(run, "analysis", "summary.json")):
                return 0.0
            base = [*self.common(flagfile), *extra, f"--model_dir={run}", f"--seed={seed}"]
            t = _main([*base, "--mode=train"], os.path.join(self.out, "logs", f"{task}_{seed}_train.log"))
            return t + _main([*base, "--mode=analyze"],
                             os.path.join(self.out, "logs", f"{task}_{seed}_analyze.log"))
        return f"template {task} seed {seed}", job

    def standalone_job(self, seed):
        run = self.run_dir("motion", seed)

        def job():
            if os.path.exists(os.path.join(run, "analysis", "generalization.json")):
                return 0.0
            return _main([f"--model_dir={run}", "--mode=generalize", "--backbones=densenet_tiny",
                          "--backbone_strategies=opt,S+ST,S,ST", "--generalize_seeds=1",
                          f"--generalize_epochs={self.standalone_epochs}", "--progress=0"],
                         os.path.join(self.out, "logs", f"standalone_{seed}.log"))
        return f"stand-alone motion seed {seed}", job

    def fidelity_path(self, task, seed, pool):
        from stfusion_tf.analysis import fidelity
        return os.path.join(self.run_dir(task, seed), "analysis",
                            f"{fidelity.report_name(pool)}.json")

    def fidelity_job(self, task, seed, pool):
        run = self.run_dir(task, seed)

        def job():
            if os.path.exists(self.fidelity_path(task, seed, pool)):
                return 0.0
            return _main([f"--model_dir={run}", "--mode=fidelity", f"--fidelity_pool={pool}",
                          f"--fidelity_strategies={self.fidelity_strategies}",
                          "--recalibrate_batches=16", "--progress=0"],
                         os.path.join(self.out, "logs", f"fidelity_{pool}_{task}_{seed}.log"))
        return f"fidelity {task} seed {seed}", job


def _read(path):
    with open(path) as f:
        return json.load(f)


def template_rows(bench) -> dict:
    rows = {}
    for task in bench.tasks:
        rows[task] = []
        for seed in bench.seeds:
            run = bench.run_dir(task, seed)
            summary = _read(os.path.join(run, "analysis", "summary.json"))
            train = _read(os.path.join(run, "train_summary.json"))
            rates = np.array(train["drop_rates"])
            rows[task].append({
                "seed": seed, "val_video_top1": train["eval"]["val"]["video_top1"],
                **summary["temporal_use"], "moved": summary["drop_rate_movement"]["moved"],
                "gates": summary["drop_rate_movement"]["gates"],
                "min_p_T": float(rates[:, 1].min()), "max_p_S": float(rates[:, 0].max()),
                "opt": summary["opt"]["code"], "positions": train["positions"],
                "p_S": rates[:, 0].tolist(), "p_T": rates[:, 1].tolist(),
                "test_inherited": {k: v["video_top1"] for k, v in summary["comparison"].items()}})
    return rows


def standalone_rows(bench) -> dict:
    out = {}
    for seed in bench.seeds:
        path = os.path.join(bench.run_dir("motion", seed), "analysis", "generalization.json")
        if os.path.exists(path):
            for r in _read(path)["results"]:
                out.setdefault(r["spec"], []).append(r["video_top1"])
    return out


def _num(x) -> str:
    return "undefined" if x is None else f"{x:.3f}"


def _pct(runs) -> str:
    return ", ".join(f"{100 * r['val_video_top1']:.1f}" for r in runs)


def expectations(rows, standalone, fidelity) -> list[dict]:
    out = []

    def add(name, held, detail):
        out.append({"expectation": name, "held": bool(held), "detail": detail})

    m, a = rows.get("motion"), rows.get("appearance")
    if m and a:
        gaps = [x["T_use"] - y["T_use"] for x, y in zip(m, a)]
        vals = [r["val_video_top1"] for r in m + a]
        add("motion vs appearance: T-use higher on motion by >= 0.15, every seed; both >= 90% val",
            min(gaps) >= 0.15 and min(vals) >= 0.9,
            f"T-use gaps {', '.join(f'{g:+.3f}' for g in gaps)}; val top-1 motion "
            f"{_pct(m)}, appearance {_pct(a)}")
    if m:
        sep = [r["min_p_T"] <= 0.03 and r["max_p_S"] >= 0.4 for r in m]
        add("separation on motion: some p_T <= 0.03 and some p_S >= 0.4, every seed", all(sep),
            "; ".join(f"seed {r['seed']}: min p_T {r['min_p_T']:.3f}, max p_S {r['max_p_S']:.3f}"
                      for r in m))
    f = rows.get("fine_motion")
    if f:
        diffs = [r["T_use_upper"] - r["T_use_lower"] for r in f]
        add("depth profile (fine motion): T-use upper half < lower half, every seed",
            max(diffs) < 0 and min(r["val_video_top1"] for r in f) >= 0.9,
            f"upper - lower {', '.join(f'{d:+.3f}' for d in diffs)}; val top-1 {_pct(f)}")
    p = rows.get("motion_tpool")
    if p and m:
        ds = [x["mean_P_S"] - y["mean_P_S"] for x, y in zip(p, m)]
        add("lower temporal resolution raises mean P(S), every seed", min(ds) > 0,
            f"mean P(S) pooled - full {', '.join(f'{d:+.3f}' for d in ds)}")
    if standalone:
        opt = np.array(standalone.get("opt", []))
        uni = {k: np.array(v) for k, v in standalone.items() if k in ("S+ST", "S", "ST")}
        best = max(uni, key=lambda k: uni[k].mean())
        held = opt.mean() >= uni[best].mean() - uni[best].std(ddof=1) and \
            opt.mean() >= uni["S"].mean() + 0.10
        add("stand-alone on motion: Opt >= best uniform - 1 std and >= S + 10 points", held,
            ", ".join(f"{k} {100 * np.mean(v):.1f} ± {100 * np.std(v, ddof=1):.1f}"
                      for k, v in standalone.items()))
    if fidelity:
        st = [r["standalone_video_top1"] for r in fidelity["strategies"]]
        spread = max(st) - min(st)
        tau = fidelity["kendall_tau"]
        add("fidelity: Kendall tau >= 0.6 over >= 12 strategies spreading >= 10 points",
            tau is not None and tau >= 0.6 and len(st) >= 12 and spread >= 0.10,
            f"tau {_num(tau)}, {len(st)} strategies ({fidelity.get('pool', 'learned')} pool), "
            f"stand-alone spread {100 * spread:.1f} points")
        recal = (fidelity.get("recalibrated") or {}).get("kendall_tau")
        if recal is not None or "recalibrated" in fidelity:
            add("fidelity with BN re-calibrated per strategy (not the authors' ranking): "
                "Kendall tau >= 0.6, same strategies",
                recal is not None and recal >= 0.6 and len(st) >= 12 and spread >= 0.10,
                f"tau {_num(recal)}")
    return out


def write_report(bench, rows, standalone, fidelity, checks, seconds):
    report = {"seeds": bench.seeds, "seconds": round(seconds), "expectations": checks,
              "tasks": {t: {"mean": {k: float(np.mean([r[k] for r in v])) for k in
                                     ("T_use", "T_use_lower", "T_use_upper", "S_use",
                                      "mean_P_S", "val_video_top1")},
                            "std": {k: float(np.std([r[k] for r in v])) for k in
                                    ("T_use", "T_use_lower", "T_use_upper", "mean_P_S")},
                            "runs": v} for t, v in rows.items()},
              "standalone_motion": standalone, "fidelity": fidelity}
    with open(os.path.join(bench.out, "probability_space.json"), "w") as f:
        json.dump(report, f, indent=1)
    lines = ["# Probability space on tasks with a known answer", "",
             f"Tiny template, {len(bench.seeds)} seeds per task; accuracy = video top-1 on val "
             "(8 frames x 1 clip x 1 centre crop); T-use = mean P(ST)+P(S+ST) (Eq. 7).", "",
             "| task | val top-1 | T-use | T-use lower / upper half | S-use | mean P(S) |",
             "|---|---|---|---|---|---|"]
    for t, v in report["tasks"].items():
        mu, sd = v["mean"], v["std"]
        lines.append(f"| {t} | {100 * mu['val_video_top1']:.1f} | {mu['T_use']:.3f} ± "
                     f"{sd['T_use']:.3f} | {mu['T_use_lower']:.3f} / {mu['T_use_upper']:.3f} | "
                     f"{mu['S_use']:.3f} | {mu['mean_P_S']:.3f} ± {sd['mean_P_S']:.3f} |")
    lines += ["", "| expectation | held | measured |", "|---|---|---|"]
    lines += [f"| {c['expectation']} | {'yes' if c['held'] else 'NO'} | {c['detail']} |"
              for c in checks]
    with open(os.path.join(bench.out, "probability_space.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    _chart(bench, rows)
    from stfusion_tf.analysis import aggregate
    for task in rows:  # per task: mean marginals with their spread, consensus Opt
        agg = aggregate.aggregate([bench.run_dir(task, s) for s in bench.seeds],
                                  os.path.join(bench.out, "aggregate", task),
                                  title=f"{task}: mean marginals over {len(bench.seeds)} seeds")
        report["tasks"][task]["consensus_opt"] = agg["consensus"]["code"]
    with open(os.path.join(bench.out, "probability_space.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


def _chart(bench, rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from stfusion_tf.analysis import marginals as marg
    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=110)
    for task, runs in rows.items():
        keep_t = np.array([marg.keep_probability(r["p_T"]) for r in runs])
        x = np.arange(keep_t.shape[1])
        ax.errorbar(x, keep_t.mean(0), yerr=keep_t.std(0), capsize=2, marker="o", ms=3,
                    label=task)
    ax.set_xticks(x)
    ax.set_xticklabels(next(iter(rows.values()))[0]["positions"], rotation=90, fontsize=7)
    ax.set_ylabel("P(ST) + P(S+ST)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=4)
    ax.set_title(f"T-branch marginal per position, mean ± std over {len(bench.seeds)} seeds",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(bench.out, "probability_space.png"))
    plt.close(fig)


def main():
    from stfusion_tf.analysis import fidelity  # light: no TensorFlow in the parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/science")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2, help="processes at a time")
    ap.add_argument("--standalone_epochs", type=int, default=20)
    ap.add_argument("--fidelity_strategies", type=int, default=12)
    ap.add_argument("--fidelity_task", default="motion", choices=tuple(TASKS))
    ap.add_argument("--fidelity_pool", default="uniform", choices=fidelity.POOLS,
                    help="strategies of the fidelity check: the learned samples or drawn "
                    "uniformly from the space (see stfusion_tf/analysis/fidelity.py)")
    ap.add_argument("--skip", default="", help="comma list of: standalone, fidelity")
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma list of tasks")
    ap.add_argument("--flags", default="", help="extra flags for every template run, "
                    "space-separated (e.g. '--length_scale=20')")
    args = ap.parse_args()
    t0 = time.time()
    tasks = [t for t in args.tasks.split(",") if t]
    bench = Bench(args.out, list(range(args.seeds)), args.jobs, args.standalone_epochs,
                  args.fidelity_strategies, tasks, args.flags.split())
    bench.prepare()
    bench.parallel([bench.template_job(t, s) for t in tasks for s in bench.seeds])
    later = []
    if "standalone" not in args.skip:
        later += [bench.standalone_job(s) for s in bench.seeds]
    if "fidelity" not in args.skip:
        later.append(bench.fidelity_job(args.fidelity_task, 0, args.fidelity_pool))
    bench.parallel(later)
    rows = template_rows(bench)
    standalone = standalone_rows(bench)
    fid_path = bench.fidelity_path(args.fidelity_task, 0, args.fidelity_pool)
    fidelity = _read(fid_path) if os.path.exists(fid_path) else None
    checks = expectations(rows, standalone, fidelity)
    report = write_report(bench, rows, standalone, fidelity, checks, time.time() - t0)
    print(json.dumps({"expectations": checks, "seconds": report["seconds"]}, indent=1))


if __name__ == "__main__":
    main()
