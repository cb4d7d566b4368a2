"""ImageNet-style initialisation of the gated template: DenseNet121 2D -> 3D template."""

import keras
import numpy as np
import pytest

from stfusion_tf.errors import UserError
from stfusion_tf.model import gates as G
from stfusion_tf.model import inflation as I
from stfusion_tf.model import template as T
from stfusion_tf.model.normalization import PixelNormalization
from stfusion_tf.model.strategy import FusionStrategy

_RNG = np.random.default_rng(0)
FRAMES = 4


def _randomize_bn(model, calibrate):
    """Random BN affine parameters, then moving statistics set to a batch's own (momentum
    0 for one training-mode pass), so activations keep a sane scale through 121 layers."""
    bns = [l for l in T.layers_by_name(model).values()  # fusion units nest their BNs
           if isinstance(l, keras.layers.BatchNormalization)]
    for l in bns:
        g, b, m, v = l.weights
        l.set_weights([_RNG.uniform(0.5, 1.5, g.shape), _RNG.normal(0, 0.1, b.shape),
                       _RNG.normal(0, 0.1, m.shape), _RNG.uniform(0.5, 2.0, v.shape)])
        l.momentum = 0.0
    model(calibrate, training=True)
    for l in bns:
        l.momentum = 0.99


@pytest.fixture(scope="module")
def densenet2d(tmp_path_factory):
    """A randomly initialised keras.applications.DenseNet121 saved to a local file (nothing
    is downloaded), its logits on 2 frames, and those frames."""
    keras.utils.set_random_seed(0)
    model = keras.applications.DenseNet121(weights=None, input_shape=(32, 32, 3), classes=5,
                                           classifier_activation=None)
    norm = PixelNormalization()
    _randomize_bn(model, norm(_RNG.uniform(0, 255, (8, 32, 32, 3)).astype("float32")))
    path = str(tmp_path_factory.mktemp("weights") / "densenet121_2d.keras")
    model.save(path)
    frames = _RNG.uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    logits = model(norm(frames), training=False).numpy()
    assert np.abs(logits - model(norm(frames[::-1]), training=False).numpy()).max() > 1e-3
    return path, model, frames, logits


@pytest.fixture(scope="module")
def template():
    cfg = T.preset("densenet121", num_frames=FRAMES, crop_size=32, temporal_padding="replicate")
    return T.build_template(cfg, 5)


def _logits(model, frames):
    """Inference logits on a still clip (eager: tracing the 121-layer template takes
    longer than the few calls made here)."""
    return model(np.repeat(frames[:, None], FRAMES, axis=1), training=False).numpy()


def _close(model, frames, logits):
    # float32 round-off through 121 layers reaches ~1e-4 of the logits' scale; a wrong
    # mapping or scale is off by > 1e-2.
    np.testing.assert_allclose(_logits(model, frames), logits, rtol=0,
                               atol=1e-3 * np.abs(logits).max())


def test_inflated_template_reproduces_the_2d_network_on_a_still_clip(densenet2d, template):
    path, model2d, frames, logits = densenet2d
    gates = T.TemplateGates(template)
    report = I.initialize_template(template, path)
    # Every layer but the gates' drop logits: stem, 61 x (2 branch BNs + 2 convs) + 58 x
    # (BN + 1x3x3 conv), head BN, classifier (same 5 classes here).
    assert report["copied"] == 2 + 61 * 4 + 58 * 2 + 1 + 1 and not report["skipped"]
    G.set_enabled(gates.all, False)  # the warm-up the template is inflated for
    G.set_inference_mode(gates.all, "expected")
    _close(template, frames, logits)
    for unit in ("S", "ST", "S+ST"):  # each uniform strategy's masks, split for that strategy
        strategy = FusionStrategy.uniform(gates.positions, unit)
        I.inflate(template, model2d, "densenet", strategy=strategy)
        gates.set_strategy(strategy)
        G.set_inference_mode(gates.s + gates.t, "mask")
        _close(template, frames, logits)


def test_the_authors_whole_kernel_copy_is_exact_for_one_branch_only(densenet2d, template):
    _, model2d, frames, logits = densenet2d
    gates = T.TemplateGates(template)
    G.set_enabled(gates.all, False)
    I.inflate(template, model2d, "densenet", branches="copy")
    k2 = np.asarray(model2d.get_layer("conv2_block1_1_conv").kernel)
    s = T.layers_by_name(template)["b1_l1_s_conv"].kernel.numpy()
    t = T.layers_by_name(template)["b1_l1_t_conv"].kernel.numpy()
    np.testing.assert_allclose(s[0], k2, rtol=1e-6)
    np.testing.assert_allclose(t, np.repeat(k2[None], 3, 0) / 3, rtol=1e-6)
    G.set_inference_mode(gates.s + gates.t, "mask")
    for unit in ("S", "ST"):
        gates.set_strategy(FusionStrategy.uniform(gates.positions, unit))
        _close(template, frames, logits)
    gates.set_strategy(FusionStrategy.uniform(gates.positions, "S+ST"))
    assert np.abs(_logits(template, frames) - logits).max() > 1e-2 * np.abs(logits).max()


def test_initialisation_errors_are_user_errors(tmp_path):
    tiny = T.build_template(T.preset("tiny"), 3)
    with pytest.raises(UserError, match="--preset=densenet121"):
        I.initialize_template(tiny, "imagenet")
    with pytest.raises(UserError, match="does not exist"):
        I.load_2d("DenseNet121", str(tmp_path / "nope.h5"))
    with pytest.raises(UserError, match="valid values: split, copy"):
        I.inflate(tiny, tiny, "densenet", branches="half")


def test_backbone_initialisers_follow_the_template_s_init_weights(tmp_path):
    from stfusion_tf.model import backbones as B
    dense, resnet = B.preset("densenet121"), B.preset("resnet50")
    assert I.backbone_init(resnet, None, "none") is None
    # A DenseNet121 file initialises the densenet121 backbone only; ImageNet every backbone
    # keras.applications has; a backbone without a 2D twin starts from scratch, said why.
    assert I.backbone_init(resnet, None, str(tmp_path / "d.keras")) is None
    assert callable(I.backbone_init(dense, None, str(tmp_path / "d.keras")))
    logs = []
    init = I.backbone_init(B.preset("resnext_tiny"), None, "imagenet", log=logs.append)
    assert init(None) == {"init_weights": "none", "reason": logs[0].split(": ", 1)[1]}
    assert "no 2D ResNeXt" in logs[0]


def test_a_backbone_template_inflates_from_its_2d_twin(tmp_path):
    """--init_weights for --preset=mobilenetv2: keras.applications.MobileNetV2's weights go
    into the gated backbone, each fusion unit's 1x1 split between its two branches."""
    import keras
    model2d = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3))
    path = str(tmp_path / "m2d.keras")
    model2d.save(path)
    template = T.build_template(T.preset("mobilenetv2", num_frames=2, crop_size=32), 7)
    report = I.initialize_template(template, path)
    assert report["copied"] > 100 and report["skipped"] == ["predictions (1000 classes in 2D, 7 in 3D)"]
    layers = T.layers_by_name(template)
    k2 = np.asarray(model2d.get_layer("block_1_expand").kernel)
    np.testing.assert_allclose(layers["block_1_expand_s"].kernel.numpy()[0], k2 / 2, rtol=1e-6)
    np.testing.assert_allclose(layers["block_1_expand_t"].kernel.numpy(),
                               np.repeat(k2[None], 3, 0) / 6, rtol=1e-6)
