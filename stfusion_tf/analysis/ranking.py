"""Network level: sample fusion strategies from the learned gates and rank them
with inherited weights (no retraining).

Sampling follows the authors' selection code: each branch gate is dropped with
its learned probability p (hard Bernoulli, keep = 1 - p), independently per gate
and per strategy.  (The layer-level marginals use Eq. 7, 1 - sqrt(p); the two
differ by design in the paper.)

Scoring feeds each strategy's keep mask into the trained template through the
gates' mask variables inside one ``tf.function``: no model rebuild, no retrace.
The classifier's feature gate runs deterministically (x * (1 - p)).  The
selection split is preprocessed once and cached in memory when it fits in
``cache_bytes`` (else re-read for every strategy; evaluation preprocessing is
deterministic, so every strategy is scored on identical views either way).
Scores carry the evaluation protocol they were measured with, and a ranking
resumed under another protocol starts again.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from stfusion_tf import evaluation
from stfusion_tf import files
from stfusion_tf.model import gates as gates_lib
from stfusion_tf.model.strategy import FusionStrategy
from stfusion_tf.model.template import TemplateGates

#: Largest selection split (decoded views) kept in memory between strategies.
CACHE_BYTES = 2 ** 31


#: Keep masks of the three units that keep a branch: S, ST, S+ST.
_KEPT = np.array([[1, 0], [0, 1], [1, 1]], np.float32)


def kept_unit_probabilities(drop_rates) -> np.ndarray:
    """[P, 3] P(S), P(ST), P(S+ST) given that at least one branch is kept."""
    p = np.asarray(drop_rates, np.float64)
    ks, kt = 1.0 - p[:, 0], 1.0 - p[:, 1]
    w = np.stack([ks * p[:, 1], p[:, 0] * kt, ks * kt], 1)
    return w / np.maximum(w.sum(1, keepdims=True), 1e-300)


def sample_masks(drop_rates, num: int, seed: int, required=None) -> np.ndarray:
    """[num, P, 2] keep masks with P(keep) = 1 - p per gate; reproducible per seed.

    ``required`` (bool [P]): positions that must keep a branch (no residual path:
    a DenseNet layer, a MobileNetV2 block that changes width or stride).  There a
    draw with both branches dropped is replaced by one from the gates' distribution
    given that a branch is kept, so every sample is a network that can be built.
    """
    p = np.asarray(drop_rates, np.float64)
    rng = np.random.default_rng(seed)
    masks = (rng.uniform(size=(num,) + p.shape) >= p).astype(np.float32)
    if required is None or not np.any(required):
        return masks
    cum = np.cumsum(kept_unit_probabilities(p), 1)
    choice = np.minimum((rng.uniform(size=(num, len(p), 1)) > cum[None]).sum(-1), 2)
    redraw = (masks.sum(-1) == 0) & np.asarray(required, bool)[None, :]
    masks[redraw] = _KEPT[choice[redraw]]
    return masks


def sample_strategies(positions, drop_rates, num: int, seed: int,
                      required=None) -> list[FusionStrategy]:
    return [FusionStrategy.from_mask(positions, m)
            for m in sample_masks(drop_rates, num, seed, required)]


class StrategyScorer:
    """Scores keep masks on a fixed, cached evaluation dataset.

    ``trace_count`` counts Python traces of the scoring function; it stays 1 per
    input signature however many strategies are scored.
    """

    def __init__(self, model, gates: TemplateGates, dataset, recalibration=None,
                 protocol: dict | None = None, cache_bytes: int = CACHE_BYTES,
                 jit_compile: bool = False):
        """``recalibration``: training clips (a dataset of (x, y) batches) used to
        re-estimate BatchNorm statistics of each sub-network before scoring it;
        None keeps the template's statistics, as the authors did.  ``protocol``
        (``pipeline.protocol``) is what ``dataset``'s views are.  ``jit_compile``:
        XLA for the scoring function (``compute.resolve_jit``)."""
        self.model = model
        self.gates = gates
        self.trace_count = 0
        self.protocol = protocol
        self.recal_batches = [x for x, _ in recalibration] if recalibration is not None else []
        self.bns = [l for l in model._flatten_layers(include_self=False, recursive=True)
                    if isinstance(l, keras.layers.BatchNormalization)]
        self.dataset = dataset
        self.batches = self._cache(dataset, cache_bytes)
        gates_lib.set_inference_mode(gates.s + gates.t, "mask")
        if gates.head is not None:
            gates_lib.set_inference_mode([gates.head], "expected")

        @tf.function(reduce_retracing=True, jit_compile=jit_compile)
        def _forward(mask, x):
            self.trace_count += 1
            self.gates.set_mask(tf.unstack(tf.reshape(mask, [-1, 2])))
            logits = tf.cast(self.model(x, training=False), tf.float32)
            return tf.nn.softmax(logits, axis=-1)

        @tf.function(reduce_retracing=True)
        def _bn_update(mask, x):
            self.gates.set_mask(tf.unstack(tf.reshape(mask, [-1, 2])))
            self.model(x, training=True)

        self._forward = _forward
        self._bn_update = _bn_update

    @staticmethod
    def _cache(dataset, cache_bytes: int):
        """The split's batches, or None when they exceed ``cache_bytes`` (then streamed)."""
        batches, size = [], 0
        for x, y, v in dataset:
            size += int(np.prod(x.shape)) * x.dtype.size
            if size > cache_bytes:
                return None
            batches.append((x, y.numpy(), v.numpy()))
        if not batches:
            raise ValueError("selection split is empty")
        return batches

    def _recalibrate(self, mask):
        """Re-estimates moving BN statistics on the recalibration clips.

        Moving averages restart from zero; after K batches with momentum m they
        are divided by (1 - m^K), which removes the bias of the zero start.
        """
        for bn in self.bns:
            bn.moving_mean.assign(tf.zeros_like(bn.moving_mean))
            bn.moving_variance.assign(tf.zeros_like(bn.moving_variance))
        for x in self.recal_batches:
            self._bn_update(mask, x)
        k = len(self.recal_batches)
        for bn in self.bns:
            debias = 1.0 - bn.momentum ** k
            bn.moving_mean.assign(bn.moving_mean / debias)
            bn.moving_variance.assign(bn.moving_variance / debias)

    def score_mask(self, mask) -> dict:
        return self.result(self.accumulate(mask))

    def result(self, acc: evaluation.Accumulator) -> dict:
        """Accuracies of an ``accumulate`` pass, labelled with the protocol."""
        result = acc.result()
        return {"protocol": self.protocol, **result} if self.protocol is not None else result

    def accumulate(self, mask) -> evaluation.Accumulator:
        """Per-video scores of every view with keep mask ``mask``."""
        mask = tf.convert_to_tensor(np.asarray(mask, np.float32))
        saved = None
        if self.recal_batches:
            saved = [(np.asarray(b.moving_mean), np.asarray(b.moving_variance)) for b in self.bns]
            self._recalibrate(mask)
        acc = evaluation.Accumulator()
        try:
            for x, y, v in (self.batches if self.batches is not None else self.dataset):
                acc.update(self._forward(mask, x).numpy(), y, v)
        finally:
            if saved is not None:
                for b, (m, v) in zip(self.bns, saved):
                    b.moving_mean.assign(m)
                    b.moving_variance.assign(v)
        return acc

    def score(self, strategy: FusionStrategy) -> dict:
        return self.score_mask(strategy.to_mask())


