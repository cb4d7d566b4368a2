"""``--mode=fidelity``: can the inherited-weight ranking be trusted?

Takes K of the strategies ranked by ``--mode=analyze`` (spread evenly over the
ranking, best to worst), trains each stand-alone from the template's initial
weights with the same budget as the template (its masks fixed, no v-DropPath),
scores it on the same selection split, and reports Kendall's tau and Spearman's rho between
inherited-weight accuracy and stand-alone accuracy.  Each finished strategy is
appended to ``analysis/fidelity.jsonl`` so an interrupted run resumes.
"""

from __future__ import annotations

import os

import numpy as np

from stfusion_tf import files
from stfusion_tf.errors import UserError
from stfusion_tf.model.strategy import FusionStrategy


def pick(ranked: list[dict], k: int) -> list[dict]:
    """k unique strategies spread evenly over the ranking (best first)."""
    unique, seen = [], set()
    for r in ranked:
        if r["key"] not in seen:
            seen.add(r["key"])
            unique.append(r)
    if k >= len(unique):
        return unique
    idx = np.unique(np.round(np.linspace(0, len(unique) - 1, k)).astype(int))
    return [unique[i] for i in idx]


def run(model_dir: str, positions, k: int, train_fn, log=print) -> dict:
    """``train_fn(strategy, run_dir) -> summary`` trains one strategy stand-alone."""
    from scipy import stats
    out = os.path.join(model_dir, "analysis")
    path = os.path.join(out, "ranking.jsonl")
    if not os.path.exists(path):
        raise UserError(f"{path} missing: run --mode=analyze first")
    rows, _ = files.read_jsonl(path)
    ranked = sorted(rows, key=lambda r: (-r["video_top1"], -r["clip_top1"], r["index"]))
    chosen = pick(ranked, k)
    jsonl = os.path.join(out, "fidelity.jsonl")
    done = {r["key"]: r for r in files.read_jsonl(jsonl)[0]}
    results = []
    with files.JsonlAppender(jsonl) as f:
        for i, r in enumerate(chosen):
            if r["key"] in done:
                results.append(done[r["key"]])
                continue
            st = FusionStrategy(tuple(positions), tuple(r["units"]))
            log(f"[fidelity] {i + 1}/{len(chosen)}: training {st.code()} stand-alone")
            summary = train_fn(st, os.path.join(model_dir, "fidelity", f"sample_{r['index']:05d}"))
            ev = next(iter(summary["eval"].values()))
            row = {"key": r["key"], "index": r["index"], "code": r["code"],
                   "inherited_video_top1": r["video_top1"], "standalone_video_top1": ev["video_top1"],
                   "standalone_clip_top1": ev["clip_top1"], "steps": summary["steps"],
                   "inherited_protocol": r.get("protocol"),
                   "standalone_protocol": (ev.get("protocol") or {}).get("label")}
            f.append(row)
            results.append(row)
    a = [r["inherited_video_top1"] for r in results]
    b = [r["standalone_video_top1"] for r in results]
    tau = rho = None  # undefined when either side has no spread (JSON null)
    if len(results) > 1 and len(set(a)) > 1 and len(set(b)) > 1:
        tau = float(stats.kendalltau(a, b).statistic)
        rho = float(stats.spearmanr(a, b).statistic)
    if tau is not None:
        verdict = (f"Kendall τ = {tau:.3f}, Spearman ρ = {rho:.3f} (1: the inherited ranking "
                   "orders them exactly as training them would).")
    elif len(set(b)) <= 1:
        verdict = (f"Rank correlation undefined: every strategy reached the same stand-alone "
                   f"accuracy ({100 * b[0]:.1f}%), so this task and budget do not separate them; "
                   "use a harder dataset or a smaller budget to test the ranking.")
    else:
        verdict = "Rank correlation undefined: the inherited-weight accuracies are all equal."
    protocols = sorted({str(r.get(k)) for r in results
                        for k in ("inherited_protocol", "standalone_protocol")})
    report = {"num_strategies": len(results), "kendall_tau": tau, "spearman_rho": rho,
              "verdict": verdict, "protocols": protocols, "strategies": results}
    files.write_json(os.path.join(out, "fidelity.json"), report)
    lines = ["# Ranking fidelity: inherited weights vs stand-alone training", "",
             f"{len(results)} strategies spread over the inherited-weight ranking, each trained "
             f"stand-alone with the template's budget. {verdict}", "",
             "Evaluation protocols (video-level top-1): " + "; ".join(protocols) + ".", "",
             "| sample | inherited video top-1 | stand-alone video top-1 | code |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['index']} | {100 * r['inherited_video_top1']:.1f} | "
                     f"{100 * r['standalone_video_top1']:.1f} | `{r['code']}` |")
    files.write_text(os.path.join(out, "fidelity.md"), "\n".join(lines) + "\n")
    return report
