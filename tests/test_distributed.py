"""tf.distribute: Mirrored on two logical CPUs, multi-worker on loopback (a worker killed,
the job re-launched), kill -9 and resume (the dead run's lock taken over)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)

MIRRORED = r"""
import json
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from stfusion_tf.model import template as T, gates as G
from stfusion_tf.optimization import SGD  # training's: one fused momentum op per variable

def step(strategy, weights, gates_on, zero_ce=False):
    with strategy.scope():
        m = T.build_template(T.preset("tiny"), 4, T.GateConfig(dataset_size=64, length_scale=10.0),
                             synchronized_bn=strategy.num_replicas_in_sync > 1)
        ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        m.compile(optimizer=SGD(0.01, momentum=0.9),
                  loss=(lambda y, p: 0.0 * tf.reduce_mean(p)) if zero_ce else ce,
                  metrics=[keras.metrics.SparseCategoricalCrossentropy(from_logits=True, name="ce")])
    m.set_weights(weights)
    G.set_enabled(G.gate_layers(m), gates_on)
    reg = float(sum(g.regularization() for g in G.gate_layers(m)))
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, size=(8, 8, 32, 32, 3)).astype("float32")  # pixel values
    y = np.arange(8) % 4
    h = m.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(8), epochs=1, verbose=0).history
    return {"loss": h["loss"][0], "ce": h["ce"][0], "reg": reg,
            "after": [float(np.abs(np.asarray(v)).sum()) for v in m.trainable_weights]}

def mirrored():
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])

keras.utils.set_random_seed(0)
w = T.build_template(T.preset("tiny"), 4).get_weights()
out = {"replicas": mirrored().num_replicas_in_sync,
       "default": step(tf.distribute.get_strategy(), w, False),
       "mirrored": step(mirrored(), w, False),
       "default_reg": step(tf.distribute.get_strategy(), w, True, zero_ce=True),
       "mirrored_reg": step(mirrored(), w, True, zero_ce=True)}
print(json.dumps(out))
"""


def test_mirrored_two_cpus_matches_default_first_step():
    r = subprocess.run([sys.executable, "-c", MIRRORED], env=ENV, cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2
    assert out["mirrored"]["loss"] == pytest.approx(out["default"]["loss"], rel=5e-4)
    assert out["mirrored"]["after"] == pytest.approx(out["default"]["after"], rel=1e-4, abs=1e-6)
    # Regulariser only (cross-entropy zeroed): the update with two replicas equals the
    # single-device update, so the per-replica regulariser counts once in the gradient.
    # (Keras' displayed `loss` under MirroredStrategy + synchronized BN counts add_loss terms
    # once per replica; training logs therefore compute the regulariser from the gates.)
    d, m = out["default_reg"], out["mirrored_reg"]
    assert d["loss"] == pytest.approx(d["reg"], rel=1e-5)
    assert m["after"] == pytest.approx(d["after"], rel=1e-6, abs=1e-7)


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


TINY = ["--synthetic_train=32", "--synthetic_val=8", "--synthetic_test=8", "--synthetic_frames=10",
        "--batch_size=4", "--steps_per_epoch=3", "--warmup_epochs=1", "--progress=0"]


def _cmd(tmp_path, *args):
    return [sys.executable, "-m", "stfusion_tf.main", "--flagfile=configs/synthetic_motion.flags",
            f"--data_dir={tmp_path}/data", *TINY, *args]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    r = subprocess.run(_cmd(d, "--mode=prepare"), env=ENV, cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return d


def _workers(data, run, logs, *args):
    """The same training command on two worker processes over 127.0.0.1; their output goes
    to ``<logs>0`` and ``<logs>1`` (files: a full pipe would block a worker)."""
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for i in range(2):
        env = dict(ENV, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}))
        with open(f"{logs}{i}", "w") as out:
            procs.append(subprocess.Popen(
                _cmd(data, "--mode=train", "--distribution=multi_worker", f"--model_dir={run}",
                     *args), env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT))
    return procs


def _wait_for_checkpoint(run, name, procs, timeout=900):
    state = run / "checkpoints" / "checkpoint"
    deadline = time.time() + timeout
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if state.exists() and f'"{name}"' in state.read_text():
            return
        time.sleep(0.05)
    assert all(p.poll() is None for p in procs), "training ended before it could be killed"


def test_multi_worker_on_loopback_a_killed_worker_and_a_relaunch_resumes(tiny_data, tmp_path):
    """Two workers; worker 1 killed with SIGKILL after the first checkpoint: worker 0 stops
    with one line (exit 4); the same command re-launched resumes both workers from the last
    complete checkpoint and ends at the step count of an uninterrupted run."""
    run, logs = tmp_path / "run", tmp_path / "worker"
    procs = _workers(tiny_data, run, logs, "--epochs=3")
    _wait_for_checkpoint(run, "ckpt-1", procs)
    os.kill(procs[1].pid, signal.SIGKILL)
    try:
        procs[0].wait(timeout=600)
    finally:
        procs[0].kill()
    err = (tmp_path / "worker0").read_text()
    assert procs[0].returncode == 4, err[-3000:]
    assert "[train] stopped: a worker of the job was lost" in err and "Traceback" not in err
    procs = _workers(tiny_data, run, logs, "--epochs=3")
    for i, p in enumerate(procs):
        assert p.wait(timeout=1800) == 0, (tmp_path / f"worker{i}").read_text()[-3000:]
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["replicas"] == 2 and summary["chief"] is True and summary["steps"] == 9
    assert len(summary["history"]["loss"]) < 3  # resumed, not started over
    assert not (run / "_worker_scratch" / "1").exists()


def test_sigkill_mid_training_resumes_to_the_same_step_count(tiny_data, tmp_path):
    run = tmp_path / "run"
    args = ["--mode=train", "--epochs=5", "--steps_per_epoch=4", f"--model_dir={run}"]
    p = subprocess.Popen(_cmd(tiny_data, *args), env=ENV, cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = run / "checkpoints" / "checkpoint"
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:
        if state.exists() and "ckpt-2" in state.read_text():
            break
        time.sleep(0.05)
    assert p.poll() is None, "training ended before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (run / "template.keras").exists()
    assert f'"pid": {p.pid}' in (run / "run.lock").read_text()  # the dead run's lock file
    r = subprocess.run(_cmd(tiny_data, *args), env=ENV, cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 5 * 4
    assert len(summary["history"]["loss"]) < 5  # it resumed instead of starting over


def test_non_finite_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path):
    run = tmp_path / "run"
    base = ["--mode=train", "--warmup_epochs=1", f"--model_dir={run}"]
    r = subprocess.run(_cmd(tiny_data, *base, "--epochs=1"), env=ENV, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    # Resume with a length-scale that overflows float32 in the paper's norm-form weight term
    # (k^2 ||W||^2): the regulariser, on from epoch 2, makes the loss infinite.
    r = subprocess.run(_cmd(tiny_data, *base, "--epochs=3", "--weight_term=norm",
                            "--length_scale=1e39"), env=ENV,
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 3
    assert "[train] stopped: loss became" in r.stderr and "Traceback" not in r.stderr
    state = (run / "checkpoints" / "checkpoint").read_text()
    assert 'model_checkpoint_path: "ckpt-1"' in state
