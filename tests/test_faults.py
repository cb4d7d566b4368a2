"""Faults at every stage (issue 16): bad input, damaged files, full disks, two runs on one
model directory, lost workers.  Each case asserts the message, the exit code, what was
kept and what was counted.  docs/failures.md names the test behind each row.

Command-line cases run the real entry point in a subprocess; the rest call the library.
A "full disk" is a file-size limit (RLIMIT_FSIZE) on the writing process: every write
past it fails with EFBIG, in Python and in TensorFlow's C++ writers alike.
"""

import contextlib
import os
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from stfusion_tf import files, saved_template
from stfusion_tf.data import framing, pipeline, records, synthetic, verify
from stfusion_tf.errors import UserError, environment_message

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
SPEC = synthetic.SyntheticSpec(num_train=16, num_val=8, num_test=8, num_frames=10,
                               clips_per_shard=8)
TRAIN = ["--mode=train", "--epochs=2", "--warmup_epochs=2", "--batch_size=4",
         "--steps_per_epoch=2", "--progress=0"]


def _main(*args, limit=None, wait=True, cwd=ROOT):
    """The entry point with the synthetic motion config; ``limit``: largest file it may
    write (bytes)."""
    pre = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))) if limit else None
    cmd = [sys.executable, "-m", "stfusion_tf.main",
           f"--flagfile={ROOT}/configs/synthetic_motion.flags", *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=ENV, preexec_fn=pre, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd, env=ENV, preexec_fn=pre, capture_output=True, text=True,
                          timeout=900)


def _one_line_error(r, *needles):
    """Exit code 2, no traceback, one ``error:`` line holding every needle."""
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, r.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@contextlib.contextmanager
def _file_size_limit(limit):
    """A full disk for this process: writes past ``limit`` bytes fail (EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def _overwrite(path, offset, data=bytes(8)):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _record_offsets(path):
    """Byte offset of every record of a healthy shard."""
    import tensorflow as tf
    sizes = [len(r.numpy()) for r in tf.data.TFRecordDataset(path)]
    return list(np.cumsum([0] + [s + 16 for s in sizes]))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("faults") / "data")
    synthetic.prepare_synthetic(d, SPEC, log=lambda *a: None)
    return d


@pytest.fixture(scope="module")
def compiled_model():
    import keras
    from stfusion_tf.model import template as tpl
    model = tpl.build_template(tpl.preset("tiny"), 4, tpl.GateConfig(dataset_size=16))
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A finished tiny run; while it trains, a second run on its directory is started
    (kept for test_second_run_on_a_model_dir_refuses_and_a_dead_holder_is_taken_over)."""
    run = str(tmp_path_factory.mktemp("faults") / "run")
    first = _main(*TRAIN, f"--data_dir={data}", f"--model_dir={run}", wait=False)
    lock_file = os.path.join(run, "run.lock")
    deadline = time.time() + 600
    while time.time() < deadline and first.poll() is None:
        if os.path.exists(lock_file) and str(first.pid) in open(lock_file).read():
            break
        time.sleep(0.1)
    second = _main(*TRAIN, f"--data_dir={data}", f"--model_dir={run}")
    out, err = first.communicate(timeout=900)
    assert first.returncode == 0, err[-3000:]
    return {"run": run, "pid": first.pid, "second": second, "first_out": out}


# -- user mistakes: one line, exit code 2, nothing made --------------------------------------

def test_a_config_without_its_dataset_is_one_line(tmp_path):
    r = _main(f"--flagfile={ROOT}/configs/k400.flags", cwd=str(tmp_path))
    _one_line_error(r, "--dataset=kinetics400 needs --source_dir", "/data/kinetics400 is none")
    assert os.listdir(tmp_path) == []  # no data or model directory made


def test_train_without_a_dataset_and_analyze_before_training_are_one_line(tmp_path):
    r = _main("--mode=train", f"--data_dir={tmp_path}/nodata", f"--model_dir={tmp_path}/run")
    _one_line_error(r, "no manifest.json", "run --mode=prepare")
    assert not (tmp_path / "run").exists()
    r = _main("--mode=analyze", f"--model_dir={tmp_path}/never")
    _one_line_error(r, "no trained template", "run --mode=train first")
    assert not (tmp_path / "never").exists()


