"""Strategy choice under a compute budget (beyond the paper).

The paper reports each strategy's FLOPs beside its accuracy, but picks Opt as
the most accurate sample whatever it costs.  Here every ranked strategy carries
its MACs and parameters (``cost.TemplateCosts``), and:

* ``select``: Opt is the most accurate sampled strategy within ``max_gmacs``
  and/or ``max_params`` (the unconstrained best is kept beside it);
* ``check_feasible``: before any scoring, a budget no sampled strategy meets
  stops the run with the cheapest sample's cost in the message;
* ``cost_report``: accuracy against MACs of all sampled strategies with the
  Pareto front and the uniform S / ST / S+ST networks (scored on the selection
  split like the samples), and for the budget of each uniform network the best
  sampled strategy at that cost, both also scored on the reporting split.
"""

from __future__ import annotations

from stfusion_tf.analysis import cost
from stfusion_tf.analysis import ranking
from stfusion_tf.errors import UserError
from stfusion_tf.model.strategy import S, S_ST, ST, FusionStrategy


def budgeted(cfg) -> bool:
    return cfg.max_gmacs is not None or cfg.max_params is not None


def describe(cfg) -> str:
    parts = []
    if cfg.max_gmacs is not None:
        parts.append(f"<= {cfg.max_gmacs:g} GMACs")
    if cfg.max_params is not None:
        parts.append(f"<= {cfg.max_params:,.0f} parameters")
    return " and ".join(parts) or "none"


def check_feasible(costs: cost.TemplateCosts | None, positions, rates, cfg,
                   required=None) -> None:
    """Raises ``UserError`` unless some strategy the ranking will sample fits the budget."""
    if not budgeted(cfg):
        return
    if costs is None:
        raise UserError("--max_gmacs / --max_params need the template's architecture, which "
                        "this saved model lacks (saved by an older version); retrain with "
                        "--mode=train")
    rows = [costs.row(s) for s in
            ranking.sample_strategies(positions, rates, cfg.num_samples, cfg.seed, required)]
    if not any(cost.fits(r, cfg.max_gmacs, cfg.max_params) for r in rows):
        cheap = min(rows, key=lambda r: (r["macs"], r["params"]))
        raise UserError(f"no sampled strategy fits the budget ({describe(cfg)}): the cheapest of "
                        f"the {len(rows)} samples needs {cheap['macs'] / 1e9:.4g} GMACs and "
                        f"{cheap['params']:,} parameters; raise --max_gmacs / --max_params or "
                        "sample more with --num_samples")


def select(ranked: list[dict], cfg) -> dict:
    """The best ranked row within the budget (rows sorted best first)."""
    return next(r for r in ranked if not budgeted(cfg) or
                cost.fits(r, cfg.max_gmacs, cfg.max_params))


def _brief(row: dict) -> dict:
    return {k: row[k] for k in ("index", "code", "macs", "params", "video_top1", "clip_top1")
            if k in row}


def cost_report(sel, rep, ranked: list[dict], opt_row: dict, costs: cost.TemplateCosts,
                cfg, reported: dict | None = None) -> tuple[dict, bytes]:
    """(the cost section of the analysis summary, the accuracy-vs-MACs chart as PNG).

    ``reported`` maps a strategy's units (tuple) to its video top-1 on the reporting
    split where the caller already scored it; only the others are scored here."""
    positions = costs.positions
    unique = [r for r in ranked if "duplicate_of" not in r]
    uniform = {}
    for unit in (S, ST, S_ST):
        st = FusionStrategy.uniform(positions, unit)
        uniform[unit] = {"code": st.code(), **costs.row(st), **sel.score(st)}
    reported = dict(reported or {})

    def on_report(units) -> float:
        key = tuple(units)
        if key not in reported:
            reported[key] = rep.score(FusionStrategy(positions, key))["video_top1"]
        return reported[key]

    at_budgets = []
    for unit, u in uniform.items():
        best = cost.best_within(unique, u["macs"])
        at_budgets.append({
            "unit": unit, "macs": u["macs"], "params": u["params"],
            "video_top1": u["video_top1"], "report_video_top1": on_report([unit] * len(positions)),
            "best": None if best is None else {**_brief(best),
                                                "report_video_top1": on_report(best["units"])}})
    front = cost.pareto_front([(r["macs"], r["video_top1"]) for r in unique])
    section = {
        "budget": {"max_gmacs": cfg.max_gmacs, "max_params": cfg.max_params} if budgeted(cfg)
        else None,
        "opt": _brief(opt_row), "unconstrained_opt": _brief(ranked[0]),
        "within_budget": sum(cost.fits(r, cfg.max_gmacs, cfg.max_params) for r in unique),
        "unique_samples": len(unique),
        "uniform": {k: _brief(v) for k, v in uniform.items()},
        "at_uniform_budgets": at_budgets,
        "pareto_front": [_brief(unique[i]) for i in front],
    }
    png = cost.plot(unique, uniform, cfg.max_gmacs, opt_key=opt_row["key"],
                    title=f"accuracy vs cost of {len(unique)} sampled strategies "
                          f"(inherited weights, split {cfg.selection_split})")
    return section, png


def _g(macs) -> str:
    return f"{macs / 1e9:.3g}"


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def markdown(section: dict, selection_split: str, report_split: str) -> list[str]:
    """The report's cost section."""
    opt, free = section["opt"], section["unconstrained_opt"]
    L = ["## Cost and accuracy (beyond the paper)", "",
         "MACs: multiply-accumulates of the convolutions and the classifier for one clip "
         "(FLOPs are about twice that); parameters: the gate-free network's trainable ones.", "",
         "![accuracy vs MACs](cost_accuracy.png)", ""]
    if section["budget"]:
        b = section["budget"]
        limit = " and ".join(x for x in (
            f"{b['max_gmacs']:g} GMACs" if b["max_gmacs"] is not None else "",
            f"{b['max_params']:,.0f} parameters" if b["max_params"] is not None else "") if x)
        L += [f"**Budget** {limit}: {section['within_budget']} of {section['unique_samples']} "
              f"unique samples fit. Opt within it: sample {opt['index']}, {_g(opt['macs'])} GMACs, "
              f"{opt['params']:,} parameters, video top-1 {_pct(opt['video_top1'])} on "
              f"`{selection_split}`; without the budget: sample {free['index']}, "
              f"{_g(free['macs'])} GMACs, {_pct(free['video_top1'])}.", ""]
    L += [f"At the cost of each uniform network, the best sampled strategy (video top-1 on "
          f"`{selection_split}` / `{report_split}`):", "",
          "| uniform | GMACs | params | top-1 | best sample at that cost | GMACs | params "
          "| top-1 |",
          "|---|---|---|---|---|---|---|---|"]
    for row in section["at_uniform_budgets"]:
        b = row["best"]
        best = ("none of the samples | – | – | –" if b is None else
                f"{b['index']}: `{b['code']}` | {_g(b['macs'])} | {b['params']:,} | "
                f"{_pct(b['video_top1'])} / {_pct(b['report_video_top1'])}")
        L.append(f"| {row['unit']} | {_g(row['macs'])} | {row['params']:,} | "
                 f"{_pct(row['video_top1'])} / {_pct(row['report_video_top1'])} | {best} |")
    L += ["", "Pareto front (no sample is both cheaper and more accurate): " + ", ".join(
        f"{r['index']} ({_g(r['macs'])} GMACs, {_pct(r['video_top1'])})"
        for r in section["pareto_front"]) + ".", ""]
    return L
