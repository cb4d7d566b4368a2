"""Keras callbacks of a training run.

* ``GateSchedule``: gates off and classifier dropout on for the first
  ``warmup_epochs`` (the paper's warm-up without v-DropPath), the reverse
  afterwards.  The switch is a variable assignment (no retrace) and depends only
  on the epoch, so it survives resume.
* ``AtomicCheckpoint``: a ``tf.train.CheckpointManager`` of model, optimizer
  and epoch, written at the end of every epoch and kept to the last K; it is
  re-attached when a phase brings a new optimizer.  TF
  writes the data and index files first and the ``checkpoint`` state file last
  by rename, so a run killed mid-write (even ``kill -9``) resumes from the last
  complete checkpoint.  An "epoch" is ``steps_per_epoch`` optimizer steps, so a
  resumed run ends at the same step count as an uninterrupted one.  A checkpoint
  damaged afterwards (a cut copy, a bad disk) is found on restore, which reads
  every tensor back, and the run resumes from the newest one that reads.
* ``FusionSummaries``: cross-entropy vs regulariser split, learning rate,
  drop-rate histograms and the marginal bar chart (Fig. 4 style) in TensorBoard.
* ``InputHealth``: clips and records the input pipeline dropped as corrupt or damaged.
* ``StopOnNonFinite``: NaN/Inf loss stops the run with a clear message; the
  last good checkpoint is kept (the bad epoch is never saved).
"""

from __future__ import annotations

import functools
import glob
import math
import os
import shutil

import keras
import numpy as np
import tensorflow as tf

from stfusion_tf import files
from stfusion_tf.analysis import marginals as marg
from stfusion_tf.errors import UserError
from stfusion_tf.model import dropout as dropout_lib
from stfusion_tf.model import gates as gates_lib
from stfusion_tf.model import template as tpl


class NonFiniteLossError(RuntimeError):
    pass


