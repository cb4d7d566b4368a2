"""Training a network with ``model.fit``: the template (warm-up, then Variational
DropPath), one of its strategies stand-alone, or a backbone.

``train`` takes the model from its caller, built inside the caller's
``distribution.scope()``; it compiles it with the recipe of ``TrainConfig``,
restores the newest checkpoint, fits with the callbacks of ``callbacks.py``,
saves the model and evaluates it.  Multi-worker runs go through
``distribution.fit_multi_worker`` (Keras 3's ``fit`` does not support them).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys

import keras
import tensorflow as tf

from stfusion_tf import callbacks as cb
from stfusion_tf import distribution as dist_lib
from stfusion_tf import evaluation, files, losses
from stfusion_tf.data import pipeline, records
from stfusion_tf.errors import UserError
from stfusion_tf.model import backbones
from stfusion_tf.model import gates as gates_lib
from stfusion_tf.model import template as tpl

OPTIMIZERS = ("sgd", "adam")
#: How the gates' drop logits are optimised: with the weights (the authors' one SGD
#: parameter group) or by an optimizer of their own.
GATE_OPTIMIZERS = ("shared", "adam", "sgd")
GATE_VARIABLES = ".*/p_logit"
MODEL_FILE = "template.keras"
SUMMARY_FILE = "train_summary.json"
TRACE_FILE = "gate_trace.jsonl"
#: Per-class report of the final evaluation: ``<model_dir>/evaluation/<split>.json``.
EVAL_DIR = "evaluation"
NonFiniteLossError = cb.NonFiniteLossError


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The optimisation recipe of one run; ``epochs`` counts the warm-up too.

    ``label_smoothing``: e of the loss' smoothed targets (0: off, the paper).
    ``ema``: keep an exponential moving average of the weights (Keras' optimizer
    ``use_ema``, momentum ``ema_momentum``) and end training with the averaged
    weights, which the final evaluation, the saved model and the analysis then
    use.  The gates' drop logits are not averaged (see ``build_optimizer``).
    """

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
    gate_optimizer: str = "shared"
    gate_learning_rate: float | None = None
    label_smoothing: float = 0.0
    ema: bool = False
    ema_momentum: float = 0.999

    def __post_init__(self):
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UserError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 < self.ema_momentum < 1.0:
            raise UserError(f"ema_momentum must be in (0, 1), got {self.ema_momentum}")
        object.__setattr__(self, "lr_steps", tuple(int(s) for s in self.lr_steps))
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"optimizer={self.optimizer!r}; valid values: {', '.join(OPTIMIZERS)}")
        if self.epochs < 1:
            raise UserError(f"epochs must be >= 1, got {self.epochs}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise UserError(f"warmup_epochs={self.warmup_epochs} exceeds epochs={self.epochs}")
        if self.learning_rate <= 0:
            raise UserError(f"learning_rate must be > 0, got {self.learning_rate}")
        if list(self.lr_steps) != sorted(self.lr_steps):
            raise UserError(f"lr_steps must increase, got {list(self.lr_steps)}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise UserError(f"steps_per_epoch must be >= 1, got {self.steps_per_epoch}")
        if self.gate_optimizer not in GATE_OPTIMIZERS:
            raise UserError(f"gate_optimizer={self.gate_optimizer!r}; valid values: "
                            f"{', '.join(GATE_OPTIMIZERS)}")
        if self.gate_optimizer != "shared" and not (self.gate_learning_rate or 0) > 0:
            raise UserError(f"gate_optimizer={self.gate_optimizer} needs gate_learning_rate > 0")


def _schedule(cfg: TrainConfig, base: float, steps_per_epoch: int):
    """``base``, multiplied by ``lr_factor`` at each of ``lr_steps`` (epochs)."""
    if not cfg.lr_steps:
        return base
    values = [base * cfg.lr_factor ** i for i in range(len(cfg.lr_steps) + 1)]
    return keras.optimizers.schedules.PiecewiseConstantDecay(
        [int(e * steps_per_epoch) for e in cfg.lr_steps], values)


def _make(name: str, lr, momentum: float, ema: bool = False, ema_momentum: float = 0.99):
    kw = {"use_ema": ema, "ema_momentum": ema_momentum}
    if name == "sgd":
        return keras.optimizers.SGD(lr, momentum=momentum, **kw)
    return keras.optimizers.Adam(lr, **kw)


def build_optimizer(cfg: TrainConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """The weights' optimizer; with ``gate_optimizer`` other than ``shared``, the gate
    logits get their own (Keras' ``MultiOptimizer``), on the same step schedule.

    With ``ema`` only the weights' optimizer averages.  An average of the drop
    logits would be a drop rate the run never trained with (it lags the logits
    and carries the value they keep through warm-up, without gradient), yet the
    marginals, the sampling and the export read it; so the logits keep their
    trained values.  Under ``shared`` the logits then get an optimizer of their
    own with the weights' algorithm and hyperparameters and no average: SGD and
    Adam update each variable on its own, so the update is the shared one.
    """
    weights = _make(cfg.optimizer, _schedule(cfg, cfg.learning_rate, steps_per_epoch),
                    cfg.momentum, cfg.ema, cfg.ema_momentum)
    if cfg.gate_optimizer == "shared" and not cfg.ema:
        return weights
    if cfg.gate_optimizer == "shared":
        gate = _make(cfg.optimizer, _schedule(cfg, cfg.learning_rate, steps_per_epoch),
                     cfg.momentum)
    else:
        gate = _make(cfg.gate_optimizer, _schedule(cfg, cfg.gate_learning_rate, steps_per_epoch),
                     cfg.momentum)
    return keras.optimizers.MultiOptimizer(
        keras.optimizers.OptimizerMap(weights, {GATE_VARIABLES: gate}))


def _compile(model, cfg: TrainConfig, steps: int, soft: bool = False) -> None:
    """``soft``: the labels are one-hot rows (label smoothing, mixup / cutmix)."""
    model.compile(optimizer=build_optimizer(cfg, steps),
                  loss=losses.make_loss(soft, cfg.label_smoothing),
                  metrics=losses.make_metrics(soft))
    model.optimizer.build(model.trainable_variables)


def _callbacks(model, cfg: TrainConfig, write_dir: str, ckpt, stats, trace_ds, log) -> list:
    gated = bool(gates_lib.gate_layers(model)) and cfg.warmup_epochs < cfg.epochs
    positions = getattr(model, "positions", None) if gated else None
    trace = []
    if positions:
        # The gradient split needs plain forward passes: single-replica runs only.
        trace = [cb.GateTrace(os.path.join(write_dir, "tensorboard", "gates"),
                              os.path.join(write_dir, TRACE_FILE), positions,
                              batches=trace_ds)]
    return [
        cb.GateSchedule(cfg.warmup_epochs),
        cb.StopOnNonFinite(),
        *([cb.InputHealth(stats, os.path.join(write_dir, "tensorboard", "input"), log)]
          if stats else []),
        cb.FusionSummaries(os.path.join(write_dir, "tensorboard", "fusion"), positions),
        *trace,
        ckpt,
        keras.callbacks.TensorBoard(os.path.join(write_dir, "tensorboard"), write_graph=False),
    ]


def train(model: keras.Model, model_dir: str, data_dir: str, input_cfg: pipeline.InputConfig,
          cfg: TrainConfig, distribution=None, train_split: str = "train",
          eval_split: str | None = "val", verbose: int = 1, log=print,
          data_service: str | None = None, model_file: str = MODEL_FILE) -> dict:
    """Trains (or resumes) ``model`` in ``model_dir``; returns the summary it writes.

    ``model`` was built inside ``distribution.scope()`` (default: the default
    distribution).  ``input_cfg.batch_size`` is the global batch: Keras splits it
    across replicas, and the regulariser, added once per replica, is scaled with
    the loss by 1/replicas, so it counts once in the gradient.  A template's
    gates switch on after ``cfg.warmup_epochs``; a network without gates (a
    backbone, or a template whose gates hold a fixed strategy's masks) simply
    trains.  The model is saved as ``model_file``.
    """
    distribution = distribution or tf.distribute.get_strategy()
    os.makedirs(model_dir, exist_ok=True)
    manifest = records.read_manifest(data_dir)
    n_train = records.split_size(manifest, train_split)
    steps = cfg.steps_per_epoch or max(1, n_train // input_cfg.batch_size)
    chief, task_id = dist_lib.worker_role(distribution)
    write_dir = model_dir if chief else os.path.join(model_dir, "_worker_scratch", str(task_id))
    keras.utils.set_random_seed(cfg.seed)
    soft = cfg.label_smoothing > 0 or input_cfg.mixes
    with distribution.scope():
        _compile(model, cfg, steps, soft)
        ckpt = cb.AtomicCheckpoint(os.path.join(write_dir, "checkpoints"), cfg.keep_checkpoints,
                                   restore_from=os.path.join(model_dir, "checkpoints"))
        start_epoch = ckpt.attach(model).restore()
    if start_epoch:
        log(f"resuming from epoch {start_epoch} (step {int(model.optimizer.iterations.numpy())})")
    # Counting needs variables inside the input pipeline, which tf.distribute's dataset
    # rewriting and tf.data service cannot carry: count on single-replica local runs.
    local = not data_service and distribution.num_replicas_in_sync == 1
    stats = pipeline.InputStats() if local else None
    train_ds = pipeline.train_dataset(data_dir, train_split, input_cfg, data_service=data_service,
                                      stats=stats, one_hot=soft)
    # The gate trace splits gradients on batches of its own (plain forward passes:
    # single-replica local runs only).
    trace_ds = pipeline.train_dataset(data_dir, train_split, input_cfg,
                                      one_hot=soft) if local else None
    callbacks = _callbacks(model, cfg, write_dir, ckpt, stats, trace_ds, log)
    history = _fit(model, distribution, train_ds, cfg, start_epoch, steps, input_cfg.batch_size,
                   callbacks, verbose)
    if cfg.ema:  # also after a resumed, already finished run (fit did it otherwise; idempotent)
        model.optimizer.finalize_variable_values(model.trainable_variables)
    gates_lib.set_enabled(gates_lib.gate_layers(model), cfg.epochs > cfg.warmup_epochs)
    summary = _summary(model, cfg, distribution, chief, steps, n_train, history)
    if not chief:
        shutil.rmtree(write_dir, ignore_errors=True)
        return summary
    files.save_keras(model, os.path.join(model_dir, model_file))
    if eval_split:
        summary["eval"] = {eval_split: _evaluate(model, data_dir, eval_split, input_cfg, manifest,
                                                 verbose, log, model_dir, summary["steps"])}
    files.write_json(os.path.join(model_dir, SUMMARY_FILE), summary)
    return summary


def _fit(model, distribution, train_ds, cfg, start_epoch, steps, global_batch, callbacks,
         verbose) -> dict:
    if start_epoch >= cfg.epochs:
        return {}
    if dist_lib.is_multi_worker(distribution):
        h = dist_lib.fit_multi_worker(model, distribution, train_ds, cfg.epochs, start_epoch,
                                      steps, global_batch, callbacks, verbose)
    else:
        h = model.fit(train_ds, epochs=cfg.epochs, initial_epoch=start_epoch,
                      steps_per_epoch=steps, callbacks=callbacks, verbose=verbose).history
    return {k: [float(v) for v in vals] for k, vals in h.items()}


def _summary(model, cfg, distribution, chief, steps, n_train, history) -> dict:
    summary = {"epochs": cfg.epochs, "steps": int(model.optimizer.iterations.numpy()),
               "replicas": distribution.num_replicas_in_sync, "chief": chief,
               "steps_per_epoch": steps, "dataset_size": n_train, "history": history,
               **backbones.count_params(model)}
    if isinstance(model, tpl.Template) and model.strategy is None:
        summary["template_config"] = dataclasses.asdict(model.config)
        summary["drop_rates"] = tpl.TemplateGates(model).drop_rates().tolist()
        summary["positions"] = list(model.positions)
    return summary


def _evaluate(model, data_dir, split, input_cfg, manifest, verbose, log, model_dir, step) -> dict:
    """Accuracy on ``split``; the per-class report goes to ``evaluation/<split>.json`` and its
    confusion matrix to TensorBoard (``eval``)."""
    expected = records.split_size(manifest, split)
    views = expected * input_cfg.num_clips * input_cfg.num_crops
    result = evaluation.evaluate(model, pipeline.eval_dataset(data_dir, split, input_cfg), views,
                                 progress_stream=sys.stderr if verbose else None,
                                 label_map=manifest["label_map"])
    classes = result.pop("classes")
    result["mean_class_accuracy"] = classes["mean_class_accuracy"]
    files.write_json(os.path.join(model_dir, EVAL_DIR, f"{split}.json"), {**result, **classes})
    png = evaluation.plot_confusion(classes, f"{split}: confusion matrix (video level)")
    writer = tf.summary.create_file_writer(os.path.join(model_dir, "tensorboard", "eval"))
    with writer.as_default(step=step):
        tf.summary.image(f"confusion_matrix/{split}", tf.io.decode_png(png)[None])
        tf.summary.scalar(f"mean_class_accuracy/{split}", classes["mean_class_accuracy"])
    writer.flush()
    log(f"{split}: {json.dumps(result)}")
    if result["num_videos"] < expected:
        log(f"[input] {split}: {expected - result['num_videos']} of {expected} videos could not "
            "be read (corrupt) and were not scored")
    return result


def load_template(model_dir: str) -> keras.Model:
    path = os.path.join(model_dir, MODEL_FILE)
    if not os.path.exists(path):
        raise UserError(f"no trained template at {path}; run --mode=train first")
    return keras.models.load_model(path)
