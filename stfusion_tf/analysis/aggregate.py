"""``--mode=aggregate``: the probability space over several training seeds.

Which branch a position keeps can depend on the seed (inside a dense layer the
S and T branches are summed before one BatchNorm, and a T branch can stand in
for an S branch), so one run's marginals and Opt are a sample.  This module
takes runs of the same template on the same data (each analysed with
``--mode=analyze``) and writes, into ``<out>/``:

* ``marginals.json`` / ``marginals.csv``: per position, the mean and standard
  deviation over runs of p_S, p_T, P(S), P(ST), P(S+ST), P(none);
* ``consensus_strategy.json``: per position the unit most runs' Opt chose (a
  FusionStrategy), with the share of runs that agree;
* ``marginals.png``: the Fig. 4 chart of the mean marginals with the spread as
  error bars and the consensus Opt as dots;
* ``aggregate.md``: both tables and each run's Opt.
"""

from __future__ import annotations

import collections
import os

import numpy as np

from stfusion_tf import files
from stfusion_tf.analysis import marginals as marg
from stfusion_tf.errors import UserError
from stfusion_tf.model.strategy import S_ST, UNIT_LETTERS, FusionStrategy


def load_run(run_dir: str) -> dict:
    """Positions, drop rates and Opt of one analysed run."""
    summary = os.path.join(run_dir, "analysis", "summary.json")
    table = os.path.join(run_dir, "analysis", "marginals.json")
    if not (os.path.exists(summary) and os.path.exists(table)):
        raise UserError(f"{run_dir} has no analysis; run --mode=analyze --model_dir={run_dir}")
    rows = files.read_json(table)
    opt = files.read_json(summary)["opt"]
    return {"run": run_dir, "positions": [r["position"] for r in rows],
            "drop_rates": np.array([[r["p_S"], r["p_T"]] for r in rows]),
            "opt": FusionStrategy(tuple(opt["positions"]), tuple(opt["units"]))}


def consensus(strategies: list[FusionStrategy]) -> tuple[FusionStrategy, list[float]]:
    """Per position the most frequent unit (ties go to S+ST, the prior's unit) and the
    share of strategies that chose it."""
    units, agree = [], []
    for i in range(len(strategies[0])):
        counts = collections.Counter(s.units[i] for s in strategies)
        best = max(counts.values())
        tied = [u for u, c in counts.items() if c == best]
        unit = S_ST if S_ST in tied else sorted(tied)[0]
        units.append(unit)
        agree.append(best / len(strategies))
    return FusionStrategy(strategies[0].positions, tuple(units)), agree


def aggregate(run_dirs, out_dir: str | None = None, title: str = "") -> dict:
    """Mean ± std marginals of analysed runs and their consensus Opt, written to
    ``out_dir`` (default: ``aggregate`` beside the first run)."""
    out_dir = out_dir or os.path.join(os.path.dirname(run_dirs[0].rstrip("/")), "aggregate")
    runs = [load_run(d) for d in run_dirs]
    if len(runs) < 2:
        raise UserError("--mode=aggregate needs at least two analysed runs (--runs=DIR,DIR,...)")
    positions = runs[0]["positions"]
    if any(r["positions"] != positions for r in runs):
        raise UserError("the runs have different fusion positions: aggregate runs of one template")
    rates = np.stack([r["drop_rates"] for r in runs])
    m = np.stack([marg.marginals(r) for r in rates])
    best, agree = consensus([r["opt"] for r in runs])
    rows = [{"position": pos, "p_S": _ms(rates[:, i, 0]), "p_T": _ms(rates[:, i, 1]),
             **{c: _ms(m[:, i, j]) for j, c in enumerate(marg.COLUMNS)},
             "consensus_unit": best.units[i], "agreement": agree[i]}
            for i, pos in enumerate(positions)]
    use = [marg.temporal_use(r) for r in rates]
    result = {"runs": list(run_dirs), "out_dir": out_dir, "positions": positions, "rows": rows,
              "temporal_use": {k: _ms([u[k] for u in use]) for k in use[0]},
              "consensus": best.to_dict(), "opts": [r["opt"].code() for r in runs]}
    os.makedirs(out_dir, exist_ok=True)
    files.write_json(os.path.join(out_dir, "marginals.json"), result)
    files.write_text(os.path.join(out_dir, "marginals.csv"), marg.to_csv(
        [{"position": r["position"], **{f"{k}_mean": r[k][0] for k in ("p_S", "p_T", *marg.COLUMNS)},
          **{f"{k}_std": r[k][1] for k in ("p_S", "p_T", *marg.COLUMNS)},
          "consensus_unit": r["consensus_unit"], "agreement": r["agreement"]} for r in rows]))
    best.save(os.path.join(out_dir, "consensus_strategy.json"))
    files.write_text(os.path.join(out_dir, "marginals.png"), marg.plot(
        positions, rates.mean(0), best=best, spread=m.std(0)[:, :3],
        title=title or f"mean marginals over {len(runs)} runs (bars: std), consensus Opt (dots)"))
    files.write_text(os.path.join(out_dir, "aggregate.md"), _markdown(result, len(runs)))
    return result


def summary_line(result: dict) -> str:
    tu = result["temporal_use"]["T_use"]
    return (f"[aggregate] {result['out_dir']}/aggregate.md: {len(result['runs'])} runs; "
            f"T-branch use {tu[0]:.3f} ± {tu[1]:.3f}; consensus Opt "
            f"{result['consensus']['code']}")


def _ms(values) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std())


def _markdown(r: dict, n: int) -> str:
    tu = r["temporal_use"]
    lines = [f"# Probability space over {n} runs", "",
             f"T-branch use (mean P(ST) + P(S+ST)): {tu['T_use'][0]:.3f} ± {tu['T_use'][1]:.3f}; "
             f"lower half {tu['T_use_lower'][0]:.3f}, upper half {tu['T_use_upper'][0]:.3f}. "
             f"Mean P(S) {tu['mean_P_S'][0]:.3f} ± {tu['mean_P_S'][1]:.3f}.", "",
             "![marginals](marginals.png)", "",
             f"Consensus Opt: `{r['consensus']['code']}`; each run's Opt: "
             + ", ".join(f"`{c}`" for c in r["opts"]), "",
             "| position | p_S | p_T | P(S) | P(ST) | P(S+ST) | consensus | agreement |",
             "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        cells = " | ".join(f"{row[k][0]:.3f} ± {row[k][1]:.3f}" for k in ("p_S", "p_T", "S", "ST", "S+ST"))
        lines.append(f"| {row['position']} | {cells} | {UNIT_LETTERS[row['consensus_unit']]} | "
                     f"{100 * row['agreement']:.0f}% |")
    return "\n".join(lines) + "\n"
