"""TensorBoard, started from the project's environment, serves a tiny run's marginal chart."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import tensorflow as tf

from stfusion_tf import training
from stfusion_tf.analysis import marginals as M
from stfusion_tf.data import pipeline
from stfusion_tf.model import template as T


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(base, path, timeout=10):
    with urllib.request.urlopen(base + path, timeout=timeout) as r:
        return r.read()


def _wait_for_image(base, proc, deadline):
    """The image tags once the server is up and has loaded the run."""
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        try:
            tags = json.loads(_get(base, "/data/plugin/images/tags"))
            if "marginals" in tags.get("fusion", {}):
                return tags
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError("TensorBoard did not serve the marginal chart in time")


def test_tensorboard_serves_the_marginal_chart_of_a_tiny_run(motion_dir, tmp_path):
    model = T.build_template(T.preset("tiny"), 4, T.GateConfig(dataset_size=48, length_scale=10.0))
    cfg = training.TrainConfig(epochs=2, warmup_epochs=1, steps_per_epoch=1, optimizer="adam",
                               learning_rate=1e-3)
    run = tmp_path / "run"
    summary = training.train(model, str(run), motion_dir, pipeline.InputConfig(batch_size=4), cfg,
                             eval_split=None, verbose=0, log=lambda *a: None)
    # The console script next to this interpreter: the project's environment.
    exe = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    port = _free_port()
    proc = subprocess.Popen([exe, "--logdir", str(run / "tensorboard"), "--host", "127.0.0.1",
                             "--port", str(port), "--reload_interval", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for_image(base, proc, time.time() + 180)
        env = json.loads(_get(base, "/data/environment"))
        assert env["data_location"] == str(run / "tensorboard")
        q = urllib.parse.urlencode({"run": "fusion", "tag": "marginals"})
        entries = json.loads(_get(base, f"/data/plugin/images/images?{q}"))
        assert [e["step"] for e in entries] == [0, 1]  # one chart per epoch
        png = _get(base, "/data/plugin/images/individualImage?" + entries[-1]["query"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    served = tf.io.decode_png(png).numpy()
    want = tf.io.decode_png(M.plot(model.positions, np.array(summary["drop_rates"]),
                                   title="marginals, epoch 2")).numpy()
    assert served.shape == want.shape
    assert np.mean(served != want) < 0.01  # the chart of the run's final drop rates
