"""``--mode=analyze``: from a trained template to a readable report.

Writes into ``<model_dir>/analysis/``: ``marginals.{json,csv,png}``, ``summary.json``
(everything below in one file, with whether the drop rates moved),
``ranking.jsonl`` (one scored strategy per line, resumable),
``opt_strategy.json`` (the best sampled strategy, a FusionStrategy),
``comparison.json`` (Opt vs uniform S / ST / S+ST on the reporting split),
``observations.json`` and ``report.md``; the marginal chart also goes to
TensorBoard under ``<model_dir>/tensorboard/analysis``.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow as tf

from stfusion_tf import files
from stfusion_tf.analysis import marginals as marg
from stfusion_tf.analysis import ranking
from stfusion_tf.data import pipeline, records
from stfusion_tf.errors import UserError
from stfusion_tf.model.strategy import S, S_ST, ST, FusionStrategy
from stfusion_tf.model.template import TemplateGates


#: Protocols strategies can be ranked with: the reporting one ("same") or a named one.
SELECTION_PROTOCOLS = ("same",) + tuple(pipeline.PROTOCOL_VIEWS)


@dataclasses.dataclass(frozen=True)
class AnalysisConfig:
    num_samples: int = 100
    seed: int = 0
    selection_split: str = "val"
    report_split: str = "test"
    top_k: int = 10
    recalibrate_batches: int = 0  # >0: also rank with BN re-calibrated on this many train batches
    train_split: str = "train"
    #: Evaluation protocol of the ranking ("same": the input config's eval_protocol, which
    #: the reporting split always uses); the authors selected on "authors" (1 clip).
    selection_protocol: str = "same"

    def __post_init__(self):
        if self.selection_protocol not in SELECTION_PROTOCOLS:
            raise UserError(f"selection_protocol={self.selection_protocol!r}; valid values: "
                            f"{', '.join(SELECTION_PROTOCOLS)}")
        if self.selection_split == self.report_split:
            raise UserError("selection_split and report_split must differ")
        if self.num_samples < 1:
            raise UserError(f"num_samples must be >= 1, got {self.num_samples}")


def observations(positions, drop_rates, top_rows: list[dict]) -> dict:
    """Numbers behind the paper's Observations I-III."""
    m = marg.marginals(drop_rates)
    n = len(positions)
    half, third = n // 2, max(1, n // 3)
    top_units = np.array([r["units"] for r in top_rows]) if top_rows else np.zeros((0, n))

    def share(unit, sl):
        return float(np.mean(top_units[:, sl] == unit)) if len(top_units) else float("nan")

    usage = {u: float(m[:, j].sum()) for j, u in enumerate((S, ST, S_ST))}
    return {
        "I_fused_lower_vs_upper": {
            "mean_P_S+ST_lower_half": float(m[:half, 2].mean()),
            "mean_P_S+ST_upper_half": float(m[half:, 2].mean()),
            "expected_unit_usage": usage,
            "most_used_unit": max(usage, key=usage.get),
            "topk_share_S+ST_lower_half": share(S_ST, slice(0, half)),
            "topk_share_S+ST_upper_half": share(S_ST, slice(half, n)),
        },
        "II_st_in_top_layers": {
            "mean_P_ST_bottom_third": float(m[:third, 1].mean()),
            "mean_P_ST_top_third": float(m[n - third:, 1].mean()),
            "topk_share_ST_bottom_third": share(ST, slice(0, third)),
            "topk_share_ST_top_third": share(ST, slice(n - third, n)),
        },
        "III_s_usage": {
            "mean_P_S": float(m[:, 0].mean()),
            "max_P_S": float(m[:, 0].max()),
            "topk_share_S": share(S, slice(0, n)),
        },
    }


def selection_input(input_cfg: pipeline.InputConfig, cfg: AnalysisConfig) -> pipeline.InputConfig:
    """The input config strategies are ranked with (its selection protocol)."""
    if cfg.selection_protocol == "same":
        return input_cfg
    return pipeline.with_protocol(input_cfg, cfg.selection_protocol)


def _scorer(model, gates, data_dir, split, input_cfg, **kwargs):
    return ranking.StrategyScorer(model, gates, pipeline.eval_dataset(data_dir, split, input_cfg),
                                  protocol=pipeline.protocol(input_cfg), **kwargs)


