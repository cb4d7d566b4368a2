"""Template network layout, strategies through masks, the full-size preset."""

import numpy as np
import pytest
import tensorflow as tf

from stfusion_tf.model import gates as G
from stfusion_tf.model import template as T
from stfusion_tf.model.strategy import FusionStrategy


def test_positions_follow_fig4():
    pos = T.template_positions(T.preset("densenet121"))
    assert len(pos) == 61
    assert pos[:7] == ("B1.L1", "B1.L2", "B1.L3", "B1.L4", "B1.L5", "B1.L6", "T1")
    assert pos[19] == "T2" and pos[44] == "T3" and pos[-1] == "B4.L16"
    assert T.template_positions(T.preset("tiny")) == (
        "B1.L1", "B1.L2", "T1", "B2.L1", "B2.L2", "T2", "B3.L1", "B3.L2", "T3", "B4.L1", "B4.L2")


def test_bad_preset_names_valid_ones():
    with pytest.raises(ValueError, match="valid presets: densenet121, small, tiny"):
        T.preset("resnet")


@pytest.mark.parametrize("unit", ["S", "ST", "S+ST"])
def test_strategy_mask_equals_removing_the_branch(unit):
    model = T.build_template(T.preset("tiny"), 3)
    x = tf.random.normal((2, 8, 32, 32, 3), seed=1)
    gates = T.TemplateGates(model)
    G.set_inference_mode(gates.s + gates.t, "mask")
    G.set_inference_mode([gates.head], "identity")
    gates.set_strategy(FusionStrategy.uniform(gates.positions, unit))
    masked = model(x, training=False).numpy()
    # Same weights, dropped branches physically removed (kernels zeroed), no masks.
    gates.set_mask(np.ones((len(gates.positions), 2)))
    keep = FusionStrategy.uniform(gates.positions, unit).to_mask()
    for i in range(len(gates.positions)):
        for j, g in enumerate((gates.s[i], gates.t[i])):
            if keep[i, j] == 0:
                g.layer.kernel.assign(tf.zeros_like(g.layer.kernel))
    removed = model(x, training=False).numpy()
    np.testing.assert_allclose(masked, removed, rtol=1e-5, atol=1e-6)


def test_temporal_downsample_variant_shapes():
    cfg = T.preset("tiny", temporal_downsample=True)
    model = T.build_template(cfg, 5)
    assert model(tf.zeros((1, 8, 32, 32, 3))).shape == (1, 5)
    # Trained on 32x32 crops, evaluated on full 40x40 frames (the authors' protocol).
    assert model(tf.zeros((1, 8, 40, 40, 3))).shape == (1, 5)
    assert model.get_layer("t1_pool").pool_size == (2, 2, 2)


def test_full_densenet121_template_builds_and_matches_paper_size():
    model = T.build_template(T.preset("densenet121"), 174)
    assert model.input_shape == (None, 16, None, None, 3)  # any frame size: full-frame eval
    assert model.output_shape == (None, 174)
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    kernels = sum(int(np.prod(v.shape)) for v in model.weights if v.path.endswith("kernel"))
    # Paper Table 1: 21.4M. Conv + FC kernels: 21.25M; with BN scale/shift: 21.40M.
    assert 21.2e6 < kernels < 21.3e6
    assert abs(trainable - 21.4e6) < 0.05e6
    assert len(T.TemplateGates(model).positions) == 61
    assert len(G.gate_layers(model)) == 2 * 61 + 1


def test_template_saves_and_reloads_as_a_template_that_knows_its_config(tmp_path):
    import keras
    cfg = T.preset("tiny", temporal_padding="replicate")
    model = T.build_template(cfg, 3, T.GateConfig(dataset_size=7, length_scale=2.0))
    path = str(tmp_path / "t.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, T.Template)
    assert loaded.config == cfg and loaded.gate_config == model.gate_config
    assert loaded.positions == T.template_positions(cfg) and loaded.num_classes == 3
    st = T.FusionStrategy.uniform(loaded.positions, "ST")
    net = T.strategy_network(loaded, st)
    assert isinstance(net, T.Template) and net.strategy == st and not T.gate_layers(net)


@pytest.mark.parametrize("shape", [(2, 4, 5, 5, 8), (3, 6, 6, 8)])
def test_fused_batchnorm_is_keras_batchnorm_in_one_op(shape):
    """Same outputs, gradients and moving statistics as Keras' layer (its biased moving
    variance, not the fused op's unbiased one), in one FusedBatchNormV3 each way."""
    import keras
    import tensorflow as tf
    from stfusion_tf.model.normalization import BatchNorm
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(1.0, 3.0, shape), tf.float32)
    w = tf.constant(rng.normal(size=shape), tf.float32)
    ref, fused = (cls(epsilon=1e-5, momentum=0.9) for cls in (keras.layers.BatchNormalization,
                                                              BatchNorm))
    gamma, beta = rng.normal(size=shape[-1]), rng.normal(size=shape[-1])
    for layer in (ref, fused):
        layer.build(shape)
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)
    grads = []
    for layer in (ref, fused):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=True) * w)
        grads.append(tape.gradient(loss, [x, layer.gamma, layer.beta]))
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ref.moving_mean, fused.moving_mean, atol=1e-6)
    np.testing.assert_allclose(ref.moving_variance, fused.moving_variance, rtol=1e-5)
    np.testing.assert_allclose(ref(x, training=False), fused(x, training=False), atol=1e-5)

    graph = tf.function(lambda t: fused(t, training=True)).get_concrete_function(x).graph
    types = [op.type for op in graph.get_operations()]
    assert types.count("FusedBatchNormV3") == 1 and "Mean" not in types
    # 5-D runs as 4-D (N, D*H, W, C), the rank oneDNN's layout pass rewrites on CPU; also
    # when only the rank is known.
    op = next(op for op in graph.get_operations() if op.type == "FusedBatchNormV3")
    assert op.inputs[0].shape.rank == 4
    unknown = tf.function(lambda t: fused(t, training=False),
                          input_signature=[tf.TensorSpec([None] * len(shape), tf.float32)])
    np.testing.assert_allclose(unknown(x), fused(x, training=False), atol=1e-6)
    # Under mixed_bfloat16 the op takes and returns bfloat16 (statistics in float32).
    mixed = BatchNorm(epsilon=1e-5, momentum=0.9, dtype="mixed_bfloat16")
    y = mixed(tf.cast(x, tf.bfloat16), training=True)
    assert y.dtype == tf.bfloat16 and mixed.moving_mean.dtype == "float32"
    plain = BatchNorm(epsilon=1e-5, momentum=0.9)(x, training=True)
    np.testing.assert_allclose(tf.cast(y, tf.float32), plain, atol=0.05)
