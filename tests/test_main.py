"""The absl entry point: clear messages for bad flags, parameter summary."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "stfusion_tf.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_bad_mode_names_valid_values():
    r = _run("--mode=bogus")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert "prepare" in r.stderr and "analyze" in r.stderr and "export" in r.stderr


def test_inconsistent_flags_are_usage_errors():
    r = _run("--mode=train", "--epochs=2", "--warmup_epochs=5")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "--warmup_epochs=5 exceeds --epochs=2" in r.stderr


def test_summary_prints_parameter_counts():
    r = _run("--mode=summary", "--preset=tiny", "--num_classes=4")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["positions"] == 11 and out["params_total"] > 10000
    g = {u: out["strategies"][u]["gmacs"] for u in ("S", "ST", "S+ST")}
    assert 0 < g["S"] < g["ST"] < g["S+ST"] == out["template_gmacs"]
    assert out["strategies"]["S+ST"]["params"] == out["params_trainable"] - 23  # less the gates


@pytest.mark.parametrize("preset,positions", [("resnet50", 16), ("mobilenetv2", 17)])
def test_summary_of_a_backbone_template_at_full_size(preset, positions):
    """A backbone as a template: the gated network and its gate-free uniform networks."""
    r = _run("--flagfile=configs/ssv1.flags", "--mode=summary", f"--preset={preset}")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["input"] == [16, 224, 224, 3] and out["positions"] == positions
    g = {u: out["strategies"][u]["gmacs"] for u in ("S", "ST", "S+ST")}
    assert 0 < g["S"] < g["ST"] < g["S+ST"] == out["template_gmacs"]
    # Gated = S+ST's network plus one drop logit per branch gate and the head gate.
    assert out["params_trainable"] - out["strategies"]["S+ST"]["params"] == 2 * positions + 1


def test_every_config_parses_and_its_network_builds():
    """Full-size configs are shape-checked on CPU: build only, no data needed."""
    import glob
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.flags"))):
        r = _run(f"--flagfile={path}", "--mode=summary")
        assert r.returncode == 0, (path, r.stderr[-2000:])
        out = json.loads(r.stdout)
        name = os.path.basename(path)
        if name.startswith("synthetic"):
            assert out["input"] == [8, 32, 32, 3] and out["positions"] == 11
        else:
            assert out["input"] == [16, 224, 224, 3] and out["positions"] == 61, name


def test_summary_of_backbones_and_bad_backbone_names():
    r = _run("--flagfile=configs/ssv1.flags", "--mode=summary", "--backbones=resnet50,mobilenetv2",
             "--num_classes=1000")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {b["backbone"]: b for b in json.loads(r.stdout)["backbones"]}
    assert rows["resnet50"]["input"] == [16, 224, 224, 3] and rows["resnet50"]["positions"] == 16
    # 3D ResNet50: 2D's 25.56M + the stem's 5x7x7 kernel; ST / S+ST add 3x1x1 kernels.
    assert 25.5e6 < rows["resnet50"]["params_S"] < rows["resnet50"]["params_ST"] \
        < rows["resnet50"]["params_S+ST"]
    assert rows["mobilenetv2"]["positions"] == 17
    r = _run("--mode=generalize", "--backbones=resnet50,vgg16")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "unknown vgg16" in r.stderr and "resnext101" in r.stderr
    r = _run("--mode=generalize", "--backbones=resnet_tiny", "--backbone_strategies=spatial",
             "--model_dir=/nonexistent")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "valid specs" in r.stderr


def test_flag_choices_are_the_library_tuples():
    """flags.py writes its choice lists out (absl checks flags before TensorFlow loads);
    each must equal the library tuple it stands for."""
    from absl import flags as absl_flags
    from stfusion_tf import compute, distribution, flags, main, training  # noqa: F401
    from stfusion_tf.analysis import fidelity
    from stfusion_tf.data import convert, pipeline, synthetic, verify
    from stfusion_tf.model import fusion_rules, gates
    from stfusion_tf.model import template as tpl
    library = {
        "dataset": synthetic.DATASETS + convert.LAYOUTS,
        "preset": tpl.preset_names(),
        "sampling": pipeline.SAMPLINGS,
        "num_crops": tuple(str(n) for n in pipeline.NUM_CROPS),
        "regularizer": gates.REGULARIZERS,
        "weight_term": gates.WEIGHT_TERMS,
        "searched_weight_term": gates.WEIGHT_TERMS,
        "optimizer": training.OPTIMIZERS,
        "gate_optimizer": training.GATE_OPTIMIZERS,
        "distribution": distribution.DISTRIBUTIONS,
        "fusion_family": ("auto",) + fusion_rules.FAMILIES,
        "repair": verify.REPAIRS,
        "precision": compute.PRECISIONS,
        "jit_compile": compute.JIT_COMPILE,
        "fidelity_pool": fidelity.POOLS,
    }
    FLAGS = absl_flags.FLAGS
    for name, choices in library.items():
        assert sorted(FLAGS[name].parser.enum_values) == sorted(choices), name
    assert flags.SYNTHETIC == synthetic.DATASETS and flags.LAYOUTS == convert.LAYOUTS


def test_every_test_file_is_listed_once_in_tests_bzl():
    from conftest import bazel_test_lists
    lists = bazel_test_lists()
    listed = lists["FAST"] + lists["SLOW"]
    here = sorted(f for f in os.listdir(os.path.dirname(__file__))
                  if f.startswith("test_") and f.endswith(".py"))
    assert sorted(listed) == here and len(set(listed)) == len(listed)


def test_another_preset_against_a_run_is_refused_and_nothing_is_touched(tmp_path):
    from stfusion_tf import run_record
    run = tmp_path / "run"
    run.mkdir()
    run_record.write(str(run), {"preset": "tiny"}, {})
    before = (run / "run.json").read_text()
    r = _run("--mode=analyze", f"--model_dir={run}", "--preset=resnet_tiny")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "holds a template of --preset=tiny; --preset=resnet_tiny is another network" in r.stderr
    assert (run / "run.json").read_text() == before and sorted(p.name for p in run.iterdir()) == [
        "run.json"]
