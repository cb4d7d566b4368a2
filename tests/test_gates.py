"""Variational DropPath gate: regulariser, gradients, modes, serialisation."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from stfusion_tf.model import gates as G
from stfusion_tf.model import template as T


def _gate(regularizer="code", noise="path", p=0.3, k=7.0, n=50, units=4):
    inner = keras.layers.Conv3D(units, (3, 1, 1), padding="same", use_bias=False) if noise == "path" \
        else keras.layers.Dense(units)
    g = G.VariationalDropPath(inner, init_drop_rate=p, regularizer=regularizer, noise=noise,
                              length_scale=k, dataset_size=n)
    shape = (None, 2, 3, 3, 5) if noise == "path" else (None, 6)
    g.build(shape)
    return g


@pytest.mark.parametrize("noise", ["path", "feature"])
def test_regulariser_matches_both_formulas(noise):
    p, k, n = 0.3, 7.0, 50
    for form in ("code", "paper"):
        g = _gate(form, noise, p, k, n)
        w = np.asarray(g.layer.kernel, np.float64)
        sq = float(np.sum(w ** 2))
        feats = w.shape[0] if noise == "feature" else 1
        if form == "code":
            want = (k / n) * (1 - p) * sq + feats * (p * np.log(p) + (1 - p) * np.log(1 - p)) / n
        else:
            want = k ** 2 * (1 - p) / (2 * n) * sq + feats * p * np.log(p) / n
        assert float(g.regularization()) == pytest.approx(want, rel=1e-5)
        # The same value is what add_loss contributes in training.
        x = tf.ones((2, 2, 3, 3, 5)) if noise == "path" else tf.ones((2, 6))
        g(x, training=True)
        assert float(g.losses[-1]) == pytest.approx(want, rel=1e-5)


def test_warmup_has_no_regulariser_and_is_identity():
    g = _gate(p=0.5)
    G.set_enabled([g], False)
    x = tf.random.normal((8, 2, 3, 3, 5))
    np.testing.assert_allclose(g(x, training=True), g.layer(x), atol=1e-6)
    assert float(g.losses[-1]) == 0.0



def test_warmup_leaves_drop_logit_without_gradient_and_graph_without_control_flow():
    """Warm-up: p gets no gradient.  The modes are selected arithmetically (tf.where),
    not with tf.cond: ~120 gates x 3 conds had made the template's training graph
    slow to build and ~1.5 GB heavier at its peak (docs/benchmarks.md)."""
    g = _gate(p=0.5)
    x = tf.random.normal((4, 2, 3, 3, 5))

    @tf.function
    def grads(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(g(x, training=True)) + tf.add_n(g.losses)
        return tape.gradient(loss, [g.p_logit, g.layer.kernel])

    for enabled in (False, True):
        G.set_enabled([g], enabled)
        dp, dw = grads(x)
        assert (float(dp) != 0.0) == enabled
        assert np.all(np.isfinite(dw))
    ops = {op.type for op in grads.get_concrete_function(x).graph.get_operations()}
    assert not ops & {"If", "StatelessIf", "Case", "StatelessCase"}


def test_training_gate_is_a_handful_of_ops_and_draws_tfps_relaxed_bernoulli():
    """The full template has 122 gates, so a gate's graph size is the template's: TFP's
    sample() cost ~45 shape and seed ops per gate.  The leaner draw must still be
    RelaxedBernoulli(temperature, logits=p_logit) (as 1 - d)."""
    import tensorflow_probability as tfp
    g = G.VariationalDropPath(keras.layers.Conv3D(2, 1, use_bias=False), init_drop_rate=0.3,
                              temperature=0.5)
    tf.random.set_seed(0)  # deterministic; 200,000 draws: quantile error ~0.005 << atol
    x = tf.ones((200000, 1, 1, 1, 1))
    g(x)

    @tf.function
    def factor(x):
        return g.multiplier(x, training=True)[0]

    graph = factor.get_concrete_function(tf.TensorSpec([None, 1, 1, 1, 1])).graph
    assert len(graph.get_operations()) <= 65, len(graph.get_operations())  # 59; TFP sample(): 124

    @tf.function
    def step(x):  # forward and gradients, as a training step traces them
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(g(x, training=True)) + tf.add_n(g.losses)
        return tape.gradient(loss, [g.p_logit, g.layer.kernel])

    graph = step.get_concrete_function(tf.TensorSpec([None, 1, 1, 1, 1])).graph
    # 122; with two [B,1,..] selects in place of the multiply-add: 151
    assert len(graph.get_operations()) <= 128, len(graph.get_operations())
    d = 1.0 - factor(x).numpy().ravel()
    ref = tfp.distributions.RelaxedBernoulli(0.5, logits=float(g.p_logit)).sample(
        200000, seed=5).numpy()
    q = np.linspace(0.05, 0.95, 19)
    np.testing.assert_allclose(np.quantile(d, q), np.quantile(ref, q), atol=0.02)


@pytest.mark.parametrize("use_bias", [False, True])
def test_gate_output_is_the_layer_of_the_scaled_input(use_bias):
    """A bias-free conv is scaled at its output (fewer channels), any other layer at its
    input: the same function either way."""
    conv = keras.layers.Conv3D(3, (3, 1, 1), padding="same", use_bias=use_bias,
                               bias_initializer="ones")
    g = G.VariationalDropPath(conv)
    x = tf.random.normal((2, 2, 3, 3, 5))
    g(x)
    assert g._scales_output == (not use_bias)
    g.mask.assign(0.37)
    G.set_inference_mode([g], "mask")
    for training in (False, True):
        np.testing.assert_allclose(g(x, training=training), conv(x * 0.37), rtol=1e-5, atol=1e-6)

def test_training_gate_drops_whole_paths_per_sample():
    g = G.VariationalDropPath(keras.layers.Conv3D(1, 1, use_bias=False, kernel_initializer="ones"),
                              init_drop_rate=0.5, temperature=0.05)
    x = tf.ones((256, 2, 2, 2, 1))
    y = g(x, training=True).numpy()
    per_sample = y.reshape(256, -1)
    # Constant within a sample (drop path), different across samples.
    np.testing.assert_allclose(per_sample, per_sample[:, :1] * np.ones_like(per_sample), atol=1e-5)
    kept = per_sample[:, 0]
    assert 0.3 < np.mean(kept > 0.5) < 0.7
    assert np.mean((kept < 0.05) | (kept > 0.95)) > 0.8  # low temperature: nearly hard


def test_inference_modes():
    g = _gate(p=0.4)
    x = tf.random.normal((4, 2, 3, 3, 5))
    ref = g.layer(x).numpy()
    np.testing.assert_allclose(g(x), 0.6 * ref, rtol=1e-5, atol=1e-6)  # expected: x (1 - p)
    G.set_inference_mode([g], "mask")
    g.mask.assign(0.0)
    np.testing.assert_allclose(g(x), 0.0 * ref, atol=1e-6)
    g.mask.assign(1.0)
    np.testing.assert_allclose(g(x), ref, rtol=1e-5, atol=1e-6)
    G.set_inference_mode([g], "identity")
    np.testing.assert_allclose(g(x), ref, rtol=1e-5, atol=1e-6)
    G.set_inference_mode([g], "sample")
    outs = np.stack([g(tf.ones((64, 2, 3, 3, 5))).numpy() for _ in range(5)])
    zero = np.all(outs.reshape(5, 64, -1) == 0, axis=-1)
    assert 0.2 < zero.mean() < 0.6
    with pytest.raises(ValueError, match="valid values: expected, mask, sample, identity"):
        G.set_inference_mode([g], "hard")


def test_gradients_reach_every_drop_logit_and_training_moves_them(tiny_model):
    model = tiny_model
    gl = G.gate_layers(model)
    G.set_enabled(gl, True)
    x = tf.random.normal((4, 8, 32, 32, 3))
    y = tf.constant([0, 1, 2, 3])
    with tf.GradientTape() as tape:
        logits = model(x, training=True)
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
        loss += tf.add_n(model.losses)
    logit_vars = [g.p_logit for g in gl]
    grads = tape.gradient(loss, logit_vars)
    assert all(gr is not None and float(tf.abs(gr)) > 0 for gr in grads)
    before = np.array([float(v) for v in logit_vars])
    opt = keras.optimizers.SGD(0.5)
    for _ in range(3):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                y, model(x, training=True), from_logits=True)) + tf.add_n(model.losses)
        opt.apply_gradients(zip(tape.gradient(loss, logit_vars), logit_vars))
    after = np.array([float(v) for v in logit_vars])
    assert np.all(np.abs(after - before) > 1e-6)


def test_masks_change_output_without_retracing():
    model = T.build_template(T.preset("tiny"), 3)
    gates = T.TemplateGates(model)
    G.set_inference_mode(gates.s + gates.t, "mask")
    traces = []

    @tf.function
    def fwd(mask, x):
        traces.append(1)
        gates.set_mask(tf.unstack(mask))
        return model(x, training=False)

    x = tf.random.normal((2, 8, 32, 32, 3))
    P = len(gates.positions)
    outs = [fwd(tf.constant(m, tf.float32), x).numpy() for m in
            (np.ones((P, 2)), np.tile([1, 0], (P, 1)), np.tile([0, 1], (P, 1)))]
    assert len(traces) == 1
    assert not np.allclose(outs[0], outs[1]) and not np.allclose(outs[1], outs[2])


def test_save_load_keeps_drop_rates_weights_and_state(tmp_path):
    model = T.build_template(T.preset("tiny"), 3, T.GateConfig(dataset_size=10))
    gates = T.TemplateGates(model)
    rng = np.random.default_rng(0)
    for g in gates.all:
        g.p_logit.assign(rng.normal())
    G.set_enabled(gates.all, False)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    lg = T.TemplateGates(loaded)
    np.testing.assert_allclose(lg.drop_rates(), gates.drop_rates())
    assert lg.positions == gates.positions
    assert all(int(g.enabled.numpy()) == 0 for g in lg.all)
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x = tf.random.normal((2, 8, 32, 32, 3))
    np.testing.assert_allclose(model(x), loaded(x), rtol=1e-5, atol=1e-5)
    assert T.layers_by_name(loaded)["b1_l1_s_gate"].get_config()["dataset_size"] == 10


def test_mask_mode_holds_in_training_without_regulariser():
    g = _gate(p=0.4)
    x = tf.random.normal((4, 2, 3, 3, 5))
    G.set_inference_mode([g], "mask")
    g.mask.assign(0.0)
    np.testing.assert_allclose(g(x, training=True), 0.0 * g.layer(x), atol=1e-6)
    assert float(g.losses[-1]) == 0.0
    g.mask.assign(1.0)
    np.testing.assert_allclose(g(x, training=True), g.layer(x), rtol=1e-5, atol=1e-6)


def test_relaxed_sample_is_tfps_distribution_with_a_finite_gradient_at_any_logit():
    import tensorflow_probability as tfp
    for logit in (-30.0, -12.0, -4.0, 0.0, 4.0, 9.0, 12.0, 30.0):
        v = tf.Variable(logit)
        with tf.GradientTape() as tape:
            dist = G.StableRelaxedBernoulli(0.2, logits=v)
            s = dist.sample([4000, 1, 1], seed=3)
            total = tf.reduce_sum(s)
        g = tape.gradient(total, v)
        assert isinstance(dist, tfp.distributions.RelaxedBernoulli)
        assert np.isfinite(float(g)) and np.all(np.isfinite(s.numpy()))
        # Low temperature: nearly Bernoulli(sigmoid(logit)).
        assert abs(float(tf.reduce_mean(tf.round(s))) - float(tf.sigmoid(v))) < 0.03
    # Where TFP's own sample is finite, both samplers draw the same distribution.
    q = np.linspace(0.05, 0.95, 19)
    a = G.StableRelaxedBernoulli(0.5, logits=1.0).sample(20000, seed=7).numpy()
    b = tfp.distributions.RelaxedBernoulli(0.5, logits=1.0).sample(20000, seed=8).numpy()
    np.testing.assert_allclose(np.quantile(a, q), np.quantile(b, q), atol=0.02)


def test_prior_weight_term_is_a_price_per_kept_parameter_whatever_the_kernel_scale():
    p, k, n = 0.3, 20.0, 50
    g = G.VariationalDropPath(keras.layers.Conv3D(4, (3, 1, 1), padding="same", use_bias=False),
                              init_drop_rate=p, length_scale=k, dataset_size=n,
                              weight_term="prior")
    g.build((None, 2, 3, 3, 5))
    n_w = 3 * 5 * 4
    entropy = (p * np.log(p) + (1 - p) * np.log(1 - p)) / n
    want = (1 - p) * n_w / (k * n) + entropy  # 1/k nats per kept weight, per example
    assert float(g.regularization()) == pytest.approx(want, rel=1e-5)
    g.layer.kernel.assign(10.0 * g.layer.kernel)  # BatchNorm would make this a no-op
    assert float(g.regularization()) == pytest.approx(want, rel=1e-5)
    norm = _gate("code", "path", p, k, n)
    norm.layer.kernel.assign(10.0 * norm.layer.kernel)
    assert float(norm.regularization()) > 10 * float(_gate("code", "path", p, k, n).regularization())
    with pytest.raises(ValueError, match="valid values: norm, prior"):
        G.VariationalDropPath(keras.layers.Dense(2), weight_term="he")


@pytest.mark.parametrize("regularizer,weight_term", [("code", "norm"), ("paper", "prior"),
                                                     ("code", "mixed")])
def test_gate_bank_is_every_gates_own_draw_and_regulariser(regularizer, weight_term):
    """``draw_bank`` (what a template's training call uses) draws each gate's
    RelaxedBernoulli(temperature, logits=p_logit) as 1 - d, holds a fixed gate's mask,
    is 1 in warm-up, and its regulariser is the sum of the gates' own."""
    import tensorflow_probability as tfp
    gates = []
    for p, temperature in ((0.2, 0.5), (0.6, 0.2), (0.4, 0.3)):
        g = G.VariationalDropPath(keras.layers.Conv3D(2, (3, 1, 1), use_bias=False),
                                  init_drop_rate=p, temperature=temperature, length_scale=5.0,
                                  dataset_size=40, regularizer=regularizer,
                                  weight_term=("prior" if p == 0.6 else "norm")
                                  if weight_term == "mixed" else weight_term)
        g.build((None, 3, 2, 2, 4))
        gates.append(g)
    gates[2].inference_mode.assign(G.INFERENCE_MODES.index("mask"))  # a fixed strategy
    gates[2].mask.assign(0.0)
    tf.random.set_seed(0)
    factors, reg = G.draw_bank(gates, 200000)
    q = np.linspace(0.05, 0.95, 19)
    for g in gates[:2]:
        d = 1.0 - factors[id(g)].numpy()
        ref = tfp.distributions.RelaxedBernoulli(g.temperature, logits=float(g.p_logit)).sample(
            200000, seed=5).numpy()
        np.testing.assert_allclose(np.quantile(d, q), np.quantile(ref, q), atol=0.02)
    np.testing.assert_array_equal(factors[id(gates[2])].numpy(), 0.0)
    own = sum(float(g.regularization()) for g in gates[:2])  # the fixed gate has none
    assert float(reg) == pytest.approx(own, rel=1e-5)

    G.set_enabled(gates, False)  # warm-up: identity, no regulariser; the mask still holds
    factors, reg = G.draw_bank(gates, 8)
    for g in gates[:2]:
        np.testing.assert_array_equal(factors[id(g)].numpy(), 1.0)
    np.testing.assert_array_equal(factors[id(gates[2])].numpy(), 0.0)
    assert float(reg) == 0.0


def _gated_training_call():
    """(gates, clip, fn) of a tiny template with its gates on; fn(x) runs a training call
    and returns (number of losses, their sum)."""
    model = T.build_template(T.preset("tiny", block_config=(2, 2)), 4,
                             T.GateConfig(dataset_size=100, length_scale=10.0))
    gates = G.gate_layers(model)
    G.set_enabled(gates, True)

    @tf.function
    def fn(t):
        model(t, training=True)
        return len(model.losses), tf.add_n(model.losses)

    return gates, tf.random.uniform((2, 8, 32, 32, 3), 0, 255, seed=1), fn


def test_gate_bank_reads_kernels_in_float32_under_a_mixed_policy():
    """The gates read their kernel in float32 (no autocast); the bank, drawn inside the
    template's call, must too: the same regulariser to float32 rounding."""
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        gates, x, fn = _gated_training_call()
        own = sum(float(g.regularization()) for g in gates)
        assert float(fn(x)[1]) == pytest.approx(own, rel=1e-6)  # bfloat16 kernels: ~8e-6 off
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_template_training_call_draws_its_path_gates_once():
    """A template's training call draws all its path gates in one bank: one uniform draw
    for them (and one for the per-feature head gate), one regulariser, the same loss as
    the gates' own regularisers."""
    gates, x, fn = _gated_training_call()
    graph = fn.get_concrete_function(x).graph
    draws = [op for op in graph.get_operations() if op.type == "RandomUniform"]
    assert len(draws) == 2, len(draws)
    count, total = fn(x)
    assert int(count) == 2  # the bank's and the head gate's
    own = sum(float(g.regularization()) for g in gates)
    assert float(total) == pytest.approx(own, rel=1e-5)
