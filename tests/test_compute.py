"""Precision policies and XLA: the template and every backbone family train under
float32 and bfloat16 with XLA on CPU; gates stay float32; float16 scales the loss."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from stfusion_tf import compute, training
from stfusion_tf.errors import UserError
from stfusion_tf.callbacks import inner_optimizers
from stfusion_tf.model import backbones as B
from stfusion_tf.model import gates as G
from stfusion_tf.model import template as T
from stfusion_tf.model.strategy import FusionStrategy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gate_stays_float32_under_a_mixed_policy():
    with compute.precision_scope("float32"):
        ref = G.VariationalDropPath(keras.layers.Conv3D(4, 1, use_bias=False), init_drop_rate=0.3,
                                    length_scale=7.0, dataset_size=50)
        ref.build((None, 2, 3, 3, 5))
    with compute.precision_scope("mixed_bfloat16"):
        g = G.VariationalDropPath(keras.layers.Conv3D(4, 1, use_bias=False), init_drop_rate=0.3,
                                  length_scale=7.0, dataset_size=50)
        g.build((None, 2, 3, 3, 5))
        g.layer.kernel.assign(ref.layer.kernel)
        x = tf.cast(tf.random.normal((4, 2, 3, 3, 5)), tf.bfloat16)
        y = g(x, training=True)  # TFP's RelaxedBernoulli sampled in bfloat16 used to fail
        factor, reg = g.multiplier(x, training=True)
    assert y.dtype == tf.bfloat16 and g.layer.compute_dtype == "bfloat16"
    assert factor.dtype == tf.float32 and g.p_logit.dtype == "float32"
    assert g.losses[-1].dtype == tf.float32
    # The regulariser reads the float32 kernel, not its bfloat16 copy.
    assert float(reg) == pytest.approx(float(ref.regularization()), rel=1e-6)


FAMILIES = ["template", "resnet_tiny", "resnext_tiny", "mobilenetv2_tiny", "densenet_tiny"]


def _model(family):
    """(network, clip shape): the networks take any frame size; they train on the crop."""
    if family == "template":
        cfg = T.preset("tiny")
        model = T.build_template(cfg, 3, T.GateConfig(dataset_size=10))
        G.set_enabled(G.gate_layers(model), True)
    else:
        cfg = B.preset(family, num_frames=4, crop_size=32)
        model = B.build_backbone(cfg, B.FusionStrategy.uniform(B.positions(cfg), "S+ST"), 3)
    return model, (cfg.num_frames, cfg.crop_size, cfg.crop_size, 3)


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_with_xla(family, precision):
    keras.utils.set_random_seed(0)
    with compute.precision_scope(precision):
        model, shape = _model(family)
        model.compile(optimizer=keras.optimizers.SGD(0.01), jit_compile=True,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        x = tf.random.uniform((2,) + shape, 0, 255, seed=1)
        before = [v.numpy() for v in model.trainable_variables]
        loss = float(model.train_on_batch(x, tf.constant([0, 2])))
        logits = model(x, training=False)
    assert model.jit_compile is True and np.isfinite(loss)
    assert logits.dtype == tf.float32  # the head computes in float32 under any policy
    conv = next(l for l in model._flatten_layers() if isinstance(l, keras.layers.Conv3D))
    assert conv.compute_dtype == ("float32" if precision == "float32" else "bfloat16")
    moved = [not np.array_equal(b, v.numpy()) for b, v in zip(before, model.trainable_variables)]
    assert np.mean(moved) > 0.9


def _gated_net():
    """A gated Conv3D and a float32 head: the template's parts that float16 touches.  (The
    template itself needs XLA for float16 on CPU: TensorFlow's CPU kernels have no
    float16 MaxPool3D; its XLA compile with a loss-scaled MultiOptimizer takes minutes.)"""
    inp = keras.Input((4, 8, 8, 3))
    gate = G.VariationalDropPath(keras.layers.Conv3D(6, 3, padding="same", use_bias=False),
                                 init_drop_rate=0.3, length_scale=7.0, dataset_size=10,
                                 name="conv_gate")
    x = keras.layers.GlobalAveragePooling3D(dtype="float32")(keras.layers.ReLU()(gate(inp)))
    return keras.Model(inp, keras.layers.Dense(3, dtype="float32")(x)), gate


def test_mixed_float16_scales_the_loss_with_a_gate_optimizer():
    """Keras wraps the MultiOptimizer of ``gate_optimizer`` in a LossScaleOptimizer."""
    cfg = training.TrainConfig(gate_optimizer="adam", gate_learning_rate=0.05)
    keras.utils.set_random_seed(0)
    with compute.precision_scope("mixed_float16"):
        model, gate = _gated_net()
        training.compile_model(model, cfg, 10, training.phases(cfg)[0], jit_compile=False)
        x = tf.random.uniform((2, 4, 8, 8, 3), 0, 255, seed=1)
        rate = float(gate.drop_rate)
        for _ in range(2):
            loss = model.train_on_batch(x, tf.constant([0, 2]), return_dict=True)["loss"]
    opt = model.optimizer
    assert gate.layer.compute_dtype == "float16" and gate.p_logit.dtype == "float32"
    assert isinstance(opt, keras.optimizers.LossScaleOptimizer)
    assert isinstance(opt.inner_optimizer, keras.optimizers.MultiOptimizer)
    assert [type(o).__name__ for o in inner_optimizers(opt)] == ["SGD", "Adam"]
    assert np.isfinite(float(loss)) and float(opt.dynamic_scale) > 1
    assert float(gate.drop_rate) != pytest.approx(rate)  # the gate trained


def test_compute_config_checks_its_values():
    with pytest.raises(UserError, match="valid values: float32, mixed_bfloat16"):
        compute.ComputeConfig(precision="float16")
    with pytest.raises(UserError, match="valid values: auto, true, false"):
        compute.ComputeConfig(jit_compile="yes")
    assert compute.ComputeConfig(jit_compile="true").keras_jit_compile is True
    assert compute.resolve_jit("auto") is bool(
        [d for d in tf.config.list_physical_devices() if d.device_type != "CPU"])


def test_export_under_bfloat16_writes_a_float32_tflite(tmp_path):
    """SavedModels keep the policy; TFLite (no bfloat16 kernels) gets a float32 copy."""
    from stfusion_tf import export
    keras.utils.set_random_seed(0)
    with compute.precision_scope("mixed_bfloat16"):
        model, shape = _model("mobilenetv2_tiny")
        template = T.build_template(T.preset("tiny"), 3)
        copies = [export.float32_network(model), export.float32_network(template)]
        network = T.strategy_network(template, FusionStrategy.uniform(template.positions, "S+ST"))
        path = export.export_tflite(network, "s_st", ["a", "b", "c"], str(tmp_path))
    for net, f32 in zip((model, template), copies):
        assert {l.dtype_policy.name for l in f32._flatten_layers()} == {"float32"}
        assert all(np.array_equal(a, b) for a, b in zip(net.get_weights(), f32.get_weights()))
    assert export.float32_network(copies[0]) is copies[0]
    assert os.path.getsize(path) > 0


def test_lean_graph_optimisation_runs_grappler_once_without_its_memory_optimizer(tmp_path):
    """Grappler's own log (meta_optimizer VLOG) in a fresh process: with the lean setting one
    pass over the graph and no memory optimizer; TensorFlow's default runs two passes and the
    memory optimizer. The function's result is the same."""
    import subprocess
    import sys
    script = tmp_path / "probe.py"
    script.write_text(
        "import sys\nimport tensorflow as tf\n"
        "from stfusion_tf.compute import lean_graph_optimisation\n"
        "if sys.argv[1] == 'lean':\n    assert lean_graph_optimisation(force=True)\n"
        "@tf.function\ndef f(x):\n    for _ in range(5):\n"
        "        x = tf.nn.relu(x * 2.0 + 1.0) - tf.reduce_mean(x)\n    return x\n"
        "print('result', float(tf.reduce_sum(f(tf.ones([4, 4])))))\n")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0", TF_CPP_VMODULE="meta_optimizer=1",
               PYTHONPATH=ROOT)
    logs = {}
    for mode in ("lean", "default"):
        r = subprocess.run([sys.executable, str(script), mode], env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        logs[mode] = r.stdout + r.stderr
    count = lambda mode, s: logs[mode].count(s)  # noqa: E731
    assert count("lean", "model_pruner:") == 1 and count("default", "model_pruner:") == 2
    assert count("lean", "memory_optimizer:") == 0 and count("default", "memory_optimizer:") >= 1
    results = {m: [l for l in logs[m].splitlines() if l.startswith("result")] for m in logs}
    assert results["lean"] == results["default"] == ["result 96.0"]
