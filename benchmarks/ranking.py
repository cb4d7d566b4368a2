"""Ranking strategies with inherited weights: masks vs plain evaluation vs rebuild-per-strategy.

Prints JSON with, on the same cached selection data and model size:

* ``mask_ranking``: scoring ``--strategies`` sampled strategies through the gates'
  mask variables (one traced function; what ``--mode=analyze`` does);
* ``plain_eval``: the same number of evaluation passes of one fixed model (the floor);
* ``rebuild_per_strategy``: what the authors' code does per strategy -- build a
  fresh model, load the trained weights, set the strategy, evaluate.  Measured on
  ``--rebuild_strategies`` strategies and scaled to ``--strategies``.

    .venv/bin/python benchmarks/ranking.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from stfusion_tf.analysis import ranking  # noqa: E402
from stfusion_tf.data import pipeline, synthetic  # noqa: E402
from stfusion_tf.model import gates as G  # noqa: E402
from stfusion_tf.model import template as T  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--strategies", type=int, default=100)
    ap.add_argument("--rebuild_strategies", type=int, default=10)
    ap.add_argument("--clips", type=int, default=64)
    args = ap.parse_args()
    data = os.path.join(tempfile.gettempdir(), "stfusion_bench_ranking")
    synthetic.prepare_synthetic(data, synthetic.SyntheticSpec(num_train=8, num_val=args.clips, num_test=2),
                                log=lambda *a: None)
    cfg = T.preset(args.preset)
    keras.utils.set_random_seed(0)
    model = T.build_template(cfg, 4)
    gates = T.TemplateGates(model)
    for i, g in enumerate(gates.s + gates.t):
        g.p_logit.assign(-2.5 + 0.05 * i)
    weights = os.path.join(data, "template.weights.h5")
    model.save_weights(weights)
    in_cfg = pipeline.InputConfig(num_frames=cfg.num_frames, crop_size=cfg.crop_size, batch_size=16)
    scorer = ranking.StrategyScorer(model, gates, pipeline.eval_dataset(data, "val", in_cfg))
    strategies = ranking.sample_strategies(gates.positions, gates.drop_rates(), args.strategies, seed=0)
    scorer.score(strategies[0])  # trace once

    t0 = time.perf_counter()
    for st in strategies:
        scorer.score(st)
    t_mask = time.perf_counter() - t0

    fixed = T.build_template(cfg, 4)
    fixed.load_weights(weights)

    @tf.function(reduce_retracing=True)
    def fwd(x):
        return fixed(x, training=False)

    for x, _, _ in scorer.batches:
        fwd(x)
    t0 = time.perf_counter()
    for _ in range(args.strategies):
        for x, _, _ in scorer.batches:
            fwd(x).numpy()
    t_plain = time.perf_counter() - t0

    t0 = time.perf_counter()
    for st in strategies[: args.rebuild_strategies]:
        keras.backend.clear_session()
        m = T.build_template(cfg, 4)
        m.load_weights(weights)
        g = T.TemplateGates(m)
        g.set_strategy(st)
        G.set_inference_mode(g.s + g.t, "mask")

        @tf.function
        def f(x, m=m):
            return m(x, training=False)

        for x, _, _ in scorer.batches:
            f(x).numpy()
    t_rebuild = (time.perf_counter() - t0) / args.rebuild_strategies * args.strategies

    print(json.dumps({
        "strategies": args.strategies, "selection_clips": args.clips, "preset": args.preset,
        "seconds": {"mask_ranking": round(t_mask, 2), "plain_eval": round(t_plain, 2),
                    "rebuild_per_strategy": round(t_rebuild, 2)},
        "mask_vs_plain_eval": round(t_mask / t_plain, 3),
        "rebuild_vs_mask": round(t_rebuild / t_mask, 2),
        "rebuild_measured_on": args.rebuild_strategies,
        "traces_of_scoring_function": scorer.trace_count,
    }, indent=1))


if __name__ == "__main__":
    main()
