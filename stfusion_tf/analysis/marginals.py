"""Layer-level marginals of the fusion units (paper Eq. 7) and their plot.

From the learned drop rates p_S (1x1x1 branch) and p_T (3x1x1 branch) of a
position, the keep probabilities are m = 1 - sqrt(p) (Eq. 7, p-hat = sqrt(p))
and, with independent gates,

    P(S) = m_S (1 - m_T),  P(ST) = (1 - m_S) m_T,  P(S+ST) = m_S m_T,
    P(none) = (1 - m_S)(1 - m_T).

These are the bars of the paper's Fig. 4.  Everything here is plain NumPy so a
table of published drop rates can be checked with the same function.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Sequence

import numpy as np

from stfusion_tf.model.strategy import NONE, S, S_ST, ST, FusionStrategy

COLUMNS = (S, ST, S_ST, NONE)
COLOURS = {S: "#1f77b4", ST: "#2ca02c", S_ST: "#e6b800"}


def keep_probability(drop_rate) -> np.ndarray:
    """Eq. 7: P(unit kept) = 1 - sqrt(p)."""
    p = np.asarray(drop_rate, np.float64)
    if np.any((p < 0) | (p > 1)):
        raise ValueError("drop rates must lie in [0, 1]")
    return 1.0 - np.sqrt(p)


def marginals(drop_rates) -> np.ndarray:
    """[P, 2] drop rates (S branch, T branch) -> [P, 4] P(S), P(ST), P(S+ST), P(none)."""
    p = np.asarray(drop_rates, np.float64)
    if p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"drop_rates must have shape [P, 2], got {p.shape}")
    ms, mt = keep_probability(p[:, 0]), keep_probability(p[:, 1])
    return np.stack([ms * (1 - mt), (1 - ms) * mt, ms * mt, (1 - ms) * (1 - mt)], axis=1)


def marginals_table(positions: Sequence[str], drop_rates) -> list[dict]:
    m = marginals(drop_rates)
    p = np.asarray(drop_rates, np.float64)
    return [{"position": pos, "p_S": float(p[i, 0]), "p_T": float(p[i, 1]),
             **{c: float(m[i, j]) for j, c in enumerate(COLUMNS)}}
            for i, pos in enumerate(positions)]


def to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=list(rows[0].keys()))
    w.writeheader()
    w.writerows(rows)
    return out.getvalue()


def to_json(rows: list[dict]) -> str:
    return json.dumps(rows, indent=1)


def plot(positions: Sequence[str], drop_rates, best: FusionStrategy | None = None,
         title: str = "Layer-level marginals", spread=None) -> bytes:
    """PNG bytes of a Fig. 4 style chart: three bars per position, best strategy dots;
    ``spread`` [P, 3] (e.g. the std over seeds of P(S), P(ST), P(S+ST)) as error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = marginals(drop_rates)
    n = len(positions)
    x = np.arange(n)
    w = 0.27
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * n + 2), 3.2), dpi=110)
    for j, unit in enumerate((S, ST, S_ST)):
        err = None if spread is None else np.asarray(spread)[:, j]
        ax.bar(x + (j - 1) * w, m[:, j], w, color=COLOURS[unit], label=f"P({unit})", yerr=err,
               error_kw={"elinewidth": 0.6, "capsize": 1.5})
    if best is not None:
        for j, unit in enumerate((S, ST, S_ST)):
            idx = [i for i, u in enumerate(best.units) if u == unit]
            ax.plot(x[idx] + (j - 1) * w, np.full(len(idx), 1.02), "o", ms=3.5,
                    color=COLOURS[unit], markeredgecolor="black", markeredgewidth=0.4)
        ax.plot([], [], "o", color="grey", markeredgecolor="black", label="best sampled")
    ax.set_xticks(x)
    ax.set_xticklabels(positions, rotation=90, fontsize=6)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("marginal probability")
    ax.set_title(title, fontsize=9, loc="left", pad=18)
    ax.legend(fontsize=6, ncol=4, loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def movement(drop_rates, initial: float, threshold: float = 1.0) -> dict:
    """Have the drop rates left their initial value?  A gate counts as moved when its
    logit is more than ``threshold`` from the initial one (from p = 0.1: p outside
    [0.039, 0.232]).  If none moved, the marginals show the prior, not the data."""
    p = np.clip(np.asarray(drop_rates, np.float64), 1e-7, 1 - 1e-7)
    logit = np.log(p / (1 - p))
    start = np.log(initial / (1 - initial))
    moved = np.abs(logit - start) > threshold
    n, k = int(moved.size), int(moved.sum())
    lo, hi = float(p.min()), float(p.max())
    if k == 0:
        verdict = (f"No drop rate has left its initial value {initial:g} (all within one logit; "
                   f"range {lo:.2f}-{hi:.2f}): the marginals show the prior, not the data.")
    else:
        verdict = (f"{k} of {n} branch drop rates moved more than one logit from their initial "
                   f"{initial:g} (range {lo:.3f}-{hi:.3f}): the marginals reflect the data.")
    return {"initial": initial, "moved": k, "gates": n, "min": lo, "max": hi, "verdict": verdict}


def warmup_check(warmup_end: dict | None, num_classes: int, margin: float = 1.5) -> str | None:
    """A warning when the warm-up ended with train accuracy below ``margin`` x chance: the
    gates switched on before the template had learned the task, so no data term defended
    any branch and the drop rates follow the regulariser alone (measured: fine motion with
    an 8-epoch warm-up, 1 of 3 seeds, every drop rate -> 0.96-0.99)."""
    if not warmup_end or num_classes < 2:
        return None
    acc, chance = warmup_end["train_accuracy"], 1.0 / num_classes
    if acc >= margin * chance:
        return None
    return (f"The warm-up ended (epoch {warmup_end['epoch']}) at train accuracy {100 * acc:.1f}% "
            f"(chance {100 * chance:.1f}%): the gates switched on before the template had learned "
            "the task, so these drop rates say what the regulariser prefers, not what the data "
            "needs; train again with a longer --warmup_epochs.")


def temporal_use(drop_rates) -> dict:
    """Mean P(ST) + P(S+ST) (= the T branch's keep marginal) overall and in the lower and
    upper half of the positions; and the same for the S branch."""
    p = np.asarray(drop_rates, np.float64)
    keep = keep_probability(p)
    half = len(p) // 2
    return {"T_use": float(keep[:, 1].mean()), "T_use_lower": float(keep[:half, 1].mean()),
            "T_use_upper": float(keep[half:, 1].mean()), "S_use": float(keep[:, 0].mean()),
            "mean_P_S": float(marginals(p)[:, 0].mean())}
