"""``--mode=generalize``: which fusion strategy makes a backbone better? (paper Table 6)

Each backbone x strategy spec (``opt``, ``S+ST``, ``S``, ``ST`` by default; ``searched``
is the Opt of a v-DropPath template of the backbone itself; see ``fusion_rules``) is
trained stand-alone with the same recipe and budget and
scored on the reporting split; two specs that give the same network (Opt equal
to S+ST, as on UCF101 in the paper) share one training run.  Finished runs are appended to
``analysis/generalization.jsonl`` so an interrupted experiment resumes; the
table is written as ``generalization.md`` / ``.json`` and to TensorBoard.
"""

from __future__ import annotations

import os

import numpy as np

from stfusion_tf import files
from stfusion_tf.model import backbones as bb
from stfusion_tf.model import fusion_rules

LABELS = {"searched": "Searched", "opt": "Transferred", "opt_depth": "Transferred (depth rule)",
          "paper": "Paper rule", "S+ST": "S+ST", "S": "S", "ST": "ST"}


def _label(spec: str) -> str:
    return LABELS.get(spec, os.path.basename(spec))


def plan(backbones, specs, family: str, analysis_dir: str, seeds: int = 1,
         searched: dict | None = None, **overrides) -> list[dict]:
    """Resolves every (backbone, spec) to a strategy up front, so bad specs fail before
    training; each is trained ``seeds`` times (training seeds 0 .. seeds-1).  ``searched``:
    backbone -> the analysis directory of its own template (spec ``searched``)."""
    from stfusion_tf.analysis import cost
    runs, macs = [], {}
    for name in backbones:
        cfg = bb.preset(name, **overrides)
        for spec in specs:
            source = (searched or {}).get(name) if spec == "searched" else analysis_dir
            st = fusion_rules.resolve(spec, cfg, family, source)
            if (name, st.key()) not in macs:
                macs[name, st.key()] = cost.model_macs(bb.build_backbone(cfg, st, 2))
            for seed in range(seeds):
                runs.append({"backbone": name, "spec": spec, "config": cfg, "strategy": st,
                             "seed": seed, "macs": macs[name, st.key()],
                             "key": f"{name}|{spec}|{st.key()}|{seed}"})
    return runs


def run(model_dir: str, runs: list[dict], train_fn, log=print) -> dict:
    """``train_fn(config, strategy, run_dir, seed) -> summary`` trains one network
    (``training.train``'s summary: ``eval``, ``steps``, ``params_trainable``)."""
    out = os.path.join(model_dir, "analysis")
    os.makedirs(out, exist_ok=True)
    jsonl = os.path.join(out, "generalization.jsonl")
    done = {r["key"]: r for r in files.read_jsonl(jsonl)[0] if "key" in r}
    results, trained = [], {}
    with files.JsonlAppender(jsonl) as f:
        for i, r in enumerate(runs):
            st = r["strategy"]
            net = (r["backbone"], st.key(), r["seed"])
            if r["key"] in done:
                results.append({"macs": r["macs"], **done[r["key"]]})
                trained.setdefault(net, done[r["key"]])
                continue
            if net in trained:  # e.g. Opt == S+ST: the same network, trained once
                results.append({**trained[net], "key": r["key"], "spec": r["spec"],
                                "seed": r["seed"], "same_as": trained[net]["spec"]})
                continue
            run_dir = os.path.join(model_dir, "generalize", r["backbone"],
                                   r["spec"].replace("+", "_plus_").replace(os.sep, "_"))
            if r["seed"]:
                run_dir += f"_seed{r['seed']}"
            summary = train_fn(r["config"], st, run_dir, r["seed"])
            ev = next(iter(summary["eval"].values()))
            row = {"key": r["key"], "backbone": r["backbone"], "spec": r["spec"], "seed": r["seed"],
                   "code": st.code(), "counts": st.counts(), "params": summary["params_trainable"],
                   "macs": r["macs"],
                   "steps": summary["steps"],
                   "init": (summary.get("init") or {}).get("init_weights", "none"),
                   "protocol": (ev.get("protocol") or {}).get("label"),
                   **{k: ev[k] for k in ("clip_top1", "video_top1", "num_videos")}}
            f.append(row)
            results.append(row)
            trained[net] = row
            log(f"[generalize] {i + 1}/{len(runs)}: {r['backbone']} {_label(r['spec'])} "
                f"{st.code()} seed {r['seed']}: video top-1 {100 * row['video_top1']:.1f}")
    return write_table(out, results, log)


