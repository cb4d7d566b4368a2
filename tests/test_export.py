"""SavedModels load with TensorFlow alone and reproduce the Keras outputs."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from stfusion_tf import export
from stfusion_tf.model import template as T
from stfusion_tf.model.strategy import FusionStrategy

LOADER = r"""
import json, sys
import numpy as np
import tensorflow as tf
assert "stfusion_tf" not in sys.modules
d = json.load(open(sys.argv[1]))
clf = tf.saved_model.load(d["classifier"])
ps = tf.saved_model.load(d["space"])
x = np.load(d["x"]); u = np.load(d["u"])
out = {
  "float": clf.signatures["preprocessed"](clips=tf.constant(x))["probabilities"].numpy().tolist(),
  "uint8": clf.signatures["serving_default"](clips=tf.constant(u))["probabilities"].numpy().tolist(),
  "names": [n.decode() for n in clf.signatures["serving_default"](clips=tf.constant(u))["top_k_names"].numpy()[0]],
  "marginals": ps.signatures["marginals"]()["marginals"].numpy().tolist(),
  "sample": ps.signatures["sample"](num=tf.constant(5), seed=tf.constant(7, tf.int64))["unit_codes"].numpy().tolist(),
  "stfusion_loaded": "stfusion_tf" in sys.modules,
}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model = T.build_template(T.preset("tiny"), 4)
    gates = T.TemplateGates(model)
    rng = np.random.default_rng(0)
    for g in gates.all:
        g.p_logit.assign(rng.uniform(-3, 0))
    units = tuple(rng.choice(["S", "ST", "S+ST"], len(gates.positions)))
    strategy = FusionStrategy(gates.positions, units)
    labels = ["east", "west", "south", "north"]
    space = export.export_probability_space(model, str(root))
    logs = []
    clf = export.export_classifier(model, strategy, "opt", labels, str(root), eval_short_side=40,
                                   log=logs.append)
    export.strategy_classifier(model, strategy)  # the reference: the template in mask mode
    return {"model": model, "gates": gates, "space": space, "classifier": clf, "root": root,
            "labels": labels, "strategy": strategy, "logs": logs}


def test_classifier_is_the_gate_free_network_of_the_strategy(exported):
    model, strategy = exported["model"], exported["strategy"]
    assert "gate-free DenseNet-3D" in exported["logs"][0]
    net = export.classifier_network(model, strategy)
    assert net is not model and net.count_params() < model.count_params()
    assert not T.gate_layers(net)
    loaded = tf.saved_model.load(exported["classifier"])
    assert sum(int(np.prod(v.shape)) for v in loaded.variables) == net.count_params()
    # A functional model without the Template's config (saved by an older version), or a
    # strategy with a "none" unit: the masked template serves.
    functional = keras.Model(model.inputs, model.outputs)
    assert export.classifier_network(functional, strategy) is functional
    holes = FusionStrategy(strategy.positions, ("none",) + strategy.units[1:])
    assert export.classifier_network(model, holes) is model
    export.strategy_classifier(model, strategy)  # back to the fixture's reference state


def test_fresh_tensorflow_process_reproduces_keras_outputs(exported):
    root = exported["root"]
    x = np.random.default_rng(1).normal(size=(2, 8, 32, 32, 3)).astype(np.float32)
    u = np.random.default_rng(2).integers(0, 256, size=(2, 11, 48, 64, 3)).astype(np.uint8)
    np.save(root / "x.npy", x)
    np.save(root / "u.npy", u)
    spec = {"classifier": exported["classifier"], "space": exported["space"],
            "x": str(root / "x.npy"), "u": str(root / "u.npy")}
    (root / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH="")
    r = subprocess.run([sys.executable, "-c", LOADER, str(root / "spec.json")], env=env,
                       capture_output=True, text=True, timeout=300, cwd=str(root))
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["stfusion_loaded"] is False
    model = exported["model"]
    want = tf.nn.softmax(model(x, training=False)).numpy()
    np.testing.assert_allclose(out["float"], want, atol=1e-5)
    mod = export.Classifier(model, exported["labels"], 40)
    np.testing.assert_allclose(out["uint8"], mod.serve_uint8(tf.constant(u))["probabilities"], atol=1e-5)
    assert set(out["names"]) <= set(exported["labels"]) and len(out["names"]) == 4
    from stfusion_tf.analysis import marginals as M
    np.testing.assert_allclose(out["marginals"], M.marginals(exported["gates"].drop_rates()), atol=1e-5)
    assert np.array(out["sample"]).shape == (5, 11)


