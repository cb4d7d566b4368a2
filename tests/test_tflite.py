"""TFLite export of gate-free classifiers: runs in the TFLite interpreter, matches the
SavedModel."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from stfusion_tf import export
from stfusion_tf.errors import UserError
from stfusion_tf.model import backbones as B
from stfusion_tf.model import template as T
from stfusion_tf.model.strategy import FusionStrategy

LABELS = ["east", "west", "south", "north"]


def _densenet():
    model = T.build_template(T.preset("tiny"), 4)
    units = tuple(np.random.default_rng(0).choice(["S", "ST", "S+ST"], len(model.positions)))
    return model, T.strategy_network(model, FusionStrategy(model.positions, units))


def _mobilenet():
    cfg = B.preset("mobilenetv2_tiny")
    return B.build_backbone(cfg, FusionStrategy.uniform(B.positions(cfg), "S+ST"), 4)


@pytest.mark.parametrize("arch", ["densenet3d", "mobilenetv2_3d"])
def test_tflite_runs_and_matches_the_saved_model(arch, tmp_path):
    network = _densenet()[1] if arch == "densenet3d" else _mobilenet()
    # Trained-looking BatchNorm statistics, so the comparison is not of a trivial network.
    rng = np.random.default_rng(1)
    for layer in network.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(0, 0.1, layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, layer.moving_variance.shape))
    # The networks take any frame size: the exports fix it to the training crop (32).
    saved = export.export_network(network, arch, LABELS, str(tmp_path), eval_short_side=40,
                                  crop_size=32)
    path = export.export_tflite(network, arch, LABELS, str(tmp_path), crop_size=32)
    flat = open(path, "rb").read()
    clips = rng.uniform(0, 255, (3, network.input_shape[1], 32, 32, 3)).astype(np.float32)
    serve = tf.saved_model.load(saved).signatures["preprocessed"]
    want = serve(clips=tf.constant(clips))["probabilities"].numpy()
    got = export.run_tflite(flat, clips)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got.shape == (3, 4) and np.allclose(got.sum(1), 1, atol=1e-5)
    meta = json.loads((tmp_path / "tflite" / f"classifier_{arch}.json").read_text())
    assert meta["input"]["shape"] == [1, 8, 32, 32, 3]
    assert meta["max_abs_diff_vs_keras"] <= export.TFLITE_TOLERANCE
    # Which ops need TF Select: the DenseNet's 3D pooling; MobileNetV2-3D none.
    want_select = ["AvgPool3D", "MaxPool3D"] if arch == "densenet3d" else []
    assert meta["tf_select_ops"] == want_select == export.tflite_ops(flat)[1]
    assert "CONV_3D" in meta["builtin_ops"]
    assert (tmp_path / "tflite" / f"classifier_{arch}.labels.txt").read_text().split() == LABELS


def test_gated_template_is_refused(tmp_path):
    model, _ = _densenet()
    with pytest.raises(UserError, match="'none' unit"):
        export.export_tflite(model, "opt", LABELS, str(tmp_path))
    assert not (tmp_path / "tflite").exists()
