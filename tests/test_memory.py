"""Memory-efficient dense layers: the plain graph's results and gradients, less memory."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from stfusion_tf.model import gates as G
from stfusion_tf.model import template as T
from stfusion_tf.model.strategy import FusionStrategy


def _step(model, x, y, memory_efficient, seed=7, jit_compile=False):
    """Logits, loss, gradients and BN moving statistics of one training call."""
    state = [v.numpy() for v in model.non_trainable_variables]
    model.memory_efficient = memory_efficient
    tf.random.set_seed(seed)

    @tf.function(jit_compile=jit_compile)
    def fn(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                y, logits, from_logits=True))
            if model.losses:
                loss += tf.add_n(model.losses)
        return logits, loss, tape.gradient(loss, model.trainable_variables)

    logits, loss, grads = fn(x, y)
    after = [v.numpy() for v in model.non_trainable_variables]
    for v, s in zip(model.non_trainable_variables, state):
        v.assign(s)
    return logits.numpy(), float(loss), [g.numpy() for g in grads], after


def _assert_same(a, b, rtol=1e-5):
    np.testing.assert_allclose(a[0], b[0], rtol=rtol, atol=1e-5)
    assert a[1] == pytest.approx(b[1], rel=rtol)
    # Gradients equal up to float rounding, relative to the largest one (some, e.g. the
    # stem BN's gamma, are sums that cancel to ~1e-6 and carry only rounding noise).
    scale = max(np.abs(g).max() for g in a[2])
    for ga, gb in zip(a[2], b[2]):
        np.testing.assert_allclose(ga, gb, rtol=1e-4, atol=1e-5 * scale)
    for sa, sb in zip(a[3], b[3]):  # moving statistics updated once, identically
        np.testing.assert_allclose(sa, sb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temporal_padding", ["zeros", "replicate"])
def test_template_gradients_equal_the_plain_graph(temporal_padding):
    cfg = T.preset("tiny", block_config=(3, 2), temporal_padding=temporal_padding)
    model = T.build_template(cfg, 4, T.GateConfig(dataset_size=100, length_scale=10.0))
    G.set_enabled(G.gate_layers(model), True)  # relaxed samples: the recomputation must reuse them
    x = tf.random.uniform((3, 8, 32, 32, 3), 0, 255, seed=1)
    y = tf.constant([0, 1, 2])
    plain = _step(model, x, y, False)
    efficient = _step(model, x, y, True)
    _assert_same(plain, efficient)
    assert any(np.abs(g).max() > 0 for g in plain[2][-3:])  # gate logits get gradients
    other_seed = _step(model, x, y, True, seed=8)
    assert not np.allclose(other_seed[0], efficient[0])  # the gates did sample


def test_strategy_network_and_xla_equal_the_plain_graph():
    keras.utils.set_random_seed(0)  # weights and clip reproducible from run to run
    template = T.build_template(T.preset("tiny", block_config=(3, 2)), 4)
    positions = template.positions
    units = ["S", "ST", "S+ST"] * len(positions)
    net = T.strategy_network(template, FusionStrategy(positions, tuple(units[:len(positions)])))
    x = tf.random.uniform((2, 8, 32, 32, 3), 0, 255, seed=2)
    y = tf.constant([1, 3])
    plain = _step(net, x, y, False)
    _assert_same(plain, _step(net, x, y, True))
    _assert_same(plain, _step(net, x, y, True, jit_compile=True), rtol=1e-4)


def _peak_step_memory(model, x, y) -> int:
    @tf.function
    def fn(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                y, model(x, training=True), from_logits=True))
        return tape.gradient(loss, model.trainable_variables)

    fn(x, y)
    tf.config.experimental.reset_memory_stats("CPU:0")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    fn(x, y)
    return tf.config.experimental.get_memory_info("CPU:0")["peak"] - before


def test_training_step_needs_less_memory():
    cfg = T.preset("tiny", block_config=(8, 8), growth_rate=16, bn_size=4, init_features=32)
    model = T.build_template(cfg, 4)
    x = tf.random.uniform((4, 8, 32, 32, 3), 0, 255, seed=3)
    y = tf.constant([0, 1, 2, 3])
    plain = _peak_step_memory(model, x, y)
    model.memory_efficient = True
    efficient = _peak_step_memory(model, x, y)
    assert efficient < 0.6 * plain, (efficient, plain)
