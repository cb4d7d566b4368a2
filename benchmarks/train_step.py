"""Training-step speed and peak memory of the template and 3D backbones, per precision /
memory variant, side by side in one run.

Every (case, variant) runs in a fresh subprocess, so its peak memory is its own:
the process' peak resident memory (``ru_maxrss``, what ``/usr/bin/time -v`` shows)
and TensorFlow's CPU allocator peak (``tf.config.experimental.get_memory_info``:
weights, optimizer state, gradients and activations, without the interpreter and
libraries).  Activation memory = allocator peak - allocator in use between steps.
The step is Keras' ``train_step`` in a ``tf.function``, as ``fit`` runs it (``model.compile``
with the project's SGD, momentum 0.9; v-DropPath gates on for the template); the first step
is reported as its trace and its first call (graph optimisation + first run) apart.
FLOPs = 3 x forward (2 x MACs of every Conv3D/depthwise/Dense), so "GFLOP/s" is the
training step's arithmetic rate.
Rounds alternate the variants, and the median step time over rounds is reported
with its range.

Variants: ``float32``, ``memory_efficient``, ``mixed_bfloat16``, ``mixed_float16``,
``xla`` and '+' combinations (``mixed_bfloat16+memory_efficient``).  ``--compare_tree
DIR`` also runs ``float32`` from another checkout (e.g. the previous commit) in the
same rounds, labelled ``float32@DIR``.

    .venv/bin/python benchmarks/train_step.py --cases full --full_frames 16 --full_crop 112 \\
        --full_batch 2 --variants float32,memory_efficient,mixed_bfloat16 --rounds 2 --steps 3
    .venv/bin/python benchmarks/train_step.py --cases small,resnet_tiny --variants float32,xla
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS = ("float32", "mixed_bfloat16", "mixed_float16", "memory_efficient", "xla")
BACKBONES = ("resnet50", "resnext50", "resnext101", "mobilenetv2", "densenet121", "resnet_tiny",
             "resnext_tiny", "mobilenetv2_tiny", "densenet_tiny")


def _parse_variant(variant: str) -> dict:
    tokens = variant.split("@")[0].split("+")
    bad = [t for t in tokens if t not in TOKENS]
    if bad:
        raise SystemExit(f"unknown variant token {bad[0]!r}; valid: {', '.join(TOKENS)}")
    precision = next((t for t in tokens if t.startswith("mixed_")), "float32")
    return {"precision": precision, "memory_efficient": "memory_efficient" in tokens,
            "jit_compile": "xla" in tokens}


# -- child process: one case, one variant ----------------------------------------------------

def forward_flops(model) -> float:
    """2 x multiply-accumulates of every Conv3D / depthwise / Dense in a forward pass (batch 1)."""
    import keras
    import numpy as np
    from stfusion_tf.model.layers3d import DepthwiseConv3D
    total = 0
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.Conv3D):
            k = np.prod(layer.kernel_size) * layer.kernel.shape[-2]
            total += 2 * np.prod(layer._stfusion_out_shape[1:]) * k
        elif isinstance(layer, DepthwiseConv3D):
            total += 2 * np.prod(layer._stfusion_out_shape[1:]) * layer.kernel_size ** 2
        elif isinstance(layer, keras.layers.Dense):
            total += 2 * layer.kernel.shape[0] * layer.kernel.shape[1]
    return float(total)


def _record_shapes(model, x):
    """Traces one forward pass (batch 1) recording each convolution's output shape; traced,
    not run, so that no activation memory counts in the process peak measured after."""
    import keras
    import tensorflow as tf
    from stfusion_tf.model.layers3d import DepthwiseConv3D
    convs = [l for l in model._flatten_layers(include_self=False, recursive=True)
             if isinstance(l, (keras.layers.Conv3D, DepthwiseConv3D))]
    originals = {}
    for c in convs:
        originals[c] = c.call

        def wrapped(inputs, _c=c, _f=c.call):
            y = _f(inputs)
            _c._stfusion_out_shape = tuple(y.shape)
            return y
        c.call = wrapped
    tf.function(lambda t: model(t, training=False)).get_concrete_function(
        tf.TensorSpec((1,) + tuple(x.shape[1:]), x.dtype))
    for c, f in originals.items():
        c.call = f


def _build(case: str, args, memory_efficient: bool):
    """(model, batch, clip shape) of a case (the networks take any frame size; they train
    on their config's crop)."""
    import keras
    from stfusion_tf.model import backbones as B
    from stfusion_tf.model import gates as G
    from stfusion_tf.model import template as T
    if case in BACKBONES:
        tiny = case.endswith("_tiny")
        cfg = B.preset(case, num_frames=args.backbone_frames,
                       crop_size=32 if tiny else args.backbone_crop)
        model = B.build_backbone(cfg, B.FusionStrategy.uniform(B.positions(cfg), "S+ST"), 174)
        if hasattr(model, "memory_efficient"):
            model.memory_efficient = memory_efficient
        return (model, 8 if tiny else args.backbone_batch,
                (cfg.num_frames, cfg.crop_size, cfg.crop_size, 3))
    if case.startswith("plain_conv3d"):
        # One 3x3x3 Conv3D on a tensor like the full template's first dense block.
        side = args.full_crop // 4
        inp = keras.Input((args.full_frames, side, side, 128))
        x = keras.layers.Conv3D(128, 3, padding="same", use_bias=False)(inp)
        x = keras.layers.GlobalAveragePooling3D(dtype="float32")(x)
        return (keras.Model(inp, keras.layers.Dense(4, dtype="float32")(x)), args.full_batch,
                (args.full_frames, side, side, 128))
    if case in ("tiny", "small"):
        cfg, batch = T.preset(case), 8
    elif case == "full":
        cfg = T.preset("densenet121", num_frames=args.full_frames, crop_size=args.full_crop)
        batch = args.full_batch
    else:
        raise SystemExit(f"unknown case {case!r}")
    gate = T.GateConfig(dataset_size=86017, length_scale=250)
    model = T.build_template(cfg, 174, gate)
    if memory_efficient:
        model.memory_efficient = True
    G.set_enabled(G.gate_layers(model), True)
    return model, batch, (cfg.num_frames, cfg.crop_size, cfg.crop_size, 3)


def _tf_memory():
    import tensorflow as tf
    try:
        return tf.config.experimental.get_memory_info("CPU:0")
    except (ValueError, RuntimeError):
        return {"current": 0, "peak": 0}


def _rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1e6
    return float("nan")


def child(case: str, variant: str, args) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf
    v = _parse_variant(variant)
    keras.mixed_precision.set_global_policy(v["precision"])
    try:  # as training sets it (compute.ComputeConfig.apply); older checkouts: TF's defaults
        from stfusion_tf.compute import lean_graph_optimisation
        lean_graph_optimisation()
    except ImportError:
        pass
    keras.utils.set_random_seed(0)
    model, batch, shape = _build(case, args, v["memory_efficient"])
    x = tf.random.uniform((batch,) + shape, 0, 255)
    y = tf.zeros((batch,), tf.int32)
    _record_shapes(model, x)
    fwd = forward_flops(model)
    try:  # the optimizer training uses (older checkouts under --compare_tree: Keras')
        from stfusion_tf.optimization import SGD
    except ImportError:
        SGD = keras.optimizers.SGD
    model.compile(optimizer=SGD(0.001, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=v["jit_compile"])
    # As training does (optimization.compile_model): optimizer slots created inside the
    # first trace make tf.function trace the whole step twice.
    model.optimizer.build(model.trainable_variables)
    rss_built = _rss_gb()
    # Keras' training step (``Trainer.train_step``) in a tf.function as ``fit`` makes it, so
    # that its trace and its first call (graph optimisation + the first run) time apart.
    step = tf.function(model.train_step, reduce_retracing=True, jit_compile=v["jit_compile"])
    t0 = time.perf_counter()
    step.get_concrete_function((x, y))
    trace = time.perf_counter() - t0
    t0 = time.perf_counter()
    step((x, y))  # graph optimisation (Grappler; XLA compile) + first run
    first_call = time.perf_counter() - t0
    step((x, y))
    steady = _tf_memory()["current"]
    tf.config.experimental.reset_memory_stats("CPU:0")
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step((x, y))["loss"]
        times.append(time.perf_counter() - t0)
    mem = _tf_memory()
    sec = statistics.median(times)
    return {"case": case, "variant": variant, "input": list(shape), "batch": batch,
            "step_seconds": round(sec, 4), "clips_per_second": round(batch / sec, 3),
            "first_step_seconds": round(trace + first_call, 2),
            "trace_seconds": round(trace, 2),
            # The first call less a steady step: graph optimisation and first-run set-up.
            "optimise_seconds": round(first_call - sec, 2),
            "forward_gflops_per_clip": round(fwd / 1e9, 3),
            "achieved_gflops_per_second": round(3 * fwd * batch / sec / 1e9, 2),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3),
            "rss_after_build_gb": round(rss_built, 3),
            "tf_peak_gb": round(mem["peak"] / 1e9, 3),
            "tf_steady_gb": round(steady / 1e9, 3),
            "activation_gb": round((mem["peak"] - steady) / 1e9, 3),
            "params": int(model.count_params()), "loss": float(np.asarray(loss))}


# -- parent: rounds of subprocesses ------------------------------------------------------------

def _run_child(case, variant, args) -> dict:
    tree = variant.split("@", 1)[1] if "@" in variant else ROOT
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), TF_CPP_MIN_LOG_LEVEL="2")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", case, "--variant", variant,
           "--steps", str(args.steps), "--full_frames", str(args.full_frames),
           "--full_crop", str(args.full_crop), "--full_batch", str(args.full_batch),
           "--backbone_frames", str(args.backbone_frames),
           "--backbone_crop", str(args.backbone_crop), "--backbone_batch", str(args.backbone_batch)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        tail = r.stderr.strip().splitlines()[-1:] or ["?"]
        return {"case": case, "variant": variant, "error": tail[0]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def _summarise(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    out = dict(ok[0])
    steps = [r["step_seconds"] for r in ok]
    sec = statistics.median(steps)
    out.update(step_seconds=round(sec, 4), step_seconds_range=[min(steps), max(steps)],
               clips_per_second=round(out["batch"] / sec, 3),
               achieved_gflops_per_second=round(
                   3 * out["forward_gflops_per_clip"] * out["batch"] / sec, 2),
               rounds=len(ok))
    for k in ("peak_rss_gb", "tf_peak_gb", "activation_gb"):
        out[k] = max(r[k] for r in ok)
    return out


def _relative(results: list[dict]) -> list[dict]:
    """Speed-up and memory of every variant against float32 of the same case."""
    rows = []
    base = {r["case"]: r for r in results if r.get("variant") == "float32" and "error" not in r}
    for r in results:
        b = base.get(r["case"])
        if b is None or "error" in r or r is b:
            continue
        rows.append({"case": r["case"], "variant": r["variant"],
                     "speed_vs_float32": round(b["step_seconds"] / r["step_seconds"], 3),
                     "peak_rss_vs_float32": round(r["peak_rss_gb"] / b["peak_rss_gb"], 3),
                     "activation_vs_float32": round(r["activation_gb"] / b["activation_gb"], 3)})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="small,full", help="comma list of: tiny, small, full, "
                    "plain_conv3d, or backbone presets (" + ", ".join(BACKBONES) + ")")
    ap.add_argument("--variants", default="float32,memory_efficient,mixed_bfloat16")
    ap.add_argument("--compare_tree", default=None, help="also run float32 from this checkout")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--full_batch", type=int, default=2)
    ap.add_argument("--full_frames", type=int, default=16)
    ap.add_argument("--full_crop", type=int, default=112)
    ap.add_argument("--backbone_frames", type=int, default=8)
    ap.add_argument("--backbone_crop", type=int, default=112)
    ap.add_argument("--backbone_batch", type=int, default=2)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="float32", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        sys.path.insert(0, os.environ.get("PYTHONPATH", ROOT).split(os.pathsep)[0])
        print(json.dumps(child(args.child, args.variant, args)))
        return
    variants = args.variants.split(",")
    for v in variants:
        _parse_variant(v)
    if args.compare_tree:
        variants.append(f"float32@{os.path.abspath(args.compare_tree)}")
    runs = {}
    for _ in range(args.rounds):
        for case in args.cases.split(","):
            for variant in variants:
                r = _run_child(case, variant, args)
                runs.setdefault((case, variant), []).append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
    results = [_summarise(rs) for rs in runs.values()]
    import platform
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    cpu = {"cores": os.cpu_count(), "machine": platform.machine(),
           "avx512_bf16": " avx512_bf16" in flags, "amx_bf16": " amx_bf16" in flags}
    print(json.dumps({"cpu": cpu, "steps": args.steps, "rounds": args.rounds, "results": results,
                      "relative": _relative(results)}, indent=1))


if __name__ == "__main__":
    main()