def test_sampler_is_reproducible_and_matches_sampling_marginals(exported):
    ps = tf.saved_model.load(exported["space"])
    a = ps.signatures["sample"](num=tf.constant(3000), seed=tf.constant(1, tf.int64))["unit_codes"].numpy()
    b = ps.signatures["sample"](num=tf.constant(3000), seed=tf.constant(1, tf.int64))["unit_codes"].numpy()
    c = ps.signatures["sample"](num=tf.constant(3000), seed=tf.constant(2, tf.int64))["unit_codes"].numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    want = ps.signatures["marginals"]()["sampling_marginals"].numpy()  # [P, 4]: S, ST, S+ST, none
    freq = np.stack([(a == k).mean(0) for k in range(4)], axis=1)
    assert np.all(np.abs(freq - want) < 4 * np.sqrt(want * (1 - want) / 3000) + 1e-3)


def test_saved_model_cli_lists_the_signatures(exported):
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([cli, "show", "--all", "--dir", exported["classifier"]], env=env,
                         capture_output=True, text=True, timeout=300).stdout
    assert "signature_def['serving_default']" in out and "signature_def['preprocessed']" in out
    assert "DT_UINT8" in out
    out = subprocess.run([cli, "show", "--all", "--dir", exported["space"]], env=env,
                         capture_output=True, text=True, timeout=300).stdout
    for sig in ("sample", "marginals", "drop_rates"):
        assert f"signature_def['{sig}']" in out


def test_bad_inputs_fail_clearly(exported):
    clf = tf.saved_model.load(exported["classifier"])
    serve = clf.signatures["serving_default"]
    with pytest.raises((TypeError, ValueError, tf.errors.InvalidArgumentError), match="not compatible with expected shape"):
        serve(clips=tf.zeros((2, 8, 32, 3), tf.uint8))  # wrong rank
    with pytest.raises((TypeError, ValueError, tf.errors.InvalidArgumentError), match="uint8"):
        serve(clips=tf.zeros((1, 8, 32, 32, 3), tf.float32))  # wrong dtype
    with pytest.raises(tf.errors.InvalidArgumentError, match="at least one frame"):
        serve(clips=tf.zeros((1, 0, 32, 32, 3), tf.uint8))
    with pytest.raises(tf.errors.InvalidArgumentError, match="not compatible with expected shape \\[\\?,8,32,32,3\\]"):
        clf.signatures["preprocessed"](clips=tf.zeros((1, 4, 32, 32, 3)))


def test_saved_model_cli_runs_the_serving_signature(exported, tmp_path):
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    clips = np.random.default_rng(3).integers(0, 256, size=(1, 9, 40, 40, 3)).astype(np.uint8)
    np.save(tmp_path / "clips.npy", clips)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    r = subprocess.run([cli, "run", "--dir", exported["classifier"], "--tag_set", "serve",
                        "--signature_def", "serving_default",
                        "--inputs", f"clips={tmp_path / 'clips.npy'}"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "probabilities" in r.stdout and "top_k_names" in r.stdout
    r = subprocess.run([cli, "run", "--dir", exported["space"], "--tag_set", "serve",
                        "--signature_def", "sample", "--input_exprs", "num=3;seed=7"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "unit_codes" in r.stdout
