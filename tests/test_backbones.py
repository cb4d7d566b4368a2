"""3D backbones from a FusionStrategy, the paper's rules, 2D->3D inflation."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from stfusion_tf.errors import UserError
from stfusion_tf.model import backbones as B
from stfusion_tf.model import fusion_rules as R
from stfusion_tf.model import inflation as I
from stfusion_tf.model import template as T
from stfusion_tf.model.normalization import PixelNormalization
from stfusion_tf.model.strategy import FusionStrategy

#: Trainable parameters of the 2D networks (torchvision / keras.applications, 1000 classes,
#: conv layers without bias).  With S units everywhere and a 1x7x7 stem, a 3D backbone has
#: exactly the 2D network's kernels, so it must match these to the parameter.
PARAMS_2D = {"resnet50": 25_557_032, "resnext50": 25_028_904, "resnext101": 44_177_704,
             "mobilenetv2": 3_504_872, "densenet121": 7_978_856}


@pytest.mark.parametrize("name", sorted(PARAMS_2D))
def test_full_size_backbones_match_2d_parameter_counts(name):
    cfg = B.preset(name, stem_temporal_kernel=1)
    pos = B.positions(cfg)
    flat = B.build_backbone(cfg, FusionStrategy.uniform(pos, "S"), 1000)
    assert B.count_params(flat)["params_trainable"] == PARAMS_2D[name]
    # The real 3D network: 16 x 224 x 224 clips, 5-frame stem (3 for MobileNetV2), S+ST units.
    cfg = B.preset(name, num_frames=16, crop_size=224)
    full = B.build_backbone(cfg, FusionStrategy.uniform(pos, "S+ST"), 174)
    assert full.output_shape == (None, 174)
    assert B.count_params(full)["params_trainable"] > PARAMS_2D[name]


@pytest.mark.parametrize("name", ["resnet_tiny", "resnext_tiny", "mobilenetv2_tiny", "densenet_tiny"])
def test_tiny_backbones_build_each_unit_and_a_mixed_strategy(name):
    cfg = B.preset(name)
    pos = B.positions(cfg)
    x = tf.random.uniform((2, 8, 32, 32, 3), 0, 255, seed=0)
    mixed = FusionStrategy(pos, tuple(("S", "ST", "S+ST")[i % 3] for i in range(len(pos))))
    for st in [FusionStrategy.uniform(pos, u) for u in ("S", "ST", "S+ST")] + [mixed]:
        model = B.build_backbone(cfg, st, 5)
        assert model(x, training=False).shape == (2, 5)
        names = set(T.layers_by_name(model))  # fusion units nest their branches
        for p, unit in zip(st.positions, st.units):
            s_layer, t_layer = _branch_names(cfg, p)
            assert (s_layer in names) == (unit in ("S", "S+ST")), (p, unit)
            assert (t_layer in names) == (unit in ("ST", "S+ST")), (p, unit)


def _branch_names(cfg, position):
    if cfg.arch == "densenet":
        k = position.lower().replace(".", "_")
        return f"{k}_s_conv", f"{k}_t_conv"
    stage, block = position.split(".")
    if cfg.arch == "resnet":
        name = f"conv{stage[1:]}_block{block[1:]}_1_conv"
    else:
        idx = B.positions(cfg).index(position)
        name = "expanded_conv_project" if idx == 0 else f"block_{idx}_expand"
    return f"{name}_s", f"{name}_t"


def test_backbones_reject_bad_strategies():
    cfg = B.preset("resnet_tiny")
    # 'none' needs a residual block: every ResNet block has one, MobileNetV2's M2.B1
    # (wider, stride 2) and every DenseNet position do not.
    mobile = B.preset("mobilenetv2_tiny")
    mpos = B.positions(mobile)
    with pytest.raises(UserError, match="'none'.* at M2.B1: no residual path"):
        B.build_backbone(mobile, FusionStrategy(mpos, ("S", "none") + ("S",) * (len(mpos) - 2)), 3)
    dense = B.preset("densenet_tiny")
    dpos = B.positions(dense)
    with pytest.raises(UserError, match="'none'.* at B1.L1"):
        B.build_backbone(dense, FusionStrategy(dpos, ("none",) + ("S",) * (len(dpos) - 1)), 3)
    with pytest.raises(UserError, match="the resnet backbone has 4: C2.B1, C3.B1, C4.B1, C5.B1"):
        B.build_backbone(cfg, FusionStrategy.uniform(("B1.L1",), "S"), 3)
    with pytest.raises(ValueError, match="valid backbones: resnet50"):
        B.preset("vgg")


def test_paper_rules():
    ss = R.resolve("paper", B.preset("resnext101"), "ss")
    c4 = [u for p, u in zip(ss.positions, ss.units) if p.startswith("C4.")]
    assert c4 == ["ST"] + ["S+ST"] * 9 + ["ST"] * 13  # authors' ResNeXt101 stage 3 on SS
    assert ss.code().split("|")[0] == "FFF" and ss.code().split("|")[3] == "FFF"
    assert R.resolve("paper", B.preset("resnet50"), "ss").code() == "FFF|FFFF|TTTTTT|FFF"
    k4 = R.resolve("paper", B.preset("resnext101"), "k400")
    assert "".join(k4.code().split("|")[2]) == "SSSSS" + "F" * 10 + "SSSS" + "TTTT"
    assert R.resolve("paper", B.preset("mobilenetv2"), "ss").code() == "F|FF|FFF|TTTT|TTT|FFF|F"
    assert R.resolve("paper", B.preset("mobilenetv2"), "k400").code() == "F|FF|SSS|FFFF|SSS|TTT|F"
    assert set(R.resolve("paper", B.preset("resnet50"), "ucf").units) == {"S+ST"}
    # DenseNet121: the paper's best sampled strategy of Fig. 4, unit for unit.
    dense = R.resolve("paper", B.preset("densenet121"), "ss")
    assert dense.code() == R.PAPER_BEST["ssv1"] and dense.counts()["ST"] == 19


def test_specs_per_stage_per_position_json_and_errors(tmp_path):
    cfg = B.preset("resnet_tiny")
    assert R.resolve("S,ST,S+ST,ST", cfg).units == ("S", "ST", "S+ST", "ST")
    deep = B.preset("resnet50")
    st = R.resolve("ST,S,S,S+ST", deep)
    assert st.code() == "TTT|SSSS|SSSSSS|FFF"
    path = tmp_path / "s.json"
    st.save(str(path))
    assert R.resolve(str(path), deep) == st
    with pytest.raises(ValueError, match="positions do not match"):
        R.resolve(str(path), cfg)
    with pytest.raises(ValueError, match="one per stage"):
        R.resolve("S,ST", cfg)
    with pytest.raises(ValueError, match="valid specs are S, ST, S\\+ST, paper, opt"):
        R.resolve("spatial", cfg)


def test_transfer_by_branch_keeps_a_branch_the_template_uses_at_that_scale():
    """S 0.40, ST 0.25, S+ST 0.35 everywhere: the most probable unit is S, but T is used 60%
    of the time: the per-branch rule keeps both; a branch used < 1/2 is dropped."""
    src = ("B1.L1", "T1", "B2.L1", "T2", "B3.L1", "T3", "B4.L1")
    table = np.array([[0.40, 0.25, 0.35]] * 4 + [[0.7, 0.1, 0.1]] * 3)
    target = B.positions(B.preset("resnet_tiny"))
    assert R.from_marginals(table, target, src).code() == "S|S|S|S"
    assert R.from_marginals_by_branch(table, target, src).code() == "F|F|S|S"
    assert [R.scale_of(p) for p in ("B2.L3", "T2", "C3.B1", "M3.B2", "M5.B1", "x")] == \
        [2, 2, 2, 2, 3, None]


def test_opt_from_a_template_analysis(tmp_path):
    tiny = T.template_positions(T.preset("tiny"))
    # Marginals: S+ST in the lower half, ST in the upper half.
    rows = [{"position": p, "S": 0.1, "ST": 0.2 if i < len(tiny) // 2 else 0.7,
             "S+ST": 0.6 if i < len(tiny) // 2 else 0.1} for i, p in enumerate(tiny)]
    (tmp_path / "marginals.json").write_text(json.dumps(rows))
    opt = FusionStrategy(tiny, ("S",) * len(tiny))
    opt.save(str(tmp_path / "opt_strategy.json"))
    # Same positions as the template (DenseNet): the Opt strategy itself, as in the paper.
    assert R.resolve("opt", B.preset("densenet_tiny"), analysis_dir=str(tmp_path)) == opt
    # Other backbones, the earlier rule (opt_depth): the most probable unit by relative depth.
    assert R.resolve("opt_depth", B.preset("resnet_tiny"), analysis_dir=str(tmp_path)).code() \
        == "F|F|T|T"
    assert R.resolve("opt_depth", B.preset("mobilenetv2"), analysis_dir=str(tmp_path)).code() == \
        "F|FF|FFF|FTTT|TTT|TTT|T"
    # opt: per branch over the template's positions at the same spatial scale.  MobileNetV2's
    # row 4 works at the scale of dense block 3 (all upper half: T only), not at the relative
    # depth that straddles the halves.
    assert R.resolve("opt", B.preset("resnet_tiny"), analysis_dir=str(tmp_path)).code() == "F|F|T|T"
    assert R.resolve("opt", B.preset("mobilenetv2"), analysis_dir=str(tmp_path)).code() == \
        "F|FF|FFF|TTTT|TTT|TTT|T"
    with pytest.raises(UserError, match="analyze"):
        R.resolve("opt", B.preset("resnet_tiny"), analysis_dir=str(tmp_path / "nothing"))


def test_template_strategy_network_reproduces_mask_mode():
    """DenseNet121-3D of a strategy, with the template's weights == the template in mask mode."""
    from stfusion_tf.model import gates as G
    cfg = T.preset("tiny")
    template = T.build_template(cfg, 3)
    gates = T.TemplateGates(template)
    for i, g in enumerate(gates.all):
        g.p_logit.assign(-2.0 + 0.1 * i)
    _randomize_bn(template)
    pos = gates.positions
    st = FusionStrategy(pos, tuple(("S", "ST", "S+ST")[i % 3] for i in range(len(pos))))
    G.set_inference_mode(gates.s + gates.t, "mask")
    gates.set_strategy(st)
    x = tf.random.uniform((2, 8, 32, 32, 3), 0, 255, seed=2)
    plain = T.build_template(cfg, 3, strategy=st)
    assert T.transfer_template_weights(template, plain) > 0
    np.testing.assert_allclose(plain(x, training=False), template(x, training=False),
                               rtol=1e-4, atol=1e-5)


