"""Training-step throughput of the template (and 3D backbones) vs a plain Conv3D, in one run.

Prints one JSON object: for each case the clips/s of a full training step
(forward, backward, SGD update; v-DropPath gates on), the analytic FLOPs of that
step (2 x MACs of every conv/dense forward, x3 for forward + backward) and the
achieved FLOP/s; the reference is a single 3x3x3 Conv3D layer trained the same
way, which shows what this TF build reaches on this CPU for dense 3D convolution.

    .venv/bin/python benchmarks/train_step.py                 # small + full preset
    .venv/bin/python benchmarks/train_step.py --cases small   # quicker
    .venv/bin/python benchmarks/train_step.py --cases resnet50,mobilenetv2   # backbones (S+ST)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from stfusion_tf.model import backbones as B  # noqa: E402
from stfusion_tf.model import gates as G  # noqa: E402
from stfusion_tf.model import template as T  # noqa: E402
from stfusion_tf.model.layers3d import DepthwiseConv3D  # noqa: E402

_CONVS = (keras.layers.Conv3D, DepthwiseConv3D)


def forward_flops(model) -> float:
    """2 x multiply-accumulates of every Conv3D / Dense in a forward pass (batch 1)."""
    total = 0
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.Conv3D):
            out = layer._stfusion_out_shape
            k = np.prod(layer.kernel_size) * layer.kernel.shape[-2]
            total += 2 * np.prod(out[1:]) * k
        elif isinstance(layer, DepthwiseConv3D):
            total += 2 * np.prod(layer._stfusion_out_shape[1:]) * layer.kernel_size ** 2
        elif isinstance(layer, keras.layers.Dense):
            total += 2 * layer.kernel.shape[0] * layer.kernel.shape[1]
    return float(total)


def _record_shapes(model, x):
    """Runs one forward pass recording each Conv3D's output shape."""
    convs = [l for l in model._flatten_layers(include_self=False, recursive=True)
             if isinstance(l, _CONVS)]
    originals = {}
    for c in convs:
        originals[c] = c.call

        def wrapped(inputs, _c=c, _f=c.call):
            y = _f(inputs)
            _c._stfusion_out_shape = tuple(y.shape)
            return y
        c.call = wrapped
    model(x[:1], training=False)
    for c, f in originals.items():
        c.call = f


def time_steps(model, x, y, steps: int, warmup: int = 2) -> float:
    opt = keras.optimizers.SGD(0.001, momentum=0.9)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
            if model.losses:
                loss += tf.add_n(model.losses)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    for _ in range(warmup):
        step(x, y).numpy()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(x, y).numpy()
    return (time.perf_counter() - t0) / steps


def run_case(name, model, batch, steps, shape=None):
    shape = shape or B.input_geometry(model)
    x = tf.random.normal((batch,) + tuple(shape))
    y = tf.zeros((batch,), tf.int32)
    _record_shapes(model, x)
    fwd = forward_flops(model)
    sec = time_steps(model, x, y, steps)
    step_flops = 3 * fwd * batch
    return {"case": name, "input": list(shape), "batch": batch, "step_seconds": round(sec, 4),
            "clips_per_second": round(batch / sec, 2),
            "forward_gflops_per_clip": round(fwd / 1e9, 3),
            "achieved_gflops_per_second": round(step_flops / sec / 1e9, 2),
            "params": int(model.count_params())}


def plain_conv3d(shape, filters):
    inp = keras.Input(shape)
    x = keras.layers.Conv3D(filters, 3, padding="same", use_bias=False)(inp)
    out = keras.layers.Dense(4)(keras.layers.GlobalAveragePooling3D()(x))
    return keras.Model(inp, out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="small,full", help="comma list of: tiny, small, full, "
                    "or backbone presets (" + ", ".join(B.PRESETS) + ")")
    ap.add_argument("--backbone_frames", type=int, default=8)
    ap.add_argument("--backbone_crop", type=int, default=112)
    ap.add_argument("--backbone_batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--full_batch", type=int, default=1)
    ap.add_argument("--full_frames", type=int, default=16)
    ap.add_argument("--full_crop", type=int, default=224)
    args = ap.parse_args()
    results = []
    keras.utils.set_random_seed(0)
    for case in args.cases.split(","):
        if case in B.PRESETS:
            tiny = case.endswith("_tiny")
            cfg = B.preset(case, num_frames=args.backbone_frames,
                           crop_size=32 if tiny else args.backbone_crop)
            model = B.build_backbone(cfg, B.FusionStrategy.uniform(B.positions(cfg), "S+ST"), 174)
            results.append(run_case(f"backbone_{case}_S+ST", model, 8 if tiny else args.backbone_batch,
                                    args.steps * (4 if tiny else 1),
                                    (cfg.num_frames, cfg.crop_size, cfg.crop_size, 3)))
            del model
            keras.backend.clear_session()
            continue
        if case in ("tiny", "small"):
            cfg = T.preset(case)
            batch, steps = 8, args.steps * 4
        elif case == "full":
            cfg = T.preset("densenet121", num_frames=args.full_frames, crop_size=args.full_crop)
            batch, steps = args.full_batch, args.steps
        else:
            raise SystemExit(f"unknown case {case!r}; valid: tiny, small, full, "
                             f"{', '.join(B.PRESETS)}")
        model = T.build_template(cfg, 174, T.GateConfig(dataset_size=86017, length_scale=250))
        G.set_enabled(G.gate_layers(model), True)
        results.append(run_case(f"template_{case}", model, batch, steps))
        # Reference: one plain 3x3x3 Conv3D on a tensor like the template's first dense block.
        side = cfg.crop_size // 4
        ref = plain_conv3d((cfg.num_frames, side, side, cfg.bottleneck_width), cfg.bottleneck_width)
        results.append(run_case(f"plain_conv3d_for_{case}", ref, batch, steps))
        del model, ref
        keras.backend.clear_session()
    out = {"tensorflow": tf.__version__, "keras": keras.__version__, "cpu_count": os.cpu_count(),
           "results": results}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