def inner_optimizers(optimizer) -> list:
    """The optimizers that hold state: a MultiOptimizer's own, or the optimizer itself
    (the weights' optimizer first), inside the LossScaleOptimizer of ``mixed_float16``."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    if isinstance(optimizer, keras.optimizers.MultiOptimizer):
        default = optimizer._optimizer_map.default_optimizer
        return [default] + [o for o in optimizer.optimizers if o is not default]
    return [optimizer]


def learning_rate(optimizer) -> float:
    """The current learning rate of the weights."""
    opt = inner_optimizers(optimizer)[0]
    lr = opt.learning_rate
    return float(lr(opt.iterations)) if callable(lr) else float(np.asarray(lr))


def set_phase(model, variational: bool) -> None:
    """Gates on and classifier dropout off (v-DropPath), or the reverse (warm-up)."""
    gates_lib.set_enabled(gates_lib.gate_layers(model), variational)
    dropout_lib.set_active(model, not variational)


class GateSchedule(keras.callbacks.Callback):
    def __init__(self, warmup_epochs: int):
        super().__init__()
        self.warmup_epochs = warmup_epochs

    def on_epoch_begin(self, epoch, logs=None):
        set_phase(self.model, epoch >= self.warmup_epochs)


class InputHealth(keras.callbacks.Callback):
    """Logs how many training clips the input pipeline dropped as corrupt."""

    def __init__(self, stats, log_dir: str, log=print):
        super().__init__()
        self.stats, self.log = stats, log
        self.writer = tf.summary.create_file_writer(log_dir)
        self.reported = (0, 0)

    def on_epoch_end(self, epoch, logs=None):
        counts = (self.stats.dropped, self.stats.lost_records)
        if logs is not None:
            logs["input_dropped_clips"] = float(counts[0])
            logs["input_lost_records"] = float(counts[1])
        with self.writer.as_default(step=epoch):
            tf.summary.scalar("input/dropped_clips", counts[0])
            tf.summary.scalar("input/lost_records", counts[1])
        if counts != self.reported:
            self.log(f"[input] so far {counts[0]} clip(s) dropped for corrupt frames, "
                     f"{counts[1]} damaged record(s) skipped (the warnings name the shards; "
                     "--mode=verify repairs them)")
            self.reported = counts


class StopOnNonFinite(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise NonFiniteLossError(
                f"loss became {loss} at batch {batch}; stopping. The last good checkpoint "
                "is kept; lower --learning_rate or check the input data.")


def checkpoint_problem(prefix: str) -> str | None:
    """None when every tensor of the checkpoint ``prefix`` reads back (TensorFlow checks
    each tensor's CRC32C), else why not, in one line.  A resumed run asks twice about
    the same files (which phase it is in, then the restore); the answer is kept while
    the files' inodes, sizes and modification / change times stay the same."""
    return _checkpoint_problem(prefix, _file_stamp(prefix))


def _file_stamp(prefix: str) -> tuple:
    stamp = []
    for path in sorted(glob.glob(glob.escape(prefix) + ".*")):
        try:
            st = os.stat(path)
        except OSError:
            continue
        stamp.append((path, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(stamp)


@functools.lru_cache(maxsize=8)
def _checkpoint_problem(prefix: str, stamp: tuple) -> str | None:
    del stamp  # the cache key only
    try:
        reader = tf.train.load_checkpoint(prefix)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except (tf.errors.OpError, IndexError, ValueError, OSError) as e:
        # e.g. IndexError "Read less bytes than requested" for a cut data file
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
    return None


def _checkpoint_number(prefix: str) -> int:
    tail = prefix.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def checkpoint_candidates(directory: str) -> list[str]:
    """Checkpoint prefixes in ``directory``, newest first: those its state file lists and
    any other ``ckpt-N.index`` (a lost or damaged state file hides none)."""
    names = {os.path.basename(p)[:-len(".index")]
             for p in glob.glob(os.path.join(glob.escape(directory), "ckpt-*.index"))}
    try:
        state = tf.train.get_checkpoint_state(directory)
    except (tf.errors.OpError, ValueError, OSError):  # an unparsable state file
        state = None
    if state is not None:
        names |= {os.path.basename(p) for p in state.all_model_checkpoint_paths}
    return sorted((os.path.join(directory, n) for n in names), key=_checkpoint_number,
                  reverse=True)


class AtomicCheckpoint(keras.callbacks.Callback):
    """Saves to ``directory``; restores from ``restore_from`` (the chief's folder).

    In multi-worker training every worker takes part in saving, but only the
    chief writes the real checkpoints; the others write to a scratch folder.
    ``restore`` reads every tensor of the newest checkpoint before using it and falls
    back to the newest one that reads completely; the owner of the folder moves the
    damaged ones to ``damaged/`` and says so in one line.  Checkpoints that exist but
    none of which reads stop the run (``UserError``): never a silent fresh start.
    """

    def __init__(self, directory: str, max_to_keep: int, restore_from: str | None = None):
        super().__init__()
        self.directory = directory
        self.restore_from = restore_from or directory
        self.max_to_keep = max_to_keep
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")

    def attach(self, model):
        # A MultiOptimizer does not expose its inner optimizers to tf.train.Checkpoint:
        # track them by name, or a resumed run restarts their moments from zero.
        inner = {f"optimizer_{i}": o for i, o in enumerate(inner_optimizers(model.optimizer))
                 if o is not model.optimizer}
        self.ckpt = tf.train.Checkpoint(model=model, optimizer=model.optimizer, epoch=self.epoch,
                                        **inner)
        self.model_optimizer = model.optimizer
        self.manager = tf.train.CheckpointManager(self.ckpt, self.directory, self.max_to_keep)
        return self

    def restore(self, optimizer: bool = True, log=print) -> int:
        """Restores the newest complete checkpoint if any; returns the epoch to start from.

        ``optimizer=False`` keeps the attached optimizer as it is (a phase that starts
        a fresh one): the model's checkpoint carries the optimizer it was saved with,
        and TF restores it even into one created later, so its state is put back."""
        opts = {id(o): o for o in [self.model_optimizer] + inner_optimizers(self.model_optimizer)}
        fresh = [] if optimizer else [(v, v.numpy()) for o in opts.values() for v in o.variables]
        epoch = restore_newest(self.ckpt, self.restore_from, self.epoch, log,
                               owner=self.directory == self.restore_from,
                               on_repair=self._reopen)
        for v, value in fresh:
            v.assign(value)
        return epoch

    def _reopen(self):
        self.manager = tf.train.CheckpointManager(self.ckpt, self.directory, self.max_to_keep)

    def on_epoch_end(self, epoch, logs=None):
        self.epoch.assign(epoch + 1)
        self.manager.save(checkpoint_number=epoch + 1)


def checkpoint_epoch(directory: str) -> int:
    """The epoch the newest complete checkpoint in ``directory`` ends (0: none), read
    without restoring it: which phase's optimizer it holds decides how to build the
    model's."""
    for prefix in checkpoint_candidates(directory):
        if checkpoint_problem(prefix) is None:
            return int(tf.train.load_variable(prefix, "epoch/.ATTRIBUTES/VARIABLE_VALUE"))
    return 0


def restore_newest(ckpt: tf.train.Checkpoint, directory: str, epoch: tf.Variable, log=print,
                   owner: bool = True, on_repair=None) -> int:
    """Restores ``ckpt`` from the newest checkpoint of ``directory`` that reads completely
    and returns its epoch (0: there is none).  With ``owner``, damaged checkpoints are
    moved to ``<directory>/damaged/`` and the state file rewritten without them."""
    if owner:
        for tmp in glob.glob(os.path.join(glob.escape(directory), "*_temp*")):
            shutil.rmtree(tmp, ignore_errors=True)  # left by a save that failed
    damaged, good = [], None
    for prefix in checkpoint_candidates(directory):
        problem = checkpoint_problem(prefix)
        if problem is None:
            good = prefix
            break
        damaged.append((prefix, problem))
    if damaged and owner:
        _set_aside(directory, [p for p, _ in damaged], good)
        if on_repair:
            on_repair()
    where = f"moved to {os.path.join(directory, 'damaged')}" if owner else "skipped"
    if damaged and good is None:
        raise UserError(
            f"no checkpoint in {directory} reads completely ({_names(damaged)}: "
            f"{damaged[0][1]}); they were {where}; re-run the same command to train from "
            "scratch")
    if good is None:
        return 0
    ckpt.restore(good).expect_partial()
    if damaged:
        log(f"[checkpoint] {_names(damaged)} in {directory} did not read completely "
            f"({damaged[0][1]}); {where}; resuming from {os.path.basename(good)} "
            f"(epoch {int(epoch.numpy())})")
    return int(epoch.numpy())


def _names(damaged) -> str:
    return ", ".join(os.path.basename(p) for p, _ in damaged)


def _set_aside(directory: str, prefixes, good: str | None) -> None:
    """Moves the files of ``prefixes`` to ``damaged/`` and points the state file at the
    checkpoints left (``good`` the newest), keeping their timestamps so that
    ``CheckpointManager`` goes on rotating them."""
    aside = os.path.join(directory, "damaged")
    os.makedirs(aside, exist_ok=True)
    for prefix in prefixes:
        for path in glob.glob(glob.escape(prefix) + ".*"):
            os.replace(path, os.path.join(aside, os.path.basename(path)))
    state_path = os.path.join(directory, "checkpoint")
    if good is None:
        if os.path.exists(state_path):
            os.replace(state_path, os.path.join(aside, "checkpoint"))
        return
    try:
        state = tf.train.get_checkpoint_state(directory)
    except (tf.errors.OpError, ValueError, OSError):
        state = None
    stamps = dict(zip(map(os.path.basename, state.all_model_checkpoint_paths),
                      state.all_model_checkpoint_timestamps)) if state else {}
    names = [os.path.basename(p) for p in reversed(checkpoint_candidates(directory))
             if os.path.exists(p + ".index")]
    lines = [f'model_checkpoint_path: "{os.path.basename(good)}"']
    lines += [f'all_model_checkpoint_paths: "{n}"' for n in names]
    if names and all(n in stamps for n in names):
        lines += [f"all_model_checkpoint_timestamps: {stamps[n]!r}" for n in names]
        lines.append(f"last_preserved_timestamp: {state.last_preserved_timestamp!r}")
    files.write_text(state_path, "\n".join(lines) + "\n")  # CheckpointState, text format


class FusionSummaries(keras.callbacks.Callback):
    def __init__(self, log_dir: str, positions):
        super().__init__()
        self.writer = tf.summary.create_file_writer(log_dir)
        self.positions = positions

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        gl = gates_lib.gate_layers(self.model)
        if gl and int(gl[0].enabled.numpy()):
            # From the gates, not loss - cross_entropy: Keras' displayed loss counts add_loss
            # terms once per replica under MirroredStrategy with synchronized BN.
            logs["regularizer"] = float(sum(float(x.regularization()) for x in gl))
        else:
            logs["regularizer"] = 0.0
        logs["learning_rate"] = learning_rate(self.model.optimizer)
        with self.writer.as_default(step=epoch):
            tf.summary.scalar("learning_rate", logs["learning_rate"])
            tf.summary.scalar("loss/regularizer", logs["regularizer"])
            if "cross_entropy" in logs:
                tf.summary.scalar("loss/cross_entropy", logs["cross_entropy"])
            if gl and self.positions:
                rates = tpl.TemplateGates(self.model, self.positions).drop_rates()
                tf.summary.histogram("drop_rate/S_branch", rates[:, 0])
                tf.summary.histogram("drop_rate/T_branch", rates[:, 1])
                png = marg.plot(self.positions, rates, title=f"marginals, epoch {epoch + 1}")
                tf.summary.image("marginals", tf.io.decode_png(png)[None])
        self.writer.flush()


class GateTrace(keras.callbacks.Callback):
    """The probability space while it learns: drop rates over steps, and where their
    gradient comes from.

    Every ``every`` optimizer steps the drop rates of every position (S and T
    branch) and the head gate go to ``trace_path`` (JSONL, one row per trace
    point) and to TensorBoard (``gates/p_S/<position>``, ``gates/p_T/<position>``).
    At the end of every variational epoch, with ``batches`` (a dataset of
    training batches), the gradient of the gate logits is split into its two
    sources on ``grad_batches`` batches: the data term (the compiled loss) and
    the regulariser; the per-gate means go to the same JSONL and their mean
    magnitudes to TensorBoard (``gates/grad_data``, ``gates/grad_regularizer``).
    BatchNorm statistics are restored after those extra forward passes, so the
    trace does not change the run.  Steps are the run's: ``step_offset`` is added
    to the optimizer's count (a phase with a fresh optimizer starts it at zero).
    """

    def __init__(self, log_dir: str, trace_path: str, positions, every: int = 50,
                 batches=None, grad_batches: int = 4):
        super().__init__()
        self.writer = tf.summary.create_file_writer(log_dir)
        self.trace_path, self.positions, self.every = trace_path, tuple(positions), every
        self.batches, self.grad_batches = batches, grad_batches
        self._iterator = None
        self.step_offset = 0
        self._last_traced = None

    def _step(self) -> int:
        return self.step_offset + int(self.model.optimizer.iterations.numpy())

    def _gates(self):
        return tpl.TemplateGates(self.model, self.positions)

    def _append(self, row: dict) -> None:
        from stfusion_tf import files
        with files.JsonlAppender(self.trace_path) as f:
            f.append(row)

    def _trace_rates(self, epoch: int) -> None:
        gates = self._gates()
        step = self._step()
        if step == self._last_traced:  # a phase's start is the previous one's end
            return
        self._last_traced = step
        rates = gates.drop_rates()
        head = float(gates.head.drop_rate) if gates.head is not None else None
        self._append({"kind": "drop_rates", "step": step, "epoch": epoch,
                      "enabled": bool(int(gates.s[0].enabled.numpy())),
                      "p_S": rates[:, 0].round(5).tolist(), "p_T": rates[:, 1].round(5).tolist(),
                      "p_head": head})
        with self.writer.as_default(step=step):
            for pos, (ps, pt) in zip(self.positions, rates):
                tf.summary.scalar(f"gates/p_S/{pos}", ps)
                tf.summary.scalar(f"gates/p_T/{pos}", pt)

    def on_train_begin(self, logs=None):
        self._epoch = 0
        self._trace_rates(0)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self._step() % self.every == 0:
            self._trace_rates(self._epoch)

    def _was_enabled(self) -> bool:
        return bool(int(self._gates().s[0].enabled.numpy()))

    def on_epoch_end(self, epoch, logs=None):
        self._trace_rates(epoch)
        if self.batches is None or not self._was_enabled():
            return
        data, reg = self.gradient_sources()
        step = self._step()
        self._append({"kind": "gradients", "step": step, "epoch": epoch,
                      "grad_data": data.round(7).tolist(), "grad_regularizer": reg.round(7).tolist()})
        with self.writer.as_default(step=step):
            tf.summary.scalar("gates/grad_data", float(np.mean(np.abs(data))))
            tf.summary.scalar("gates/grad_regularizer", float(np.mean(np.abs(reg))))
        self.writer.flush()

    def gradient_sources(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean gradient of every gate logit (S gates, T gates, head) from the data term
        and from the regulariser, over ``grad_batches`` training batches."""
        gates = self._gates().all
        logits = [g.p_logit for g in gates]
        state = [v.numpy() for v in self.model.non_trainable_variables]
        if self._iterator is None:
            self._iterator = iter(self.batches)
        ce_fn = self.model.loss  # the training loss (label smoothing, soft labels)
        data = np.zeros(len(logits))
        for _ in range(self.grad_batches):
            x, y = next(self._iterator)
            with tf.GradientTape() as tape:
                ce = ce_fn(y, self.model(x, training=True))
            data += np.array([float(g) for g in tape.gradient(ce, logits)]) / self.grad_batches
        with tf.GradientTape() as tape:
            reg = tf.add_n([g.regularization() for g in gates])
        reg_grad = np.array([float(g) for g in tape.gradient(reg, logits)])
        for v, value in zip(self.model.non_trainable_variables, state):
            v.assign(value)
        return data, reg_grad