def test_a_folder_of_bad_videos_is_one_line_with_the_reasons_in_the_manifest(tmp_path):
    src = tmp_path / "src" / "jump"
    src.mkdir(parents=True)
    (src / "empty.mp4").write_bytes(b"")
    (src / "text.mp4").write_text("not a video")
    (src / "notes.txt").write_text("not a video either")
    r = _main("--mode=prepare", "--dataset=folder", f"--source_dir={tmp_path}/src",
              f"--data_dir={tmp_path}/data", "--prepare_workers=1")
    _one_line_error(r, "could be converted", "manifest.json")
    reasons = {os.path.basename(s["source"]): s["reason"]
               for s in files.read_json(tmp_path / "data" / "manifest.json")["skipped"]}
    assert reasons["empty.mp4"] == "zero-length file"
    assert reasons["notes.txt"] == "not a video file" and "text.mp4" in reasons


def test_damaged_manifest_run_record_and_strategy_files_are_one_line(tmp_path):
    from stfusion_tf import run_record
    from stfusion_tf.model.strategy import FusionStrategy
    (tmp_path / "manifest.json").write_text('{"name": "x", "spl')
    with pytest.raises(UserError, match="does not read .*re-run --mode=prepare"):
        records.read_manifest(str(tmp_path))
    (tmp_path / "run.json").write_bytes(b"\x00" * 10)
    with pytest.raises(UserError, match="cannot read the run record"):
        run_record.read(str(tmp_path))
    (tmp_path / "opt.json").write_text('{"positions": ["B1.L1"], "un')
    with pytest.raises(UserError, match="opt.json"):
        FusionStrategy.load(str(tmp_path / "opt.json"))


# -- a damaged record costs that record only ---------------------------------------------

def test_a_damaged_record_costs_one_record_per_read_not_the_rest_of_its_shard(tmp_path):
    """The issue's case: 8 bytes overwritten in the middle of one shard of a 64-clip set."""
    spec = synthetic.SyntheticSpec(num_train=64, num_val=2, num_test=2, num_frames=10,
                                   clips_per_shard=16)
    d = str(tmp_path)
    synthetic.prepare_synthetic(d, spec, log=lambda *a: None)
    shard = records.shard_paths(d, "train")[1]
    starts = _record_offsets(shard)
    _overwrite(shard, (starts[7] + starts[8]) // 2)  # inside record 7 of 16
    stats = pipeline.InputStats()
    cfg = pipeline.InputConfig(batch_size=1, shuffle_buffer=4)
    ds = pipeline.train_dataset(d, "train", cfg, repeat=False, stats=stats)
    for epoch in (1, 2, 3):
        assert sum(1 for _ in ds) == 63
        assert stats.lost_records == epoch and stats.dropped == 0


def test_verify_finds_a_damaged_shard_and_rewrites_it_from_its_source(tmp_path):
    d = str(tmp_path / "data")
    synthetic.prepare_synthetic(d, SPEC, log=lambda *a: None)
    manifest = records.read_manifest(d)
    shard = records.shard_paths(d, "train", manifest)[1]
    before = framing.file_digest(shard)
    assert before == {"bytes": manifest["splits"]["train"]["shard_bytes"][1],
                      "sha256": manifest["splits"]["train"]["shard_sha256"][1]}
    _overwrite(shard, _record_offsets(shard)[3] + 100)
    r = _main("--mode=verify", "--repair=none", f"--data_dir={d}")
    assert r.returncode == 1, r.stderr[-2000:]
    assert "train-00001-of-00002.tfrecord: 1 of 8 records damaged" in r.stdout
    assert "4 shards, 1 damaged, not repaired" in r.stdout
    r = _main("--mode=verify", f"--data_dir={d}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "1 damaged, written again from their source; 0 still damaged" in r.stdout
    assert framing.file_digest(shard) == before  # the generator wrote the same bytes


def test_verify_drops_damaged_records_and_lists_them_in_the_manifest(tmp_path):
    d = str(tmp_path)
    synthetic.prepare_synthetic(d, SPEC, log=lambda *a: None)
    shard = records.shard_paths(d, "train")[0]
    starts = _record_offsets(shard)
    _overwrite(shard, starts[2] + 2, b"\xff\xff")  # record 2's length: framing resync
    _overwrite(shard, starts[5] + 200)  # record 5's data
    out = verify.verify(d, "drop", log=lambda *a: None)
    assert out["repaired"] == "drop" and out["lost"] == 2 and out["remaining"] == []
    m = records.read_manifest(d)
    train = m["splits"]["train"]
    assert train["shard_clips"] == [6, 8] and train["num_clips"] == 14
    dropped = [s["source"] for s in m["skipped"]]
    assert dropped == ["synthetic_motion/train/000002", "synthetic_motion/train/000005"]
    assert sum(train["clips_per_class"].values()) == 14
    assert train["clips_per_class"]["south"] == 3 and train["clips_per_class"]["west"] == 3
    stats = pipeline.InputStats()
    ds = pipeline.train_dataset(d, "train", pipeline.InputConfig(batch_size=1), repeat=False,
                                stats=stats)
    assert sum(1 for _ in ds) == 14 and stats.lost_records == 0
    assert verify.verify(d, "none")["damaged"] == []


# -- checkpoints, template.keras, JSONL ---------------------------------------------------

def test_second_run_on_a_model_dir_refuses_and_a_dead_holder_is_taken_over(trained, tmp_path):
    line = _one_line_error(trained["second"], "is in use by another run",
                           f"pid {trained['pid']}", "--mode=train")
    assert "--model_dir" in line
    from stfusion_tf import lock
    # A holder killed with SIGKILL leaves its lock file, never the lock.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from stfusion_tf import lock\n"
        "with lock.hold(sys.argv[2], '--mode=train'):\n"
        "    print('held', flush=True); time.sleep(600)"), ROOT, str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match=f"in use by another run \\(pid {holder.pid} "):
        with lock.hold(str(tmp_path), "--mode=analyze"):
            pass
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with lock.hold(str(tmp_path), "--mode=analyze"):
        assert f'"pid": {os.getpid()}' in (tmp_path / "run.lock").read_text()