def _cell(rows: list[dict]) -> dict:
    """Mean (and sample std over seeds) of one backbone x spec cell."""
    v = np.array([r["video_top1"] for r in rows])
    c = np.array([r["clip_top1"] for r in rows])
    return {"video_top1": float(v.mean()), "clip_top1": float(c.mean()), "seeds": len(rows),
            "video_top1_std": float(v.std(ddof=1)) if len(rows) > 1 else None,
            "same_as": rows[0].get("same_as"), "code": rows[0]["code"],
            "macs": rows[0].get("macs"), "params": rows[0]["params"]}


def write_table(out: str, results: list[dict], log=print) -> dict:
    backbones = list(dict.fromkeys(r["backbone"] for r in results))
    specs = list(dict.fromkeys(r["spec"] for r in results))
    groups: dict = {}
    for r in results:
        groups.setdefault((r["backbone"], r["spec"]), []).append(r)
    cells = {k: _cell(v) for k, v in groups.items()}
    n_seeds = max(c["seeds"] for c in cells.values())
    seeds_note = (f" Mean ± standard deviation over {n_seeds} training seeds per cell."
                  if n_seeds > 1 else " One training run per cell: expect several points of "
                  "run-to-run noise on small data (`--generalize_seeds` repeats each cell).")
    protocols = sorted({str(r.get("protocol")) for r in results})
    lines = ["# Generalisation: fusion strategies on other backbones (paper Table 6)", "",
             "Each network trained stand-alone with the template's recipe and budget; "
             "video-level top-1 (clip-level in brackets) on the reporting split." + seeds_note, "",
             "Evaluation protocol: " + "; ".join(protocols) + ". Video-level averages the softmax "
             "of a video's views; clip-level scores each view alone.", "",
             "| backbone | " + " | ".join(_label(s) for s in specs) + " |",
             "|---|" + "---|" * len(specs)]
    for b in backbones:
        row = []
        for s in specs:
            c = cells.get((b, s))
            if c is None:
                row.append("–")
                continue
            std = f" ± {100 * c['video_top1_std']:.1f}" if c["video_top1_std"] is not None else ""
            same = f" = {_label(c['same_as'])}" if c["same_as"] else ""
            row.append(f"{100 * c['video_top1']:.1f}{std} ({100 * c['clip_top1']:.1f}){same}")
        lines.append(f"| {b} | " + " | ".join(row) + " |")
    lines += ["", "| backbone | strategy | code | S / ST / S+ST / none units | GMACs per clip | "
              "trainable params | initial weights |", "|---|---|---|---|---|---|---|"]
    for (b, spec), rows in groups.items():
        r = rows[0]
        c = r["counts"]
        gmacs = f"{r['macs'] / 1e9:.4g}" if r.get("macs") is not None else "–"
        lines.append(f"| {b} | {_label(spec)} | `{r['code']}` | "
                     f"{c['S']} / {c['ST']} / {c['S+ST']} / {c.get('none', 0)} | {gmacs} | "
                     f"{r['params']:,} | {r.get('init', 'none')} |")
    table = {"backbones": backbones, "specs": specs, "protocols": protocols, "results": results,
             "cells": [{"backbone": b, "spec": s, **c} for (b, s), c in cells.items()]}
    files.write_json(os.path.join(out, "generalization.json"), table)
    files.write_text(os.path.join(out, "generalization.md"), "\n".join(lines) + "\n")
    _tensorboard(os.path.join(os.path.dirname(out), "tensorboard", "generalize"), lines,
                 table["cells"])
    return table


def _tensorboard(log_dir: str, lines: list[str], results: list[dict]) -> None:
    import tensorflow as tf
    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default(step=0):
        tf.summary.text("generalization", "\n".join(lines))
        for r in results:
            tf.summary.scalar(f"video_top1/{r['backbone']}/{_label(r['spec'])}", r["video_top1"])
    writer.flush()
