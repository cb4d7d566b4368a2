"""``--mode=fidelity``: can the inherited-weight ranking be trusted?

Takes K of the strategies ranked with inherited weights (spread evenly over the
ranking, best to worst), trains each stand-alone from the template's initial
weights with the same budget as the template (its masks fixed, no v-DropPath),
scores it on the same selection split, and reports Kendall's tau and Spearman's rho between
inherited-weight accuracy and stand-alone accuracy.  Each finished strategy is
appended to ``analysis/fidelity.jsonl`` so an interrupted run resumes.

Two pools of strategies (``POOLS``):

* ``learned``: the samples ``--mode=analyze`` ranked, drawn from the learned drop
  rates.  This asks whether Opt is the right pick *among what the template
  favours*; on an easy task those samples all train to the same accuracy and the
  correlation is undefined or noise.
* ``uniform``: strategies drawn with every drop rate at 0.5 (every strategy of the
  space equally likely), ranked with the same inherited weights into
  ``analysis/ranking_uniform.jsonl``; results go to ``fidelity_uniform.*``.  This
  asks whether inherited weights order the *whole space* as training would, which
  is what the paper's ranking step relies on, and gives strategies whose
  stand-alone accuracies spread (e.g. S-only vs ST on a motion task).
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


POOLS = ("learned", "uniform")


def report_name(pool: str) -> str:
    if pool not in POOLS:
        raise UserError(f"fidelity pool {pool!r}; valid values: {', '.join(POOLS)}")
    return "fidelity" if pool == "learned" else f"fidelity_{pool}"


def run(model_dir: str, positions, k: int, train_fn, log=print, pool: str = "learned",
        ranked: list[dict] | None = None, recalibrated_fn=None) -> dict:
    """``train_fn(strategy, run_dir) -> summary`` trains one strategy stand-alone;
    ``ranked``: the pool's ranking rows (default: ``analysis/ranking.jsonl``);
    ``recalibrated_fn(strategy) -> video top-1``: inherited weights with BatchNorm
    re-estimated for that sub-network, correlated with stand-alone accuracy too."""
    name = report_name(pool)
    out = os.path.join(model_dir, "analysis")
    if ranked is None:
        path = os.path.join(out, "ranking.jsonl")
        if not os.path.exists(path):
            raise UserError(f"{path} missing: run --mode=analyze first")
        ranked, _ = files.read_jsonl(path)
    ranked = sorted(ranked, key=lambda r: (-r["video_top1"], -r["clip_top1"], r["index"]))
    chosen = pick(ranked, k)
    results = _train_all(chosen, positions, model_dir, name, train_fn, log)
    report = {"pool": pool, "num_strategies": len(results), **_correlate(results),
              "strategies": results}
    if recalibrated_fn is not None:
        for r, c in zip(results, chosen):
            r["inherited_recalibrated_video_top1"] = recalibrated_fn(
                FusionStrategy(tuple(positions), tuple(c["units"])))
        tau, rho = _rank(results, "inherited_recalibrated_video_top1")
        report["recalibrated"] = {"kendall_tau": tau, "spearman_rho": rho}
    files.write_json(os.path.join(out, f"{name}.json"), report)
    _write_md(os.path.join(out, f"{name}.md"), report)
    return report


def _train_all(chosen, positions, model_dir, name, train_fn, log) -> list[dict]:
    """Trains each chosen strategy stand-alone; resumes from ``<name>.jsonl``."""
    jsonl = os.path.join(model_dir, "analysis", f"{name}.jsonl")
    done = {r["key"]: r for r in files.read_jsonl(jsonl)[0]}
    results = []
    with files.JsonlAppender(jsonl) as f:
        for i, r in enumerate(chosen):
            if r["key"] in done:
                results.append(done[r["key"]])
                continue
            st = FusionStrategy(tuple(positions), tuple(r["units"]))
            log(f"[fidelity] {i + 1}/{len(chosen)}: training {st.code()} stand-alone")
            summary = train_fn(st, os.path.join(model_dir, name, f"sample_{r['index']:05d}"))
            ev = next(iter(summary["eval"].values()))
            row = {"key": r["key"], "index": r["index"], "code": r["code"], "units": r["units"],
                   "inherited_video_top1": r["video_top1"], "standalone_video_top1": ev["video_top1"],
                   "standalone_clip_top1": ev["clip_top1"], "steps": summary["steps"],
                   "inherited_protocol": r.get("protocol"),
                   "standalone_protocol": (ev.get("protocol") or {}).get("label")}
            f.append(row)
            results.append(row)
    return results


def _rank(results: list[dict], inherited: str) -> tuple:
    """(Kendall's tau, Spearman's rho) of ``inherited`` vs stand-alone accuracy; None
    where either side has no spread (JSON null)."""
    from scipy import stats
    a = [r[inherited] for r in results]
    b = [r["standalone_video_top1"] for r in results]
    if len(results) > 1 and len(set(a)) > 1 and len(set(b)) > 1:
        return float(stats.kendalltau(a, b).statistic), float(stats.spearmanr(a, b).statistic)
    return None, None


def _correlate(results: list[dict]) -> dict:
    """Kendall's tau and Spearman's rho (None where either side has no spread), a verdict."""
    b = [r["standalone_video_top1"] for r in results]
    tau, rho = _rank(results, "inherited_video_top1")
    if tau is not None:
        verdict = (f"Kendall τ = {tau:.3f}, Spearman ρ = {rho:.3f} (1: the inherited ranking "
                   "orders them exactly as training them would).")
    elif len(set(b)) <= 1:
        verdict = (f"Rank correlation undefined: every strategy reached the same stand-alone "
                   f"accuracy ({100 * b[0]:.1f}%), so this task and budget do not separate them; "
                   "use a harder dataset, a smaller budget or --fidelity_pool=uniform.")
    else:
        verdict = "Rank correlation undefined: the inherited-weight accuracies are all equal."
    protocols = sorted({str(r.get(k)) for r in results
                        for k in ("inherited_protocol", "standalone_protocol")})
    spread = 100 * (max(b) - min(b)) if b else 0.0
    return {"kendall_tau": tau, "spearman_rho": rho, "verdict": verdict,
            "standalone_spread_points": spread, "protocols": protocols}


def _write_md(path: str, report: dict) -> None:
    results = report["strategies"]
    source = ("the learned drop rates' samples (--mode=analyze)" if report["pool"] == "learned"
              else "strategies drawn uniformly from the whole space")
    lines = ["# Ranking fidelity: inherited weights vs stand-alone training", "",
             f"{len(results)} strategies spread over the inherited-weight ranking of {source}, "
             f"each trained stand-alone with the template's budget; their stand-alone accuracies "
             f"spread {report['standalone_spread_points']:.1f} points. {report['verdict']}", "",
             "Evaluation protocols (video-level top-1): " + "; ".join(report["protocols"]) + ".", ""]
    recal = report.get("recalibrated")
    if recal:
        tau, rho = (f"{v:.3f}" if v is not None else "undefined"
                    for v in (recal["kendall_tau"], recal["spearman_rho"]))
        lines += [f"With BatchNorm statistics re-estimated for each strategy before scoring it "
                  f"(--recalibrate_batches): Kendall τ = {tau}, Spearman ρ = {rho}.", ""]
    head = "| sample | inherited video top-1 |" + (" re-calibrated |" if recal else "")
    lines += [head + " stand-alone video top-1 | code |",
              "|---|---|" + ("---|" if recal else "") + "---|---|"]
    for r in results:
        cal = f" {100 * r['inherited_recalibrated_video_top1']:.1f} |" if recal else ""
        lines.append(f"| {r['index']} | {100 * r['inherited_video_top1']:.1f} |{cal} "
                     f"{100 * r['standalone_video_top1']:.1f} | `{r['code']}` |")
    files.write_text(path, "\n".join(lines) + "\n")
