"""Shared fixtures: small synthetic datasets written once per test session."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402


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