def _recalibrated_ranking(model, gates, data_dir, input_cfg, cfg, rates, ranked, out, log) -> dict:
    """Ranks the same samples with BatchNorm re-estimated per sub-network; compares."""
    from scipy import stats
    recal_ds = pipeline.train_dataset(data_dir, cfg.train_split, input_cfg).take(cfg.recalibrate_batches)
    scorer = _scorer(model, gates, data_dir, cfg.selection_split, selection_input(input_cfg, cfg),
                     recalibration=recal_ds)
    rows = ranking.rank(scorer, gates.positions, rates, cfg.num_samples, cfg.seed,
                        os.path.join(out, "ranking_bn_recalibrated.jsonl"), log=log)
    plain = {r["index"]: r["video_top1"] for r in ranked}
    rec = {r["index"]: r["video_top1"] for r in rows}
    idx = sorted(plain)
    tau = stats.kendalltau([plain[i] for i in idx], [rec[i] for i in idx]).statistic
    rho = stats.spearmanr([plain[i] for i in idx], [rec[i] for i in idx]).statistic
    return {"batches": cfg.recalibrate_batches, "kendall_tau": float(tau), "spearman_rho": float(rho),
            "best_index": rows[0]["index"], "best_code": rows[0]["code"],
            "best_video_top1": rows[0]["video_top1"], "same_best": rows[0]["key"] == ranked[0]["key"],
            "mean_gain": float(np.mean([rec[i] - plain[i] for i in idx]))}


def _fmt(x):
    return f"{100 * x:.1f}" if isinstance(x, float) and np.isfinite(x) else "–"


def analyze(model, data_dir: str, model_dir: str, input_cfg: pipeline.InputConfig,
            cfg: AnalysisConfig, log=print) -> dict:
    out = os.path.join(model_dir, "analysis")
    os.makedirs(out, exist_ok=True)
    manifest = records.read_manifest(data_dir)
    for split in (cfg.selection_split, cfg.report_split):
        records.split_size(manifest, split)
    gates = TemplateGates(model)
    positions, rates = gates.positions, gates.drop_rates()
    rows = marg.marginals_table(positions, rates)
    files.write_text(os.path.join(out, "marginals.json"), marg.to_json(rows))
    files.write_text(os.path.join(out, "marginals.csv"), marg.to_csv(rows))

    sel = _scorer(model, gates, data_dir, cfg.selection_split, selection_input(input_cfg, cfg))
    ranked = ranking.rank(sel, positions, rates, cfg.num_samples, cfg.seed,
                          os.path.join(out, "ranking.jsonl"), log=log)
    opt = FusionStrategy(positions, tuple(ranked[0]["units"]))
    opt.save(os.path.join(out, "opt_strategy.json"))
    recal = None
    if cfg.recalibrate_batches > 0:
        recal = _recalibrated_ranking(model, gates, data_dir, input_cfg, cfg, rates, ranked, out, log)
    png = marg.plot(positions, rates, best=opt, title=f"{manifest['name']}: layer-level marginals "
                    "(bars) and best sampled strategy (dots)")
    files.write_text(os.path.join(out, "marginals.png"), png)
    writer = tf.summary.create_file_writer(os.path.join(model_dir, "tensorboard", "analysis"))
    with writer.as_default(step=0):
        tf.summary.image("marginals_with_opt", tf.io.decode_png(png)[None])
    writer.flush()

    rep = _scorer(model, gates, data_dir, cfg.report_split, input_cfg)
    comparison = {"Opt": {"code": opt.code(), **rep.score(opt)}}
    for unit in (S_ST, S, ST):
        st = FusionStrategy.uniform(positions, unit)
        comparison[unit] = {"code": st.code(), **rep.score(st)}
    log(f"reporting split, inherited weights, video top-1 ({rep.protocol['label']}): " + ", ".join(
        f"{k} {_fmt(v['video_top1'])}" for k, v in comparison.items()))
    unique = len({r["key"] for r in ranked})
    obs = observations(positions, rates, ranked[: cfg.top_k])
    initial = getattr(getattr(model, "gate_config", None), "init_drop_rate", 0.1)
    moved = marg.movement(rates, initial)
    log(moved["verdict"])
    result = {"dataset": manifest["name"], "selection_split": cfg.selection_split,
              "report_split": cfg.report_split, "num_samples": cfg.num_samples,
              "selection_protocol": sel.protocol, "report_protocol": rep.protocol,
              "unique_samples": unique, "seed": cfg.seed, "comparison": comparison,
              "observations": obs, "drop_rate_movement": moved,
              "temporal_use": marg.temporal_use(rates), "opt": opt.to_dict(),
              "bn_recalibration": recal, "top": ranked[: cfg.top_k]}
    files.write_json(os.path.join(out, "summary.json"), result)
    files.write_json(os.path.join(out, "comparison.json"), comparison)
    files.write_json(os.path.join(out, "observations.json"), obs)
    files.write_text(os.path.join(out, "report.md"), _report_md(result, rows))
    log(f"analysis written to {out}")
    return result


