"""MACs and parameters of fusion strategies: a hand count, the Keras graph, budgets, Pareto."""

import numpy as np
import pytest

from stfusion_tf.analysis import cost
from stfusion_tf.errors import UserError
from stfusion_tf.model import gates as G
from stfusion_tf.model import backbones as B
from stfusion_tf.model import template as T
from stfusion_tf.model.strategy import FusionStrategy

# Two dense layers and one transition, small enough to count by hand: stem 1x3x3 (3 -> 4,
# spatial stride 2), growth 4, bottleneck 8, 2 frames of 8x8, 3 classes.
HAND = T.TemplateConfig(block_config=(1, 1), growth_rate=4, bn_size=2, init_features=4,
                        stem_kernel=(1, 3, 3), num_frames=2, crop_size=8)


def test_macs_and_params_of_uniform_strategies_match_a_hand_count():
    # Stem: 2x4x4 outputs x (1*3*3*3) x 4 = 3456 MACs; max-pool -> 2x2x2 (8 voxels).
    # B1.L1 (4 -> 8): S 8*4*8 = 256, T 3x that = 768; its 1x3x3 conv 8*9*8*4 = 2304.
    # T1 (8 -> 4): S 8*8*4 = 256, T 768; pool -> 2x1x1 (2 voxels).
    # B2.L1 (4 -> 8): S 2*4*8 = 64, T 192; its 1x3x3 conv 2*9*8*4 = 576.  Head 8*3 = 24.
    fixed = 3456 + 2304 + 576 + 24
    want_macs = {"S": fixed + 256 + 256 + 64, "ST": fixed + 768 + 768 + 192,
                 "S+ST": fixed + 1024 + 1024 + 256}
    # Kernels (no bias) + BN gamma/beta: stem 108 + 8; per dense layer BN 16 + 1x3x3 288;
    # head BN 16 + 8*3 + 3.  Branches: S = kernel + BN of the input, T = 3x kernel + BN.
    fixed_p = 108 + 8 + 2 * (16 + 288) + 16 + 27
    want_params = {"S": fixed_p + (32 + 8) + (32 + 16) + (32 + 8),
                   "ST": fixed_p + (96 + 8) + (96 + 16) + (96 + 8),
                   "S+ST": fixed_p + 144 + 160 + 144}
    costs = cost.template_costs(HAND, 3)
    assert costs.positions == ("B1.L1", "T1", "B2.L1")
    for unit in ("S", "ST", "S+ST"):
        st = FusionStrategy.uniform(costs.positions, unit)
        assert costs.of(st) == cost.Cost(want_macs[unit], want_params[unit]), unit
        net = T.build_template(HAND, 3, strategy=st)
        assert cost.model_macs(net) == want_macs[unit]
        assert B.count_params(net)["params_trainable"] == want_params[unit]


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_analytic_costs_equal_the_keras_graph_for_sampled_strategies(preset):
    cfg = T.preset(preset)
    costs = cost.template_costs(cfg, 5)
    rng = np.random.default_rng(0)
    for _ in range(3):
        st = FusionStrategy(costs.positions,
                            tuple(rng.choice(["S", "ST", "S+ST"], len(costs.positions))))
        net = T.build_template(cfg, 5, strategy=st)
        c = costs.of(st)
        assert c.macs == cost.model_macs(net)
        assert c.params == B.count_params(net)["params_trainable"]
    # The gated template computes what S+ST computes (the gates are element-wise).
    full = FusionStrategy.uniform(costs.positions, "S+ST")
    assert cost.model_macs(T.build_template(cfg, 5)) == costs.of(full).macs
    # "none" drops both branches' cost and keeps the rest of the layer.
    holes = FusionStrategy(costs.positions, ("none",) + full.units[1:])
    dropped = costs.s_branch[0] + costs.t_branch[0]
    assert costs.of(holes) == cost.Cost(costs.of(full).macs - dropped.macs,
                                        costs.of(full).params - dropped.params)


def test_full_template_costs_are_the_published_figures():
    """123.6 GMACs (247.1 GFLOPs) at 16x224x224, the README's benchmark figure; parameters:
    the template's 21,404,649 trainable less its 123 gate logits, and with 1000 classes the
    DenseNet121-3D counts of the README's backbone table."""
    c = cost.template_costs(T.preset("densenet121"), 174)
    full = c.of(FusionStrategy.uniform(c.positions, "S+ST"))
    assert round(full.macs / 1e9, 1) == 123.6 and full.params == 21_404_649 - 123
    c = cost.template_costs(T.preset("densenet121"), 1000)
    params = {u: c.of(FusionStrategy.uniform(c.positions, u)).params for u in ("S", "ST", "S+ST")}
    assert params == {"S": 8_016_488, "ST": 17_461_864, "S+ST": 22_251_176}


