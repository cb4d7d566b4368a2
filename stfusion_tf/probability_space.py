"""The probability space of any gated network, from Python: marginals, sampling, Opt.

The command line's ``--mode=analyze`` does this for a trained run (with its report,
costs and charts); these functions do the core of it for any Keras model whose
fusion units are ``FusionUnit`` layers with gates (a template of this package or
a user's own network), on any ``tf.data`` dataset of ``(clips, labels)`` batches::

    import stfusion_tf as sf
    rows = sf.marginals(model)                      # P(S), P(ST), P(S+ST), P(none) per position
    result = sf.search(model, val_ds, num_samples=50)
    result.opt                                      # the best sampled FusionStrategy
    net = sf.strategy_network(model, result.opt)    # its gate-free network (package templates)

Scores are clip-level top-1 with the model's inherited weights (the authors' ranking):
each batch element is its own video.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from stfusion_tf.analysis import marginals as marg
from stfusion_tf.analysis import ranking
from stfusion_tf.model.strategy import FusionStrategy
from stfusion_tf.model.template import TemplateGates


def marginals(model) -> list[dict]:
    """Layer-level marginals (Eq. 7) of every position of a gated model: one row per
    position with ``p_S``, ``p_T``, ``S``, ``ST``, ``S+ST``, ``none``."""
    gates = TemplateGates(model)
    return marg.marginals_table(gates.positions, gates.drop_rates())


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """Sampled strategies ranked best first (``rows``) and the best one (``opt``)."""

    rows: list
    opt: FusionStrategy


def _with_video_ids(dataset):
    """(x, y) batches -> (x, y, video id): every clip its own video."""
    counter = tf.Variable(0, dtype=tf.int64, trainable=False)

    def add(x, y):
        n = tf.cast(tf.shape(y)[0], tf.int64)
        start = counter.assign_add(n) - n
        return x, y, tf.range(start, start + n)
    return dataset.map(add)


def search(model, dataset, num_samples: int = 50, seed: int = 0) -> SearchResult:
    """Samples ``num_samples`` strategies from the model's drop rates (positions without a
    residual path always keep a branch) and ranks them by top-1 on ``dataset`` with the
    inherited weights.  The model is left in ``mask`` mode with Opt's masks."""
    gates = TemplateGates(model)
    scorer = ranking.StrategyScorer(model, gates, _with_video_ids(dataset))
    strategies = ranking.sample_strategies(gates.positions, gates.drop_rates(), num_samples, seed,
                                           gates.required())
    rows, seen = [], {}
    for i, st in enumerate(strategies):
        if st.key() not in seen:
            seen[st.key()] = scorer.score(st)
        rows.append({"index": i, "key": st.key(), "code": st.code(), "units": list(st.units),
                     "log_prob": ranking.log_prob(gates.drop_rates(), st.to_mask()),
                     **seen[st.key()]})
    rows.sort(key=ranking.order)
    opt = FusionStrategy(gates.positions, tuple(rows[0]["units"]))
    gates.set_strategy(opt)
    return SearchResult(rows, opt)


def sample(model, num: int, seed: int = 0) -> list[FusionStrategy]:
    """``num`` strategies drawn from a gated model's drop rates (as ``search`` draws them)."""
    gates = TemplateGates(model)
    return ranking.sample_strategies(gates.positions, gates.drop_rates(), num, seed,
                                     gates.required())


__all__ = ["marginals", "search", "sample", "SearchResult"]