def _report_md(r: dict, rows: list[dict]) -> str:
    L = [f"# Probability-space analysis: {r['dataset']}", "",
         f"Strategies sampled: {r['num_samples']} ({r['unique_samples']} unique), seed {r['seed']}. "
         f"Ranked with inherited weights on split `{r['selection_split']}` (selection); "
         f"reported on split `{r['report_split']}`, which played no part in the choice.", "",
         "**Evaluation protocols.** Selection: " + r["selection_protocol"]["label"] + ". "
         "Reporting: " + r["report_protocol"]["label"] + ". Video-level accuracy averages the "
         "softmax of a video's views; clip-level scores each view alone.", "",
         f"**Drop rates.** {r['drop_rate_movement']['verdict']}", "",
         "![marginals](marginals.png)", "",
         f"## Opt vs uniform strategies (inherited weights, reporting split; "
         f"{r['report_protocol']['label']})", "",
         "| strategy | video top-1 | video top-5 | clip top-1 | code |", "|---|---|---|---|---|"]
    for k, v in r["comparison"].items():
        L.append(f"| {k} | {_fmt(v['video_top1'])} | {_fmt(v['video_top5'])} | "
                 f"{_fmt(v['clip_top1'])} | `{v['code']}` |")
    L += ["", "Uniform strategies here reuse the template's weights; stand-alone trained "
          "networks are the generalisation experiment's job.", "",
          f"## Top {len(r['top'])} sampled strategies (selection split; "
          f"{r['selection_protocol']['label']})", "",
          "| rank | sample | video top-1 | clip top-1 | S / ST / S+ST / none | code |",
          "|---|---|---|---|---|---|"]
    for i, t in enumerate(r["top"], 1):
        c = t["counts"]
        L.append(f"| {i} | {t['index']} | {_fmt(t['video_top1'])} | {_fmt(t['clip_top1'])} | "
                 f"{c['S']} / {c['ST']} / {c['S+ST']} / {c['none']} | `{t['code']}` |")
    o = r["observations"]
    L += ["", "## Observations (paper §4.4)", "",
          f"- **I** mean P(S+ST): lower half {_fmt(o['I_fused_lower_vs_upper']['mean_P_S+ST_lower_half'])}%, "
          f"upper half {_fmt(o['I_fused_lower_vs_upper']['mean_P_S+ST_upper_half'])}%; most used unit "
          f"overall: {o['I_fused_lower_vs_upper']['most_used_unit']}.",
          f"- **II** mean P(ST): bottom third {_fmt(o['II_st_in_top_layers']['mean_P_ST_bottom_third'])}%, "
          f"top third {_fmt(o['II_st_in_top_layers']['mean_P_ST_top_third'])}%; share of ST in the "
          f"top strategies' top third: {_fmt(o['II_st_in_top_layers']['topk_share_ST_top_third'])}%.",
          f"- **III** mean P(S) {_fmt(o['III_s_usage']['mean_P_S'])}% (max "
          f"{_fmt(o['III_s_usage']['max_P_S'])}%); share of S units in the top strategies "
          f"{_fmt(o['III_s_usage']['topk_share_S'])}%.", ""]
    rc = r.get("bn_recalibration")
    if rc:
        L += ["## BatchNorm re-calibration (beyond the authors)", "",
              f"Each sampled sub-network re-scored after re-estimating BN statistics on "
              f"{rc['batches']} training batches: Kendall τ = {rc['kendall_tau']:.3f}, Spearman ρ = "
              f"{rc['spearman_rho']:.3f} against the plain ranking; mean change of video top-1 "
              f"{100 * rc['mean_gain']:+.1f} points; best strategy "
              f"{'unchanged' if rc['same_best'] else 'changed to `' + rc['best_code'] + '`'}.", ""]
    L += [
          "## Layer-level marginals (Eq. 7)", "",
          "| position | p_S | p_T | P(S) | P(ST) | P(S+ST) | P(none) |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        L.append(f"| {row['position']} | {row['p_S']:.3f} | {row['p_T']:.3f} | {row['S']:.3f} | "
                 f"{row['ST']:.3f} | {row['S+ST']:.3f} | {row['none']:.3f} |")
    return "\n".join(L) + "\n"