def test_a_cut_checkpoint_falls_back_to_the_newest_complete_one(trained, data):
    run = trained["run"]
    ckpt = os.path.join(run, "checkpoints")
    data_file = os.path.join(ckpt, "ckpt-2.data-00000-of-00001")
    with open(data_file, "r+b") as f:  # a copy cut short
        f.truncate(os.path.getsize(data_file) // 2)
    r = _main(*TRAIN, f"--data_dir={data}", f"--model_dir={run}")
    assert r.returncode == 0, r.stderr[-3000:]
    said = [line for line in r.stderr.splitlines() if "[checkpoint]" in line]
    assert len(said) == 1 and "ckpt-2" in said[0] and "resuming from ckpt-1 (epoch 1)" in said[0]
    assert sorted(os.listdir(os.path.join(ckpt, "damaged"))) == [
        "ckpt-2.data-00000-of-00001", "ckpt-2.index"]
    summary = files.read_json(os.path.join(run, "train_summary.json"))
    assert summary["steps"] == 4 and len(summary["history"]["loss"]) == 1  # epoch 2 again


def test_a_damaged_template_is_rebuilt_from_the_last_checkpoint(trained, data):
    import tensorflow as tf
    from stfusion_tf import training
    run = trained["run"]
    path = os.path.join(run, "template.keras")
    good = saved_template.load_template(run)
    with open(path, "r+b") as f:
        f.truncate(1000)
    r = _main("--mode=export", "--strategy=S+ST", f"--model_dir={run}")
    assert r.returncode == 0, r.stderr[-3000:]
    said = [line for line in r.stdout.splitlines() if "[checkpoint]" in line]
    assert len(said) == 1 and "template.keras does not load" in said[0]
    assert "rebuilt it from the checkpoint of epoch 2" in said[0]
    assert os.path.exists(path + ".damaged")
    rebuilt = saved_template.load_template(run)
    for a, b in zip(good.weights, rebuilt.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert tf.saved_model.load(os.path.join(run, "export", "classifier_S_plus_ST", "1"))


def test_every_checkpoint_damaged_stops_instead_of_starting_over(compiled_model, tmp_path):
    from stfusion_tf import callbacks as cb
    d = str(tmp_path / "checkpoints")
    ckpt = cb.AtomicCheckpoint(d, 3).attach(compiled_model)
    for epoch in (0, 1):
        ckpt.on_epoch_end(epoch)
    (tmp_path / "checkpoints" / "checkpoint").write_text("garbage {{{")  # state file too
    for n in (1, 2):
        _overwrite(f"{d}/ckpt-{n}.index", 20, b"\x00" * 64)
    with pytest.raises(UserError, match="no checkpoint in .* reads completely .*ckpt-2, ckpt-1"):
        cb.AtomicCheckpoint(d, 3).attach(compiled_model).restore(log=lambda *a: None)
    assert cb.checkpoint_candidates(d) == []  # moved aside: the next run starts afresh
    assert len(os.listdir(f"{d}/damaged")) == 5


def test_a_checkpoint_is_read_through_once_until_its_files_change(compiled_model, tmp_path,
                                                                    monkeypatch):
    """Resuming asks about the newest checkpoint twice (its epoch, then the restore): one
    full read of a model-sized file, not two; a file changed since is read again."""
    import tensorflow as tf
    from stfusion_tf import callbacks as cb
    d = str(tmp_path / "checkpoints")
    cb.AtomicCheckpoint(d, 3).attach(compiled_model).on_epoch_end(0)
    reads = []
    load = tf.train.load_checkpoint
    monkeypatch.setattr(tf.train, "load_checkpoint", lambda p: reads.append(p) or load(p))
    assert cb.checkpoint_epoch(d) == 1
    assert cb.AtomicCheckpoint(d, 3).attach(compiled_model).restore(log=lambda *a: None) == 1
    assert len(reads) == 1
    _overwrite(f"{d}/ckpt-1.index", 20, b"\x00" * 64)
    assert cb.checkpoint_problem(f"{d}/ckpt-1") is not None and len(reads) == 2


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(compiled_model, tmp_path):
    from stfusion_tf import callbacks as cb
    d = str(tmp_path / "checkpoints")
    ckpt = cb.AtomicCheckpoint(d, 3).attach(compiled_model)
    ckpt.on_epoch_end(0)
    with _file_size_limit(20_000), pytest.raises(Exception) as failure:
        ckpt.on_epoch_end(1)
    message = environment_message(failure.value)
    assert message and message.startswith("the disk is full (") and "\n" not in message
    resumed = cb.AtomicCheckpoint(d, 3).attach(compiled_model)
    said = []
    assert resumed.restore(log=said.append) == 1 and said == []
    assert sorted(os.listdir(d)) == ["checkpoint", "ckpt-1.data-00000-of-00001", "ckpt-1.index"]


def test_a_full_disk_while_exporting_keeps_the_previous_export(trained, tmp_path):
    import tensorflow as tf
    from stfusion_tf import export, training
    model = saved_template.load_template(trained["run"])
    first = export.export_probability_space(model, str(tmp_path))
    with _file_size_limit(8_000), pytest.raises(Exception) as failure:
        export.export_probability_space(model, str(tmp_path))  # saved_model.pb: ~33 kB
    assert environment_message(failure.value).startswith("the disk is full")
    assert sorted(os.listdir(tmp_path / "probability_space")) == ["1"]
    assert tf.saved_model.load(first).drop_rates() is not None


def test_a_full_disk_while_preparing_keeps_finished_shards_and_a_rerun_completes(tmp_path):
    d = tmp_path / "data"
    sizes = ["--synthetic_train=8", "--synthetic_val=16", "--synthetic_test=8",
             "--synthetic_frames=10"]  # shards of ~104 kB, ~211 kB, ~104 kB
    r = _main("--mode=prepare", f"--data_dir={d}", *sizes, limit=150_000)
    _one_line_error(r, "the disk is full (", "File too large", "re-run the same command")
    assert sorted(os.listdir(d)) == ["run.lock", "train-00000-of-00001.tfrecord"]
    done = (d / "train-00000-of-00001.tfrecord").stat().st_mtime
    spec = synthetic.SyntheticSpec(num_train=8, num_val=16, num_test=8, num_frames=10)
    m = synthetic.prepare_synthetic(str(d), spec, log=lambda *a: None)
    assert (d / "train-00000-of-00001.tfrecord").stat().st_mtime == done
    assert {k: v["num_clips"] for k, v in m["splits"].items()} == {"train": 8, "val": 16,
                                                                    "test": 8}
    assert verify.verify(str(d), "none")["damaged"] == []


def test_prepare_killed_midway_resumes_to_a_complete_manifest(tmp_path):
    d = tmp_path / "data"
    p = _main("--mode=prepare", f"--data_dir={d}", "--synthetic_train=128",
              "--synthetic_frames=10", wait=False)
    first = d / "train-00000-of-00002.tfrecord"
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None and not first.exists():
        time.sleep(0.05)
    assert p.poll() is None, "prepare ended before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (d / "manifest.json").exists()
    done = first.stat().st_mtime
    spec = synthetic.SyntheticSpec(num_train=128, num_val=128, num_test=128, num_frames=10)
    m = synthetic.prepare_synthetic(str(d), spec, log=lambda *a: None)
    assert first.stat().st_mtime == done and m["splits"]["train"]["num_clips"] == 128
    assert verify.verify(str(d), "none")["damaged"] == []


def test_two_processes_writing_one_artefact_never_collide(tmp_path):
    """Workers of one job may write the same file (run record): each rename is whole."""
    path = str(tmp_path / "run.json")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            for i in range(300):
                files.write_json(path, {"writer": "child", "i": i})
            code = 0
        finally:
            os._exit(code)
    for i in range(300):
        files.write_json(path, {"writer": "parent", "i": i})
    _, status = os.waitpid(pid, 0)
    assert status == 0
    assert files.read_json(path)["i"] == 299
    assert os.listdir(tmp_path) == ["run.json"]  # no temporary left


def test_a_killed_writers_temporary_is_removed_by_the_next_write(tmp_path, monkeypatch):
    """kill -9 runs no cleanup: the temporary stays until the artefact is written again on
    this host once it is stale; a live process's temporary (another writer) is left alone."""
    import signal
    path = str(tmp_path / "template.keras")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        with files.atomic_path(path) as tmp:
            with open(tmp, "w") as f:
                f.write("half a model")
            os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    (torn,) = os.listdir(tmp_path)
    assert not os.path.exists(path)
    files.write_text(path, "complete")  # a fresh temporary stays: its writer may live elsewhere
    assert sorted(os.listdir(tmp_path)) == sorted(["template.keras", torn])
    old = time.time() - 3600
    os.utime(tmp_path / torn, (old, old))
    live = files._temporary_prefix(str(tmp_path / "template")) + f"{os.getppid()}.keras"
    open(live, "w").close()
    os.utime(live, (old, old))
    monkeypatch.chdir(tmp_path)  # a relative path, as --model_dir usually is
    files.write_text("template.keras", "complete")
    assert sorted(os.listdir(tmp_path)) == sorted(["template.keras", os.path.basename(live)])


def test_torn_and_garbled_jsonl_lines_are_skipped_and_counted(tmp_path):
    path = str(tmp_path / "ranking.jsonl")
    with files.JsonlAppender(path) as f:
        for i in range(4):
            f.append({"i": i})
    with open(path, "r+b") as f:
        data = f.read()
        f.seek(data.index(b'{"i": 1}'))
        f.write(b"\x00\xff\x00")  # a garbled line in the middle
        f.seek(0, 2)
        f.write(b'{"i": 4, "acc')  # a torn last line
    rows, torn = files.read_jsonl(path)
    assert [r["i"] for r in rows] == [0, 2, 3] and torn == 2


# -- distributed faults -------------------------------------------------------------------

def test_a_data_service_worker_killed_mid_epoch_and_training_finishes(data, tmp_path,
                                                                      monkeypatch):
    import keras
    from stfusion_tf import training
    from stfusion_tf.data import service
    from stfusion_tf.model import template as tpl
    svc = service.start(0, 1, work_dir=str(tmp_path / "journal"))
    other = subprocess.Popen(
        [sys.executable, "-m", "stfusion_tf.main", "--mode=data_service",
         f"--data_service={svc.target}", "--data_service_workers=1"],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert "1 worker(s) serving" in other.stdout.readline()

    class KillWorker(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if int(self.model.optimizer.iterations.numpy()) == 3:
                os.kill(other.pid, signal.SIGKILL)

    model = tpl.build_template(tpl.preset("tiny"), 4, tpl.GateConfig(dataset_size=16))
    cfg = training.TrainConfig(epochs=2, warmup_epochs=2, steps_per_epoch=4)
    real = training._callbacks
    monkeypatch.setattr(training, "_callbacks", lambda *a: real(*a) + [KillWorker()])
    summary = training.train(model, str(tmp_path / "run"), data,
                             pipeline.InputConfig(batch_size=4), cfg, eval_split=None,
                             verbose=0, log=lambda *a: None, data_service=svc.target)
    assert other.wait(timeout=60) == -signal.SIGKILL
    assert summary["steps"] == 8
    assert os.listdir(tmp_path / "journal")  # the dispatcher journals its state


def test_environment_errors_are_one_line_and_others_keep_their_traceback():
    import tensorflow as tf
    disk = tf.errors.ResourceExhaustedError(None, None, "/x/ckpt-2.data; No space left on device")
    assert environment_message(disk).startswith("the disk is full (")
    assert environment_message(OSError(27, "File too large", "/x/a.tfrecord")).startswith(
        "the disk is full (File too large; /x/a.tfrecord)")
    assert "check the permissions" in environment_message(PermissionError(13, "denied", "/x"))
    assert environment_message(KeyError("bug")) is None
    assert environment_message(OSError(2, "No such file")) is None
