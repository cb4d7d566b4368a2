"""Where a training step's time goes, and whether other kernels would be faster.

Prints JSON with two parts, measured in one process:

* ``profile``: one training step of the template (``--case full``: DenseNet-121 layout,
  16x112x112, batch 2, v-DropPath on) under ``tf.profiler``, its op time summed per op type
  from the XPlane (thread-seconds: two compute threads here);
* ``kernels``: forward + backward of the template's convolution shapes through oneDNN's
  Conv3D against the alternatives (1x1x1 as a matmul, 1x3x3 as a Conv2D over B*T frames,
  3x1x1 as a Conv2D over (T, H*W)), and Keras' BatchNormalization + ReLU against TensorFlow's
  fused batch norm on the 5-D tensor and on its N,D*H,W,C view (what ``BatchNorm`` runs),
  median of ``--repeats``.

    .venv/bin/python benchmarks/step_profile.py [--case full] [--memory_efficient]
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def profile_step(case: str, memory_efficient: bool) -> dict:
    """Op time per op type of one (third) training step."""
    import keras
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2
    from train_step import _build  # the same template, shape and gates as the speed benchmark
    shapes = argparse.Namespace(full_frames=16, full_crop=112, full_batch=2)
    model, _, clip = _build(case, shapes, memory_efficient)
    model.compile(optimizer=keras.optimizers.SGD(0.001, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.optimizer.build(model.trainable_variables)
    x = tf.random.uniform((2,) + clip, 0, 255)
    y = tf.zeros((2,), tf.int32)
    model.train_on_batch(x, y)
    model.train_on_batch(x, y)
    logdir = tempfile.mkdtemp()
    tf.profiler.experimental.start(logdir)
    t0 = time.perf_counter()
    model.train_on_batch(x, y)
    wall = time.perf_counter() - t0
    tf.profiler.experimental.stop()
    space = xplane_pb2.XSpace()
    with open(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[0], "rb") as f:
        space.ParseFromString(f.read())
    shutil.rmtree(logdir, ignore_errors=True)
    seconds, calls = collections.Counter(), collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue  # op kernels run on the executor's compute threads
            for ev in line.events:
                name = plane.event_metadata[ev.metadata_id].name
                if ":" in name and "::" not in name:  # "name:OpType", not executor spans
                    op_type = name.rsplit(":", 1)[1].strip()
                    seconds[op_type] += ev.duration_ps / 1e12
                    calls[op_type] += 1
    total = sum(seconds.values())
    conv = sum(v for k, v in seconds.items() if "Conv3D" in k)
    return {"case": case, "memory_efficient": memory_efficient, "step_seconds": round(wall, 3),
            "op_thread_seconds": round(total, 3), "conv3d_share": round(conv / total, 3),
            "by_op": [{"op": k, "seconds": round(v, 3), "calls": calls[k]}
                      for k, v in seconds.most_common(15)]}


def _median_ms(fn, x, repeats):
    fn(x)
    fn(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for t in fn(x):
            t.numpy()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e3, 2)


def _grad_fn(forward, variables):
    import tensorflow as tf

    @tf.function
    def fn(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = forward(x)
            loss = tf.reduce_sum(y * y)
        return tape.gradient(loss, [x] + list(variables))
    return fn


def _conv_alternative(kernel, w, shape):
    import tensorflow as tf
    b, t, h, _, c = shape
    f = w.shape[-1]
    if kernel == (1, 1, 1):
        return lambda x: tf.reshape(tf.matmul(tf.reshape(x, [-1, c]), tf.reshape(w, [c, f])),
                                    [b, t, h, h, f])
    if kernel == (1, 3, 3):
        return lambda x: tf.reshape(tf.nn.conv2d(tf.reshape(x, [b * t, h, h, c]), w[0], 1,
                                                 "SAME"), [b, t, h, h, f])
    return lambda x: tf.reshape(tf.nn.conv2d(tf.reshape(x, [b, t, h * h, c]), w[:, :, 0], 1,
                                             "SAME"), [b, t, h, h, f])


def kernels(repeats: int) -> list[dict]:
    """Conv3D vs its alternatives; Keras BN + ReLU vs fused BN + ReLU, 5-D and 4-D view (fwd + bwd)."""
    import keras
    import tensorflow as tf
    rows = []
    cases = [((1, 1, 1), (2, 16, 28, 28, 256), 128), ((3, 1, 1), (2, 16, 28, 28, 256), 128),
             ((1, 1, 1), (2, 16, 14, 14, 512), 128), ((3, 1, 1), (2, 16, 14, 14, 512), 128),
             ((1, 3, 3), (2, 16, 28, 28, 128), 32)]
    for kernel, shape, filters in cases:
        x = tf.random.normal(shape)
        w = tf.Variable(tf.random.normal(kernel + (shape[-1], filters)) * 0.01)
        plain = _grad_fn(lambda t, w=w: tf.nn.conv3d(t, w, [1] * 5, "SAME"), [w])
        alt = _grad_fn(_conv_alternative(kernel, w, shape), [w])
        a, b = _median_ms(plain, x, repeats), _median_ms(alt, x, repeats)
        rows.append({"op": f"conv {kernel} {list(shape)} -> {filters}", "conv3d_ms": a,
                     "alternative_ms": b, "speedup": round(a / b, 3)})
    for shape in ((2, 16, 28, 28, 256), (2, 8, 14, 14, 512)):
        x = tf.random.normal(shape)
        bn = keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9)
        bn.build(shape)
        gamma, beta = tf.Variable(tf.ones([shape[-1]])), tf.Variable(tf.zeros([shape[-1]]))
        view = [-1, shape[1] * shape[2], shape[3], shape[4]]
        keras_bn = _grad_fn(lambda t: tf.nn.relu(bn(t, training=True)), bn.trainable_variables)
        fused5 = _grad_fn(lambda t: tf.nn.relu(tf.compat.v1.nn.fused_batch_norm(
            t, gamma, beta, epsilon=1e-5, data_format="NDHWC", is_training=True)[0]),
            [gamma, beta])
        # The project's BatchNorm: the same op on the free N,D*H,W,C view, which oneDNN's
        # layout pass takes (it rewrites only 4-D batch norm).
        fused4 = _grad_fn(lambda t: tf.reshape(tf.nn.relu(tf.compat.v1.nn.fused_batch_norm(
            tf.reshape(t, view), gamma, beta, epsilon=1e-5, is_training=True)[0]), shape),
            [gamma, beta])
        a, b, c = (_median_ms(f, x, repeats) for f in (keras_bn, fused5, fused4))
        rows.append({"op": f"BN + ReLU {list(shape)}", "keras_ms": a, "fused_5d_ms": b,
                     "fused_4d_view_ms": c, "speedup_4d_vs_5d": round(b / c, 3),
                     "speedup_4d_vs_keras": round(a / c, 3)})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", default="full", choices=["full", "small", "tiny"])
    ap.add_argument("--memory_efficient", action="store_true")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--skip", default="", help="comma list of: profile, kernels")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    out = {}
    if "profile" not in skip:
        out["profile"] = profile_step(args.case, args.memory_efficient)
    if "kernels" not in skip:
        out["kernels"] = kernels(args.repeats)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