def test_backbone_macs_from_the_graph():
    cfg = B.preset("mobilenetv2_tiny")
    pos = B.positions(cfg)
    clip = (cfg.num_frames, cfg.crop_size, cfg.crop_size, 3)  # backbones take any frame size
    s = cost.model_macs(B.build_backbone(cfg, FusionStrategy.uniform(pos, "S"), 4), clip)
    st = cost.model_macs(B.build_backbone(cfg, FusionStrategy.uniform(pos, "ST"), 4), clip)
    both = cost.model_macs(B.build_backbone(cfg, FusionStrategy.uniform(pos, "S+ST"), 4), clip)
    # A 3x1x1 branch costs three 1x1x1 branches: S+ST - S = 3 (S - rest) = ST - S + (S - rest).
    assert st - s == 2 * (both - st) and both > st > s > 0


def test_budget_pareto_and_best_within():
    rows = [{"key": k, "macs": m, "params": p, "video_top1": a, "clip_top1": a}
            for k, m, p, a in [("a", 10, 5, 0.5), ("b", 20, 9, 0.7), ("c", 20, 8, 0.6),
                               ("d", 30, 12, 0.7), ("e", 5, 2, 0.2)]]
    front = cost.pareto_front([(r["macs"], r["video_top1"]) for r in rows])
    assert [rows[i]["key"] for i in front] == ["e", "a", "b"]  # c and d are dominated by b
    assert cost.best_within(rows, 25)["key"] == "b"
    assert cost.best_within(rows, 9)["key"] == "e"
    assert cost.best_within(rows, 4) is None
    assert cost.best_within(rows, 35)["key"] == "b"  # as accurate as d, and cheaper
    assert cost.fits(rows[1], max_gmacs=20e-9, max_params=None)
    assert not cost.fits(rows[1], max_gmacs=19e-9, max_params=None)
    assert not cost.fits(rows[1], max_gmacs=None, max_params=8)
    png = cost.plot(rows, {"S": rows[4], "ST": rows[2], "S+ST": rows[3]}, budget_gmacs=2.5e-8,
                    opt_key="b")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_compute_price_shares_the_priors_total_out_by_each_gates_macs():
    # HAND's gated kernels, from the hand count above: (weights, MACs per clip).
    hand = {"b1_l1_s_gate": (32, 256), "b1_l1_t_gate": (96, 768), "t1_s_gate": (32, 256),
            "t1_t_gate": (96, 768), "b2_l1_s_gate": (32, 64), "b2_l1_t_gate": (96, 192),
            "head_gate": (24, 24)}
    weights, macs = sum(w for w, _ in hand.values()), sum(m for _, m in hand.values())
    k, n = 2.0, 10
    model = T.build_template(HAND, 3, gate=G.GateConfig(weight_term="compute", length_scale=k,
                                                        dataset_size=n))
    gates = {g.name: g for g in G.gate_layers(model)}
    assert set(gates) == set(hand)
    for name, (w, m) in hand.items():
        want = weights * m / macs
        assert gates[name].charged_weights == pytest.approx(want), name
        # The prior would charge its own w: same total, shared by compute instead.
        assert float(gates[name].squared_norm()) == pytest.approx(want / k ** 2)
        p = float(gates[name].drop_rate)
        entropy = p * np.log(p) + (1 - p) * np.log(1 - p)
        scale = 8.0 if name == "head_gate" else 1.0  # per-feature gate: entropy per feature
        assert float(gates[name].regularization()) == pytest.approx(
            (1 - p) * (k / n) * want / k ** 2 + scale * entropy / n, rel=1e-5), name
    # A saved template reloads with the same charges.
    again = T.Template.from_config(model.get_config())
    assert {g.name: g.charged_weights for g in G.gate_layers(again)} == pytest.approx(
        {name: g.charged_weights for name, g in gates.items()})


def test_compute_price_without_the_models_macs_says_how_to_get_them():
    import keras
    gate = G.VariationalDropPath(keras.layers.Conv3D(4, 1, use_bias=False), weight_term="compute",
                                 length_scale=2.0, name="lone_gate")
    gate.build((None, 2, 4, 4, 3))
    with pytest.raises(UserError, match="lone_gate.*assign_compute_prices"):
        gate.regularization()


def test_a_loaded_network_of_your_own_gets_its_compute_prices_again(tmp_path):
    import keras
    from stfusion_tf.analysis.cost import assign_compute_prices
    from stfusion_tf.model.fusion import FusionUnit
    gate = G.GateConfig(weight_term="compute", length_scale=2.0)
    inputs = keras.Input((4, None, None, 3))
    x = FusionUnit(8, gate=gate, key="u1", name="u1")(inputs)
    x = keras.layers.MaxPooling3D((1, 2, 2))(x)
    x = FusionUnit(16, gate=gate, key="u2", name="u2")(x)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling3D()(x))
    charged = assign_compute_prices(model, (4, 8, 8, 3))
    # u2 runs on a quarter of u1's positions with twice its outputs and 8/3 its inputs.
    assert charged["u2_t_gate"] / charged["u1_t_gate"] == pytest.approx(16 * 8 / (4 * 8 * 3))
    model.save(tmp_path / "own.keras")
    loaded = keras.models.load_model(tmp_path / "own.keras")
    gates = {g.name: g for g in G.gate_layers(loaded)}
    with pytest.raises(UserError, match="assign_compute_prices"):
        gates["u1_t_gate"].regularization()
    assert assign_compute_prices(loaded, (4, 8, 8, 3)) == pytest.approx(charged)