_RNG = np.random.default_rng(0)


def _randomize_bn(model, calibrate=None):
    """Non-trivial BN parameters and statistics and conv biases, so folding and copying
    are exercised.  With ``calibrate`` (a batch), the moving statistics are that batch's,
    which keeps a deep random network from saturating into a constant output."""
    bns = []
    for l in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(l, keras.layers.BatchNormalization):
            g, b, m, v = (np.asarray(w) for w in l.weights)
            l.set_weights([_RNG.uniform(0.5, 1.5, g.shape), _RNG.normal(0, 0.1, b.shape),
                           _RNG.normal(0, 0.1, m.shape), _RNG.uniform(0.5, 2.0, v.shape)])
            bns.append(l)
        elif isinstance(l, keras.layers.Conv2D) and l.use_bias:
            l.bias.assign(_RNG.normal(0, 0.1, l.bias.shape))
    if calibrate is not None:
        momenta = [l.momentum for l in bns]
        for l in bns:
            l.momentum = 0.0
        model(calibrate, training=True)
        for l, m in zip(bns, momenta):
            l.momentum = m


@pytest.mark.parametrize("name,overrides", [("resnet50", {"stride_on": "first"}),
                                            ("mobilenetv2", {"alpha": 0.35}),
                                            ("densenet121", {})])