def _fingerprint(drop_rates, seed, num, protocol=None, required=None) -> str:
    h = hashlib.sha256(np.asarray(drop_rates, np.float64).round(8).tobytes())
    h.update(f"{seed}:{num}".encode())
    if required is not None:  # which positions must keep a branch changes the samples
        h.update(b"required:" + np.asarray(required, bool).tobytes())
    if protocol is not None:
        h.update(protocol["label"].encode())
    return h.hexdigest()[:16]


def rank(scorer: StrategyScorer, positions, drop_rates, num: int, seed: int,
         jsonl_path: str, log: Callable = print, cost_fn: Callable | None = None) -> list[dict]:
    """Samples ``num`` strategies and scores each; results are appended to
    ``jsonl_path`` as they come, and an interrupted run resumes where it stopped.

    Duplicate samples are recognised and not scored twice.  ``cost_fn(strategy)``
    (e.g. ``cost.TemplateCosts.row``) adds ``macs`` and ``params`` to every row,
    also to rows a previous version wrote without them.  Returns all rows sorted
    best first (``order``).
    """
    required = scorer.gates.required()
    fp = _fingerprint(drop_rates, seed, num, scorer.protocol, required)
    rows, torn = files.read_jsonl(jsonl_path)  # a torn line's strategy is scored again
    done = {row["index"]: row for row in rows if row.get("fingerprint") == fp}
    costless = [r for r in done.values() if (cost_fn and "macs" not in r) or "log_prob" not in r]
    for row in costless:
        st = FusionStrategy(tuple(positions), tuple(row["units"]))
        row.update(cost_fn(st) if cost_fn else {}, log_prob=log_prob(drop_rates, st.to_mask()))
    if torn or len(done) < len(rows) or costless:
        # Stale rows from other drop rates/seed, a torn line or rows without costs: rewrite.
        files.rewrite_jsonl(jsonl_path, done.values())
    if done:
        log(f"resuming ranking: {len(done)}/{num} strategies already scored")
    strategies = sample_strategies(positions, drop_rates, num, seed, required)
    by_key = {row["key"]: row for row in done.values() if "duplicate_of" not in row}
    with files.JsonlAppender(jsonl_path) as f:
        for i, st in enumerate(strategies):
            if i in done:
                continue
            key = st.key()
            if key in by_key:
                row = dict(by_key[key], index=i, duplicate_of=by_key[key]["index"])
            else:
                score = scorer.score(st)
                if "protocol" in score:  # one line per strategy: the label says it
                    score["protocol"] = score["protocol"]["label"]
                row = {"index": i, "key": key, "code": st.code(), "units": list(st.units),
                       "counts": st.counts(), "fingerprint": fp,
                       "log_prob": log_prob(drop_rates, st.to_mask()),
                       **(cost_fn(st) if cost_fn else {}), **score}
                by_key[key] = row
            f.append(row)
            done[i] = row
            if (i + 1) % 10 == 0 or i + 1 == num:
                log(f"ranked {i + 1}/{num}")
    rows = [done[i] for i in range(num)]
    return sorted(rows, key=order)


def order(row: dict) -> tuple:
    """Best first: video top-1, then clip top-1; among ties the strategy the learned drop
    rates make most probable (``log_prob``), then fewer MACs, then the sample index.

    Why probability before cost: on a small selection split several samples tie, and the
    cheapest of them is the one that drops a branch the template learned to keep (it
    lost nothing *with inherited weights*).  Measured on the demo's resnet_tiny template:
    S|F|T|S and F|F|T|S tied at 99.2 on val; trained stand-alone (3 seeds) the cheaper
    S|F|T|S reached 70.6 +- 19.3, the more probable F|F|T|S 88.3 +- 2.7 (S+ST 89.1 +- 0.8).
    Budgets (``--max_gmacs``) still choose by cost."""
    return (-row["video_top1"], -row["clip_top1"], -row.get("log_prob", 0.0),
            row.get("macs", 0), row["index"])


def log_prob(drop_rates, mask) -> float:
    """log P(strategy) under the gates' independent Bernoulli draws (keep = 1 - p)."""
    p = np.clip(np.asarray(drop_rates, np.float64), 1e-12, 1 - 1e-12)
    m = np.asarray(mask, np.float64)
    return float(np.sum(m * np.log1p(-p) + (1 - m) * np.log(p)))
