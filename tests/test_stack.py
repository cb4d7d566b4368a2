"""The pinned stack loads, and tensorflow-io's native filesystem plugins work."""

import numpy as np


def test_design_card_packages_import():
    import absl  # noqa: F401
    import keras
    import official  # noqa: F401
    import tensorflow as tf
    import tensorflow_io  # noqa: F401
    import tensorflow_probability as tfp
    assert tf.__version__ == "2.16.2"
    assert keras.__version__.startswith("3.")
    assert keras.config.backend() == "tensorflow"
    assert tfp.__version__ == "0.24.0"


def test_tensorflow_io_http_filesystem_reads_tfrecord(tmp_path):
    import tensorflow as tf
    import tensorflow_io  # noqa: F401  registers the http filesystem (native ops)

    path = tmp_path / "x.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as w:
        for i in range(5):
            w.write(f"record-{i}".encode())
    from http_server import serve
    with serve(tmp_path) as base:
        got = [r.numpy().decode() for r in tf.data.TFRecordDataset(f"{base}/x.tfrecord")]
    assert got == [f"record-{i}" for i in range(5)]
    assert np.all(np.array(got) != "")


def test_model_garden_dependencies_import_cleanly():
    """tensorflow-datasets 4.9.10 / tensorflow-metadata 1.21 need a newer protobuf than TF 2.16's."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    r = subprocess.run([sys.executable, "-c", "import tensorflow_datasets, official.vision.dataloaders.video_input"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "runtime_version" not in r.stderr
