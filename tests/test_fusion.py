"""The one fusion unit: its layer, every backbone as a template, 'none' on residual blocks."""

import keras
import numpy as np
import pytest

from stfusion_tf.analysis import cost
from stfusion_tf.model import backbones as B
from stfusion_tf.model import template as T
from stfusion_tf.model.fusion import FusionUnit
from stfusion_tf.model.gates import set_inference_mode
from stfusion_tf.model.strategy import FusionStrategy

_X = np.random.default_rng(0).uniform(0, 255, (2, 8, 32, 32, 3)).astype("float32")


def test_fusion_unit_config_round_trip_and_branches():
    gated = FusionUnit(6, key="c2_b1", preactivation=True, return_keep=True, name="u")
    y, keep = gated(_X[..., :3] / 255.0, training=True)
    assert y.shape == (2, 8, 32, 32, 6) and keep.shape == (2, 1, 1, 1, 1)
    assert [g.name for g in gated.gates] == ["c2_b1_s_gate", "c2_b1_t_gate"]
    clone = FusionUnit.from_config(gated.get_config())
    assert clone.get_config() == gated.get_config()
    for unit, kernels in (("S", [(1, 1, 1)]), ("ST", [(3, 1, 1)]), ("S+ST", [(1, 1, 1), (3, 1, 1)])):
        fixed = FusionUnit(4, unit, key="k", strides=(1, 2, 2))
        assert fixed(_X).shape == (2, 8, 16, 16, 4)
        assert [c.kernel_size for c in fixed.convs] == kernels and not fixed.gates
    with pytest.raises(ValueError, match="residual path"):
        FusionUnit(4, "none")


def _random_strategy(model, seed):
    rng = np.random.default_rng(seed)
    units = [rng.choice(("S", "ST", "S+ST", "none") if p in model.none_positions
                        else ("S", "ST", "S+ST")) for p in model.positions]
    units[0] = "none" if model.positions[0] in model.none_positions else units[0]
    return FusionStrategy(model.positions, tuple(units))


@pytest.mark.parametrize("preset", ["resnet_tiny", "mobilenetv2_tiny", "tiny"])
def test_every_backbone_is_a_template_whose_masks_equal_the_built_network(preset):
    template = T.build_template(T.preset(preset), 4)
    gates = T.TemplateGates(template)
    assert len(gates.s) == len(template.positions) and gates.head is not None
    template(_X, training=True)
    strategy = _random_strategy(template, 1)
    gates.set_strategy(strategy)
    set_inference_mode(gates.s + gates.t, "mask")
    network = T.strategy_network(template, strategy)
    np.testing.assert_allclose(template(_X, training=False), network(_X, training=False),
                               rtol=1e-4, atol=1e-4)
    # The cost of a strategy read from the template is the built network's.
    costs = cost.network_costs(template)
    assert costs.of(strategy).macs == cost.model_macs(network)
    assert costs.of(strategy).params == B.count_params(network)["params_trainable"]


def test_none_on_a_residual_block_is_its_shortcut_and_costs_nothing_more():
    cfg = B.preset("resnet_tiny")
    pos = B.positions(cfg)
    full = B.build_backbone(cfg, FusionStrategy.uniform(pos, "S"), 3)
    hollow = B.build_backbone(cfg, FusionStrategy(pos, ("S", "none", "S", "none")), 3)
    names = set(T.layers_by_name(hollow))
    assert "conv3_block1_2_conv" not in names and "conv3_block1_0_conv" in names  # projection
    assert cost.model_macs(hollow) < cost.model_macs(full)
    assert B.count_params(hollow)["params_trainable"] < B.count_params(full)["params_trainable"]


def test_network_costs_equal_the_analytic_template_costs():
    config = T.preset("tiny")
    model = T.build_template(config, 5)
    general, analytic = cost.network_costs(model), cost.template_costs(config, 5)
    assert general.fixed == analytic.fixed
    assert general.s_branch == analytic.s_branch and general.t_branch == analytic.t_branch
    assert all(b == cost.Cost() for b in general.block)


def test_template_save_load_keeps_the_backbone_config(tmp_path):
    model = T.build_template(T.preset("mobilenetv2_tiny"), 3)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.config == model.config and loaded.positions == model.positions
    np.testing.assert_allclose(model(_X), loaded(_X), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("preset,positions", [("resnet50", 16), ("mobilenetv2", 17)])
def test_full_size_backbone_templates_take_a_training_step(preset, positions):
    """The real backbones as templates at their real input (16 x 224^2): shapes, one step."""
    model = T.build_template(T.preset(preset, num_frames=16, crop_size=224), 174,
                             T.GateConfig(dataset_size=1000))
    gates = T.TemplateGates(model)
    assert len(model.positions) == positions == len(gates.s) and gates.head is not None
    assert model.compute_output_shape((2, 16, 224, 224, 3)) == (2, 174)
    model.compile(keras.optimizers.SGD(0.1),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = gates.drop_rates()
    x = np.random.default_rng(0).uniform(0, 255, (1, 16, 224, 224, 3)).astype("float32")
    loss = model.train_on_batch(x, np.array([3]))
    assert np.isfinite(loss) and np.abs(gates.drop_rates() - before).max() > 0
