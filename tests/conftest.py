"""Shared fixtures: small synthetic datasets written once per test session."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import re  # noqa: E402

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bazel_test_lists() -> dict:
    """FAST and SLOW of tests.bzl: the one definition of which test files are slow."""
    path = os.path.join(ROOT, "tests.bzl")
    if not os.path.exists(path):
        return {"FAST": [], "SLOW": []}
    with open(path) as f:
        text = f.read()
    out = {}
    for name in ("FAST", "SLOW"):
        body = re.search(rf"^{name} = \[(.*?)\]", text, re.S | re.M).group(1)
        out[name] = [f"test_{n}.py" for n in re.findall(r'"(\w+)"', body)]
    return out


#: The longest files, run first: with two xdist workers (--dist loadfile) the suite then
#: ends on short files instead of one worker finishing the end-to-end run alone.
LONGEST_FIRST = ("test_end_to_end.py", "test_distributed.py", "test_faults.py")


def pytest_collection_modifyitems(config, items):
    slow = set(bazel_test_lists()["SLOW"])
    for item in items:
        if item.path.name in slow:
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: keeps the rest


@pytest.fixture(scope="session")
def motion_dir(tmp_path_factory):
    from stfusion_tf.data import synthetic
    d = str(tmp_path_factory.mktemp("synthetic_motion"))
    synthetic.prepare_synthetic(d, synthetic.SyntheticSpec(
        name="synthetic_motion", num_train=48, num_val=16, num_test=16, clips_per_shard=16),
        log=lambda *a: None)
    return d


@pytest.fixture(scope="session")
def tiny_model():
    from stfusion_tf.model import template
    return template.build_template(template.preset("tiny"), 4,
                                   template.GateConfig(dataset_size=100, length_scale=10.0))
