"""``--mode=analyze``: from a trained template to a readable report.

Writes into ``<model_dir>/analysis/``: ``marginals.{json,csv,png}``, ``summary.json``
(everything below in one file, with whether the drop rates moved),
``ranking.jsonl`` (one scored strategy per line, resumable),
``opt_strategy.json`` (the best sampled strategy, a FusionStrategy),
``comparison.json`` (Opt vs uniform S / ST / S+ST on the reporting split),
``observations.json``, ``opt_classes.json`` (Opt's per-class accuracy and
confusion matrix on the reporting split), ``cost_accuracy.png`` (accuracy vs
MACs of every sample, see ``budget``) and ``report.md``; the charts also go to
TensorBoard under ``<model_dir>/tensorboard/analysis``.  With a budget
(``max_gmacs`` / ``max_params``) Opt is the best sample within it.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow as tf

from stfusion_tf import compute, evaluation, files, training
from stfusion_tf.analysis import budget, cost
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
    max_gmacs: float | None = None  # Opt: the best sample within this many GMACs per clip
    max_params: float | None = None  # ... and this many parameters

    def __post_init__(self):
        if self.selection_protocol not in SELECTION_PROTOCOLS:
            raise UserError(f"selection_protocol={self.selection_protocol!r}; valid values: "
                            f"{', '.join(SELECTION_PROTOCOLS)}")
        for name in ("max_gmacs", "max_params"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise UserError(f"{name} must be > 0, got {getattr(self, name)}")
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


def selection_scorer(model, gates, data_dir, input_cfg, cfg: AnalysisConfig, jit_compile=False,
                     recalibrate: bool = False) -> ranking.StrategyScorer:
    """Scores strategies on the selection split (its protocol); with ``recalibrate``,
    BatchNorm statistics re-estimated per sub-network on ``cfg.recalibrate_batches``
    training batches."""
    recal_ds = None
    if recalibrate:
        recal_ds = pipeline.train_dataset(data_dir, cfg.train_split, input_cfg).take(
            cfg.recalibrate_batches)
    return _scorer(model, gates, data_dir, cfg.selection_split, selection_input(input_cfg, cfg),
                   recalibration=recal_ds, jit_compile=compute.resolve_jit(jit_compile))


def _recalibrated_ranking(model, gates, data_dir, input_cfg, cfg, rates, ranked, out, log,
                          jit_compile=False) -> dict:
    """Ranks the same samples with BatchNorm re-estimated per sub-network; compares."""
    from scipy import stats
    scorer = selection_scorer(model, gates, data_dir, input_cfg, cfg, jit_compile, recalibrate=True)
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


def uniform_ranking(model, data_dir: str, model_dir: str, input_cfg: pipeline.InputConfig,
                    cfg: AnalysisConfig, log=print, jit_compile=False) -> list[dict]:
    """Ranks ``cfg.num_samples`` strategies drawn with every drop rate at 0.5 (uniform over
    the whole space) with the template's inherited weights, on the selection split, into
    ``analysis/ranking_uniform.jsonl`` (resumable); the pool of ``fidelity`` "uniform"."""
    gates = TemplateGates(model)
    scorer = selection_scorer(model, gates, data_dir, input_cfg, cfg, jit_compile)
    costs = _template_costs(model)
    return ranking.rank(scorer, gates.positions, np.full_like(gates.drop_rates(), 0.5),
                        cfg.num_samples, cfg.seed,
                        os.path.join(model_dir, "analysis", "ranking_uniform.jsonl"), log=log,
                        cost_fn=costs.row if costs else None)


def fidelity_scoring(model, data_dir: str, model_dir: str, input_cfg: pipeline.InputConfig,
                     cfg: AnalysisConfig, pool: str, recalibrate: bool, jit_compile=False,
                     log=print) -> tuple:
    """What ``--mode=fidelity`` needs of a trained template: (the uniform pool's ranking
    when ``pool == "uniform"``, else None; a function strategy -> BN re-calibrated
    selection accuracy when ``recalibrate``, else None)."""
    ranked = recalibrated = None
    if pool == "uniform":
        ranked = uniform_ranking(model, data_dir, model_dir, input_cfg, cfg, log=log,
                                 jit_compile=jit_compile)
    if recalibrate:
        scorer = selection_scorer(model, TemplateGates(model), data_dir, input_cfg, cfg,
                                  jit_compile, recalibrate=True)

        def recalibrated(strategy):
            return scorer.score(strategy)["video_top1"]
    return ranked, recalibrated


def _movement(model, model_dir: str, rates) -> dict:
    """Whether the drop rates moved, and a warning when the warm-up ended before the
    template had learned (``train_summary.json``'s ``warmup_end``)."""
    initial = getattr(getattr(model, "gate_config", None), "init_drop_rate", 0.1)
    moved = marg.movement(rates, initial)
    warning = marg.warmup_check(training.recorded_warmup_end(model_dir),
                                int(model.output_shape[-1]))
    if warning:
        moved["warmup_warning"] = warning
        moved["verdict"] += " " + warning
    return moved


def _template_costs(model) -> cost.TemplateCosts | None:
    """Costs of the template's strategies; None for a functional model saved by an older
    version (no architecture config)."""
    return cost.costs_of(model)


def _images(model_dir: str, out: str, pngs: dict) -> None:
    """Writes each chart to ``analysis/<name>.png`` and TensorBoard (``analysis``)."""
    writer = tf.summary.create_file_writer(os.path.join(model_dir, "tensorboard", "analysis"))
    with writer.as_default(step=0):
        for name, (file, png) in pngs.items():
            if file:
                files.write_text(os.path.join(out, file), png)
            tf.summary.image(name, tf.io.decode_png(png)[None])
    writer.flush()


def _compare(rep, opt: FusionStrategy, costs, label_map) -> tuple[dict, dict]:
    """Opt and the uniform strategies on the reporting split; Opt's per-class report."""
    acc = rep.accumulate(opt.to_mask())
    comparison = {"Opt": {"code": opt.code(), **(costs.row(opt) if costs else {}),
                          **rep.result(acc)}}
    for unit in (S_ST, S, ST):
        st = FusionStrategy.uniform(opt.positions, unit)
        comparison[unit] = {"code": st.code(), **(costs.row(st) if costs else {}), **rep.score(st)}
    return comparison, acc.classes(label_map)


def analyze(model, data_dir: str, model_dir: str, input_cfg: pipeline.InputConfig,
            cfg: AnalysisConfig, log=print, jit_compile=False) -> dict:
    """Marginals, ranking, Opt vs uniform strategies and the report of a trained template,
    in the current precision policy; ``jit_compile`` (a bool or ``ComputeConfig``'s
    "auto" / "true" / "false"): XLA for strategy scoring."""
    jit_compile = compute.resolve_jit(jit_compile)
    out = os.path.join(model_dir, "analysis")
    os.makedirs(out, exist_ok=True)
    manifest = records.read_manifest(data_dir)
    for split in (cfg.selection_split, cfg.report_split):
        records.split_size(manifest, split)
    gates = TemplateGates(model)
    positions, rates = gates.positions, gates.drop_rates()
    costs = _template_costs(model)
    budget.check_feasible(costs, positions, rates, cfg, gates.required())  # before any scoring
    rows = marg.marginals_table(positions, rates)
    files.write_text(os.path.join(out, "marginals.json"), marg.to_json(rows))
    files.write_text(os.path.join(out, "marginals.csv"), marg.to_csv(rows))

    sel = selection_scorer(model, gates, data_dir, input_cfg, cfg, jit_compile)
    ranked = ranking.rank(sel, positions, rates, cfg.num_samples, cfg.seed,
                          os.path.join(out, "ranking.jsonl"), log=log,
                          cost_fn=costs.row if costs else None)
    opt_row = budget.select(ranked, cfg)
    opt = FusionStrategy(positions, tuple(opt_row["units"]))
    opt.save(os.path.join(out, "opt_strategy.json"))
    recal = None
    if cfg.recalibrate_batches > 0:
        recal = _recalibrated_ranking(model, gates, data_dir, input_cfg, cfg, rates, ranked, out,
                                      log, jit_compile)
    pngs = {"marginals_with_opt": ("marginals.png", marg.plot(
        positions, rates, best=opt, title=f"{manifest['name']}: layer-level marginals (bars) and "
        "best sampled strategy (dots)"))}
    rep = _scorer(model, gates, data_dir, cfg.report_split, input_cfg, jit_compile=jit_compile)
    comparison, classes = _compare(rep, opt, costs, manifest["label_map"])
    pngs["opt_confusion_matrix"] = (None, evaluation.plot_confusion(
        classes, f"Opt on {cfg.report_split}: confusion matrix (video level)"))
    cost_section = None
    if costs is not None:
        known = {tuple(FusionStrategy.uniform(positions, u).units): comparison[u]["video_top1"]
                 for u in (S_ST, S, ST)}
        known[opt.units] = comparison["Opt"]["video_top1"]  # scored by _compare already
        cost_section, png = budget.cost_report(sel, rep, ranked, opt_row, costs, cfg, known)
        pngs["accuracy_vs_macs"] = ("cost_accuracy.png", png)
    _images(model_dir, out, pngs)
    log(f"reporting split, inherited weights, video top-1 ({rep.protocol['label']}): " + ", ".join(
        f"{k} {_fmt(v['video_top1'])}" for k, v in comparison.items()))
    obs = observations(positions, rates, ranked[: cfg.top_k])
    moved = _movement(model, model_dir, rates)
    log(moved["verdict"])
    result = {"dataset": manifest["name"], "selection_split": cfg.selection_split,
              "report_split": cfg.report_split, "num_samples": cfg.num_samples,
              "selection_protocol": sel.protocol, "report_protocol": rep.protocol,
              "unique_samples": len({r["key"] for r in ranked}), "seed": cfg.seed,
              "comparison": comparison, "observations": obs, "drop_rate_movement": moved,
              "temporal_use": marg.temporal_use(rates), "opt": opt.to_dict(),
              "bn_recalibration": recal, "top": ranked[: cfg.top_k], "cost": cost_section,
              "worst_classes": evaluation.worst_classes(classes),
              "mean_class_accuracy": classes["mean_class_accuracy"]}
    files.write_json(os.path.join(out, "summary.json"), result)
    files.write_json(os.path.join(out, "comparison.json"), comparison)
    files.write_json(os.path.join(out, "observations.json"), obs)
    files.write_json(os.path.join(out, "opt_classes.json"), classes)
    files.write_text(os.path.join(out, "report.md"), _report_md(result, rows))
    log(f"analysis written to {out}")
    return result


def _gmacs(row: dict) -> str:
    return f"{row['macs'] / 1e9:.3g}" if "macs" in row else "–"


def _params(row: dict) -> str:
    return f"{row['params']:,}" if "params" in row else "–"


def _classes_md(r: dict) -> list[str]:
    worst = r.get("worst_classes") or []
    L = ["", f"## Worst classes (Opt, split `{r['report_split']}`, video level)", "",
         f"Mean class accuracy {_fmt(r['mean_class_accuracy'])}; per-class accuracy and the "
         "confusion matrix are in `opt_classes.json`.", "",
         "| class | videos | accuracy | most often predicted instead |", "|---|---|---|---|"]
    for c in worst:
        L.append(f"| {c['class']} | {c['videos']} | {_fmt(c['accuracy'])} | "
                 f"{c['confused_with'] or '–'} |")
    return L


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
         "| strategy | video top-1 | video top-5 | clip top-1 | GMACs | params | code |",
         "|---|---|---|---|---|---|---|"]
    for k, v in r["comparison"].items():
        L.append(f"| {k} | {_fmt(v['video_top1'])} | {_fmt(v['video_top5'])} | "
                 f"{_fmt(v['clip_top1'])} | {_gmacs(v)} | {_params(v)} | `{v['code']}` |")
    L += ["", "Uniform strategies here reuse the template's weights; stand-alone trained "
          "networks are the generalisation experiment's job.", "",
          f"## Top {len(r['top'])} sampled strategies (selection split; "
          f"{r['selection_protocol']['label']})", "",
          "| rank | sample | video top-1 | clip top-1 | GMACs | S / ST / S+ST / none | code |",
          "|---|---|---|---|---|---|---|"]
    for i, t in enumerate(r["top"], 1):
        c = t["counts"]
        L.append(f"| {i} | {t['index']} | {_fmt(t['video_top1'])} | {_fmt(t['clip_top1'])} | "
                 f"{_gmacs(t)} | {c['S']} / {c['ST']} / {c['S+ST']} / {c['none']} | `{t['code']}` |")
    if r.get("cost"):
        L += [""] + budget.markdown(r["cost"], r["selection_split"], r["report_split"])
    L += _classes_md(r)
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