def test_inflated_network_on_identical_frames_equals_the_2d_network(name, overrides):
    keras.utils.set_random_seed(0)
    cfg = B.preset(name, temporal_padding="replicate", num_frames=4, crop_size=32, **overrides)
    model2d = I.keras_2d_model(cfg, 5)
    frames = _RNG.uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    _randomize_bn(model2d, PixelNormalization()(_RNG.uniform(0, 255, (8, 32, 32, 3)).astype("float32")))
    logits2d = model2d(PixelNormalization()(frames), training=False).numpy()
    other = model2d(PixelNormalization()(frames[::-1]), training=False).numpy()
    assert np.abs(logits2d - other).max() > 1e-3  # the check below is not vacuous
    clip = np.repeat(frames[:, None], cfg.num_frames, axis=1)
    for spec in ("S", "ST", "S+ST"):
        model3d = B.build_backbone(cfg, R.resolve(spec, cfg), 5)
        report = I.inflate(model3d, model2d, cfg.arch)
        assert report["copied"] > 0 and not report["skipped"]
        # float32 round-off through ~50 layers with re-estimated BN statistics reaches about
        # 1e-4 of the logits' scale (measured over seeds); a wrong mapping is off by > 1e-2.
        np.testing.assert_allclose(model3d(clip, training=False), logits2d, rtol=0,
                                   atol=1e-3 * np.abs(logits2d).max())


def test_inflation_from_a_local_weights_file_skips_a_classifier_of_another_size(tmp_path):
    cfg = B.preset("densenet121", num_frames=2, crop_size=32)
    model2d = I.keras_2d_model(cfg, 10)
    path = str(tmp_path / "densenet121_2d.weights.h5")
    model2d.save_weights(path)
    model3d = B.build_backbone(cfg, R.resolve("S+ST", cfg), 7)
    report = I.inflate_from_keras(model3d, cfg, weights=path, num_classes_2d=10)
    assert report["skipped"] and "predictions" in report["skipped"][0]
    k2 = np.asarray(model2d.get_layer("conv1_conv").kernel)  # 7x7 stem -> 5x7x7, / 5
    np.testing.assert_allclose(model3d.get_layer("stem_conv").kernel[2], k2 / 5, rtol=1e-6)
    with pytest.raises(ValueError, match="no 2D ResNeXt"):
        I.keras_2d_model(B.preset("resnext50"), 10)
