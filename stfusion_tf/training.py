"""Training the template with ``model.fit``: warm-up, then Variational DropPath.

What the callbacks do:

* ``GateSchedule``: gates off for the first ``warmup_epochs`` (the paper's
  warm-up without v-DropPath), on afterwards.  The switch is a variable
  assignment (no retrace) and depends only on the epoch, so it survives resume.
* ``AtomicCheckpoint``: a ``tf.train.CheckpointManager`` of model, optimizer
  and epoch, written at the end of every epoch and kept to the last K.  TF
  writes the data and index files first and the ``checkpoint`` state file last
  by rename, so a run killed mid-write (even ``kill -9``) resumes from the last
  complete checkpoint.  An "epoch" is ``steps_per_epoch`` optimizer steps, so a
  resumed run ends at the same step count as an uninterrupted one.
* ``FusionSummaries``: cross-entropy vs regulariser split, learning rate,
  drop-rate histograms and the marginal bar chart (Fig. 4 style) in TensorBoard.
* ``StopOnNonFinite``: NaN/Inf loss stops the run with a clear message; the
  last good checkpoint is kept (the bad epoch is never saved).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

import keras
import numpy as np
import tensorflow as tf

from stfusion_tf import evaluation
from stfusion_tf.analysis import marginals as marg
from stfusion_tf.data import pipeline, records
from stfusion_tf.model import backbones
from stfusion_tf.model import gates as gates_lib
from stfusion_tf.model import template as tpl

DISTRIBUTIONS = ("default", "mirrored", "multi_worker", "tpu")
OPTIMIZERS = ("sgd", "adam")
MODEL_FILE = "template.keras"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    epochs: int = 6
    warmup_epochs: int = 2
    learning_rate: float = 0.01
    lr_steps: tuple[int, ...] = ()
    lr_factor: float = 0.1
    momentum: float = 0.9
    optimizer: str = "sgd"
    steps_per_epoch: int | None = None
    keep_checkpoints: int = 3
    seed: int = 0


class NonFiniteLossError(RuntimeError):
    pass


def make_distribution(name: str, tpu: str = "") -> tf.distribute.Strategy:
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"distribution={name!r}; valid values: {', '.join(DISTRIBUTIONS)}")


class GateSchedule(keras.callbacks.Callback):
    def __init__(self, warmup_epochs: int):
        super().__init__()
        self.warmup_epochs = warmup_epochs

    def on_epoch_begin(self, epoch, logs=None):
        gates_lib.set_enabled(gates_lib.gate_layers(self.model), epoch >= self.warmup_epochs)


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
                     f"{counts[1]} record(s) lost to corrupt records (see tf.data warnings)")
            self.reported = counts


class StopOnNonFinite(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise NonFiniteLossError(
                f"loss became {loss} at batch {batch}; stopping. The last good checkpoint "
                "is kept; lower --learning_rate or check the input data.")


class AtomicCheckpoint(keras.callbacks.Callback):
    """Saves to ``directory``; restores from ``restore_from`` (the chief's folder).

    In multi-worker training every worker takes part in saving, but only the
    chief writes the real checkpoints; the others write to a scratch folder.
    """

    def __init__(self, directory: str, max_to_keep: int, restore_from: str | None = None):
        super().__init__()
        self.directory = directory
        self.restore_from = restore_from or directory
        self.max_to_keep = max_to_keep
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")

    def attach(self, model):
        self.ckpt = tf.train.Checkpoint(model=model, optimizer=model.optimizer, epoch=self.epoch)
        self.manager = tf.train.CheckpointManager(self.ckpt, self.directory, self.max_to_keep)
        return self

    def restore(self) -> int:
        """Restores the latest checkpoint if any; returns the epoch to start from."""
        latest = tf.train.latest_checkpoint(self.restore_from)
        if latest:
            self.ckpt.restore(latest).expect_partial()
            return int(self.epoch.numpy())
        return 0

    def on_epoch_end(self, epoch, logs=None):
        self.epoch.assign(epoch + 1)
        self.manager.save(checkpoint_number=epoch + 1)


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
        opt = self.model.optimizer
        lr = opt.learning_rate
        lr = float(lr(opt.iterations)) if callable(lr) else float(np.asarray(lr))
        logs["learning_rate"] = lr
        with self.writer.as_default(step=epoch):
            tf.summary.scalar("learning_rate", lr)
            tf.summary.scalar("loss/regularizer", logs["regularizer"])
            if "cross_entropy" in logs:
                tf.summary.scalar("loss/cross_entropy", logs["cross_entropy"])
            if not gl:  # a backbone: no drop rates to show
                self.writer.flush()
                return
            rates = tpl.TemplateGates(self.model, self.positions).drop_rates()
            tf.summary.histogram("drop_rate/S_branch", rates[:, 0])
            tf.summary.histogram("drop_rate/T_branch", rates[:, 1])
            png = marg.plot(self.positions, rates, title=f"marginals, epoch {epoch + 1}")
            tf.summary.image("marginals", tf.io.decode_png(png)[None])
        self.writer.flush()


def worker_role(strategy) -> tuple[bool, int]:
    """(is_chief, task_id) of this process; single-host strategies are always chief."""
    resolver = getattr(strategy.extended, "_cluster_resolver", None) or getattr(
        strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    task_id = getattr(resolver, "task_id", None) or 0
    if not task_type or task_type == "chief":
        return True, 0
    has_chief = "chief" in (resolver.cluster_spec().as_dict() if resolver else {})
    return (task_type == "worker" and task_id == 0 and not has_chief), int(task_id)


def fit_multi_worker(model, strategy, dataset, epochs: int, initial_epoch: int, steps: int,
                     global_batch: int, callbacks, verbose: int) -> dict:
    """``model.fit`` for MultiWorkerMirroredStrategy, which Keras 3's fit does not
    support (keras-team/keras#20585: "Attempt to convert a value (PerReplica...)").

    Same loss (mean cross-entropy over the global batch + the gates' regulariser,
    once), same callbacks, same logs; gradients are all-reduced by the strategy.
    """
    replicas = strategy.num_replicas_in_sync
    with strategy.scope():
        ce_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
        m_loss = keras.metrics.Mean(name="loss")
        m_ce = keras.metrics.SparseCategoricalCrossentropy(from_logits=True, name="cross_entropy")
        m_acc = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    metrics = [m_loss, m_ce, m_acc]

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            ce = tf.nn.compute_average_loss(ce_loss(y, logits), global_batch_size=global_batch)
            reg = tf.add_n(model.losses) if model.losses else tf.constant(0.0)
            loss = ce + reg / replicas
        grads = tape.gradient(loss, model.trainable_variables)
        model.optimizer.apply_gradients(zip(grads, model.trainable_variables))
        m_ce.update_state(y, logits)
        m_acc.update_state(y, logits)
        return loss

    @tf.function
    def train_step(iterator):
        x, y = next(iterator)
        per_replica = strategy.run(replica_step, args=(x, y))
        loss = strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
        m_loss.update_state(loss)
        return loss

    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    cbs = keras.callbacks.CallbackList(callbacks, add_history=True, add_progbar=verbose != 0,
                                       model=model, verbose=verbose, epochs=epochs, steps=steps)
    cbs.on_train_begin()
    logs = {}
    for epoch in range(initial_epoch, epochs):
        for m in metrics:
            m.reset_state()
        cbs.on_epoch_begin(epoch)
        for batch in range(steps):
            cbs.on_train_batch_begin(batch)
            train_step(iterator)
            logs = {m.name: float(m.result()) for m in metrics}
            cbs.on_train_batch_end(batch, logs)
        cbs.on_epoch_end(epoch, logs)
    cbs.on_train_end(logs)
    return model.history.history


def _optimizer(cfg: TrainConfig, steps_per_epoch: int):
    lr = cfg.learning_rate
    if cfg.lr_steps:
        values = [cfg.learning_rate * cfg.lr_factor ** i for i in range(len(cfg.lr_steps) + 1)]
        lr = keras.optimizers.schedules.PiecewiseConstantDecay(
            [int(e * steps_per_epoch) for e in cfg.lr_steps], values)
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(lr, momentum=cfg.momentum)
    if cfg.optimizer == "adam":
        return keras.optimizers.Adam(lr)
    raise ValueError(f"optimizer={cfg.optimizer!r}; valid values: {', '.join(OPTIMIZERS)}")


def save_model_atomic(model: keras.Model, path: str) -> None:
    tmp = path + ".tmp.keras"
    model.save(tmp)
    os.replace(tmp, path)


def train(model_dir: str, data_dir: str, template_cfg: tpl.TemplateConfig,
          gate_cfg: tpl.GateConfig, input_cfg: pipeline.InputConfig, cfg: TrainConfig,
          distribution: str = "default", tpu: str = "", train_split: str = "train",
          eval_split: str | None = "val", verbose: int = 1, log=print,
          data_service: str | None = None, fixed_strategy=None, model_fn=None,
          model_file: str = MODEL_FILE) -> dict:
    """Trains (or resumes) the template in ``model_dir``; returns a summary dict.

    ``input_cfg.batch_size`` is the global batch: Keras splits it across replicas,
    and the regulariser, added once per replica, is scaled with the loss by
    1/replicas, so it counts once in the gradient.

    ``fixed_strategy`` (a FusionStrategy) trains that one sub-network stand-alone:
    its masks hold in training and inference and the gates stay off (cross-entropy
    only), e.g. to check inherited-weight rankings (``--mode=fidelity``).

    ``model_fn(num_classes, synchronized_bn) -> keras.Model`` trains another
    network (a backbone, ``--mode=generalize``) in place of the template, with
    the same recipe, input pipeline, checkpoints and evaluation; it is saved
    as ``model_file``.
    """
    os.makedirs(model_dir, exist_ok=True)
    manifest = records.read_manifest(data_dir)
    n_train = manifest["splits"][train_split]["num_clips"]
    gate_cfg = dataclasses.replace(gate_cfg, dataset_size=n_train)
    steps = cfg.steps_per_epoch or max(1, n_train // input_cfg.batch_size)
    strategy = make_distribution(distribution, tpu)
    chief, task_id = worker_role(strategy)
    write_dir = model_dir if chief else os.path.join(model_dir, "_worker_scratch", str(task_id))
    template_cfg = dataclasses.replace(template_cfg, num_frames=input_cfg.model_frames,
                                       crop_size=input_cfg.crop_size)
    keras.utils.set_random_seed(cfg.seed)
    with strategy.scope():
        sync = strategy.num_replicas_in_sync > 1
        if model_fn is not None:
            model = model_fn(manifest["num_classes"], sync)
        else:
            model = tpl.build_template(template_cfg, manifest["num_classes"], gate_cfg,
                                       synchronized_bn=sync)
        model.compile(
            optimizer=_optimizer(cfg, steps),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[keras.metrics.SparseCategoricalCrossentropy(from_logits=True, name="cross_entropy"),
                     keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
        model.optimizer.build(model.trainable_variables)
        ckpt = AtomicCheckpoint(os.path.join(write_dir, "checkpoints"), cfg.keep_checkpoints,
                                restore_from=os.path.join(model_dir, "checkpoints"))
        ckpt.attach(model)
        start_epoch = ckpt.restore()
    if fixed_strategy is not None:
        fixed = tpl.TemplateGates(model)
        fixed.set_strategy(fixed_strategy)
        gates_lib.set_inference_mode(fixed.s + fixed.t, "mask")
        cfg = dataclasses.replace(cfg, warmup_epochs=cfg.epochs)  # gates never switch on
    if start_epoch:
        log(f"resuming from epoch {start_epoch} (step {int(model.optimizer.iterations.numpy())})")
    positions = tpl.template_positions(template_cfg) if model_fn is None else None
    # Counting needs variables inside the input pipeline, which tf.distribute's dataset
    # rewriting and tf.data service cannot carry: count on single-replica local runs.
    stats = None if (data_service or strategy.num_replicas_in_sync > 1) else pipeline.InputStats()
    train_ds = pipeline.train_dataset(data_dir, train_split, input_cfg, data_service=data_service,
                                      stats=stats)
    callbacks = [
        GateSchedule(cfg.warmup_epochs),
        StopOnNonFinite(),
        *([InputHealth(stats, os.path.join(write_dir, "tensorboard", "input"), log)] if stats else []),
        FusionSummaries(os.path.join(write_dir, "tensorboard", "fusion"), positions),
        ckpt,
        keras.callbacks.TensorBoard(os.path.join(write_dir, "tensorboard"), write_graph=False),
    ]
    history = {}
    if start_epoch < cfg.epochs:
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            with strategy.scope():
                h = fit_multi_worker(model, strategy, train_ds, cfg.epochs, start_epoch, steps,
                                     input_cfg.batch_size, callbacks, verbose)
        else:
            h = model.fit(train_ds, epochs=cfg.epochs, initial_epoch=start_epoch,
                          steps_per_epoch=steps, callbacks=callbacks, verbose=verbose).history
        history = {k: [float(v) for v in vals] for k, vals in h.items()}
    gates_lib.set_enabled(gates_lib.gate_layers(model), cfg.epochs > cfg.warmup_epochs)
    summary = {"epochs": cfg.epochs, "steps": int(model.optimizer.iterations.numpy()),
               "replicas": strategy.num_replicas_in_sync, "chief": chief,
               "steps_per_epoch": steps, "dataset_size": n_train, "history": history,
               **backbones.count_params(model)}
    if positions is not None:
        summary["template_config"] = dataclasses.asdict(template_cfg)
        summary["drop_rates"] = tpl.TemplateGates(model, positions).drop_rates().tolist()
        summary["positions"] = list(positions)
    if not chief:
        import shutil
        shutil.rmtree(write_dir, ignore_errors=True)
        return summary
    save_model_atomic(model, os.path.join(model_dir, model_file))
    if eval_split:
        expected = manifest["splits"][eval_split]["num_clips"]
        views = expected * input_cfg.num_clips * input_cfg.num_crops
        result = evaluation.evaluate(model, pipeline.eval_dataset(data_dir, eval_split, input_cfg),
                                     views, progress_stream=sys.stderr if verbose else None)
        summary["eval"] = {eval_split: result}
        log(f"{eval_split}: {json.dumps(result)}")
        if result["num_videos"] < expected:
            log(f"[input] {eval_split}: {expected - result['num_videos']} of "
                f"{expected} videos could not be read (corrupt) and were not scored")
    records.write_json_atomic(os.path.join(model_dir, "train_summary.json"), summary)
    return summary


def load_template_config(model_dir: str) -> tpl.TemplateConfig | None:
    """The TemplateConfig the template in ``model_dir`` was trained with (None for
    runs older than this record)."""
    path = os.path.join(model_dir, "train_summary.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        d = json.load(f).get("template_config")
    return None if d is None else tpl.TemplateConfig.from_dict(d)


def load_template(model_dir: str) -> keras.Model:
    path = os.path.join(model_dir, MODEL_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no trained template at {path}; run --mode=train first")
    return keras.models.load_model(path)
