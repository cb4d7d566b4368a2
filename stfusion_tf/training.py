"""Training a network with ``model.fit``: the template (warm-up, then Variational
DropPath), one of its strategies stand-alone, or a backbone.

``train`` takes the model from its caller, built inside the caller's
``distribution.scope()``; it compiles it with the recipe of ``TrainConfig``,
restores the newest checkpoint (or, on a fresh run, initialises the model with
the caller's ``init_fn``), fits with the callbacks of ``callbacks.py``, saves
the model and evaluates it.  Multi-worker runs go through
``distribution.fit_multi_worker`` (Keras 3's ``fit`` does not support them).

**Phases.**  Without ``restart_at_switch`` one optimizer and one learning-rate
schedule span the run, the gates switching on after ``warmup_epochs``.  With
it (the authors' two launches): the warm-up is one phase (its own learning
rate, steps and weight decay) and the v-DropPath phase another, started with a
fresh optimizer (momentum and step count at zero) and its own schedule.  All
epoch numbers count from the start of the run.  A checkpoint holds the
optimizer of the phase it was written in; a run resumed inside a phase gets
that phase's optimizer back, one resumed from the checkpoint that ends the
warm-up restarts, so the restart happens exactly once either way.

**Weight decay** is Keras' decoupled form, w <- w - lr * wd * w per step, on
every trainable variable (kernels, biases, BatchNorm scale and shift: the
authors' single PyTorch parameter group) except the gates' drop logits.
PyTorch's ``SGD(weight_decay=l)`` adds l * w to the gradient before momentum m,
which in steady state shrinks weights l / (1 - m) per unit learning rate: the
authors' 5e-4 with momentum 0.9 is wd = 5e-3 here.
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
from stfusion_tf import evaluation, files
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
#: Variable names weight decay never touches: the gates' drop logits.
NO_DECAY = ("p_logit",)
MODEL_FILE = "template.keras"
SUMMARY_FILE = "train_summary.json"
INIT_FILE = "init.json"
TRACE_FILE = "gate_trace.jsonl"
NonFiniteLossError = cb.NonFiniteLossError
WorkerLostError = dist_lib.WorkerLostError


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The optimisation recipe of one run; ``epochs`` counts the warm-up too."""

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
    #: Decoupled weight decay of the v-DropPath phase (of the whole run without a restart).
    weight_decay: float = 0.0
    #: Restart optimizer and schedule when the gates switch on (module docstring).
    restart_at_switch: bool = False
    #: The warm-up phase's learning rate (None: ``learning_rate``), steps and weight decay;
    #: only with ``restart_at_switch``.
    warmup_learning_rate: float | None = None
    warmup_lr_steps: tuple[int, ...] = ()
    warmup_weight_decay: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "lr_steps", tuple(int(s) for s in self.lr_steps))
        object.__setattr__(self, "warmup_lr_steps", tuple(int(s) for s in self.warmup_lr_steps))
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
        if min(self.weight_decay, self.warmup_weight_decay) < 0:
            raise UserError("weight_decay and warmup_weight_decay must be >= 0")
        self._check_phases()

    def _check_phases(self):
        warmup_set = [n for n, v, default in (
            ("warmup_learning_rate", self.warmup_learning_rate, None),
            ("warmup_lr_steps", self.warmup_lr_steps, ()),
            ("warmup_weight_decay", self.warmup_weight_decay, 0.0)) if v != default]
        if not self.restart_at_switch:
            if warmup_set:
                raise UserError(f"{warmup_set[0]} needs restart_at_switch (without it one "
                                "optimizer and schedule span the run)")
            return
        if not 0 < self.warmup_epochs < self.epochs:
            raise UserError("restart_at_switch needs 0 < warmup_epochs < epochs, got "
                            f"warmup_epochs={self.warmup_epochs}, epochs={self.epochs}")
        if self.warmup_learning_rate is not None and self.warmup_learning_rate <= 0:
            raise UserError(f"warmup_learning_rate must be > 0, got {self.warmup_learning_rate}")
        steps = list(self.warmup_lr_steps)
        if steps != sorted(steps) or any(not 0 < e < self.warmup_epochs for e in steps):
            raise UserError(f"warmup_lr_steps must increase inside the warm-up (0 < epoch < "
                            f"warmup_epochs={self.warmup_epochs}), got {steps}")
        if any(e <= self.warmup_epochs for e in self.lr_steps):
            raise UserError(f"with restart_at_switch, lr_steps are the v-DropPath phase's (epochs "
                            f"from the start of the run, > warmup_epochs={self.warmup_epochs}), "
                            f"got {list(self.lr_steps)}")


@dataclasses.dataclass(frozen=True)
class Phase:
    """Epochs [start, end) trained by one optimizer on one schedule (steps: run epochs)."""

    name: str
    start: int
    end: int
    learning_rate: float
    lr_steps: tuple[int, ...]
    weight_decay: float


def phases(cfg: TrainConfig) -> tuple[Phase, ...]:
    """The run's phases: one, or warm-up and v-DropPath with ``restart_at_switch``."""
    if not cfg.restart_at_switch:
        return (Phase("run", 0, cfg.epochs, cfg.learning_rate, cfg.lr_steps, cfg.weight_decay),)
    return (Phase("warmup", 0, cfg.warmup_epochs, cfg.warmup_learning_rate or cfg.learning_rate,
                  cfg.warmup_lr_steps, cfg.warmup_weight_decay),
            Phase("variational", cfg.warmup_epochs, cfg.epochs, cfg.learning_rate, cfg.lr_steps,
                  cfg.weight_decay))


def standalone(cfg: TrainConfig, epochs: int) -> TrainConfig:
    """The recipe of a network trained without v-DropPath (a backbone, a fixed strategy)
    for ``epochs``: the v-DropPath phase's learning rate and steps counted from its
    start (from the run's start without a restart), the weight decay of plain training
    (the warm-up's with a restart), classifier dropout on throughout, one phase."""
    offset = cfg.warmup_epochs if cfg.restart_at_switch else 0
    wd = cfg.warmup_weight_decay if cfg.restart_at_switch else cfg.weight_decay
    return dataclasses.replace(
        cfg, epochs=epochs, warmup_epochs=epochs, restart_at_switch=False,
        lr_steps=tuple(e - offset for e in cfg.lr_steps if 0 < e - offset < epochs),
        weight_decay=wd, warmup_learning_rate=None, warmup_lr_steps=(), warmup_weight_decay=0.0)


def _schedule(cfg: TrainConfig, phase: Phase, base: float, steps_per_epoch: int):
    """``base``, multiplied by ``lr_factor`` from the first step of each of the phase's
    ``lr_steps`` (epochs of the run; the phase's optimizer counts steps from its start)."""
    if not phase.lr_steps:
        return base
    values = [base * cfg.lr_factor ** i for i in range(len(phase.lr_steps) + 1)]
    # PiecewiseConstantDecay switches after a boundary; Keras passes the number of
    # steps already taken, so step k of epoch e (k = e * steps_per_epoch) needs e*spe - 1.
    return keras.optimizers.schedules.PiecewiseConstantDecay(
        [int((e - phase.start) * steps_per_epoch) - 1 for e in phase.lr_steps], values)


def _make(name: str, lr, momentum: float, weight_decay: float = 0.0):
    wd = weight_decay or None
    if name == "sgd":
        opt = keras.optimizers.SGD(lr, momentum=momentum, weight_decay=wd)
    else:
        opt = keras.optimizers.Adam(lr, weight_decay=wd)
    if wd:
        opt.exclude_from_weight_decay(var_names=list(NO_DECAY))
    return opt


def build_optimizer(cfg: TrainConfig, steps_per_epoch: int,
                    phase: Phase | None = None) -> keras.optimizers.Optimizer:
    """The optimizer of ``phase`` (default: the run's first): the weights' optimizer with
    the phase's schedule and weight decay (never on gate logits); with ``gate_optimizer``
    other than ``shared``, the gate logits get their own (Keras' ``MultiOptimizer``, no
    weight decay) on the same step schedule."""
    phase = phase or phases(cfg)[0]
    weights = _make(cfg.optimizer, _schedule(cfg, phase, phase.learning_rate, steps_per_epoch),
                    cfg.momentum, phase.weight_decay)
    if cfg.gate_optimizer == "shared":
        return weights
    gate = _make(cfg.gate_optimizer,
                 _schedule(cfg, phase, cfg.gate_learning_rate, steps_per_epoch), cfg.momentum)
    return keras.optimizers.MultiOptimizer(
        keras.optimizers.OptimizerMap(weights, {GATE_VARIABLES: gate}))


def _compile(model, cfg: TrainConfig, steps: int, phase: Phase) -> None:
    model.compile(
        optimizer=build_optimizer(cfg, steps, phase),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalCrossentropy(from_logits=True, name="cross_entropy"),
                 keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    model.optimizer.build(model.trainable_variables)


def _callbacks(model, cfg: TrainConfig, write_dir: str, ckpt, stats, trace_ds, trace_every,
               log) -> list:
    gated = bool(gates_lib.gate_layers(model)) and cfg.warmup_epochs < cfg.epochs
    positions = getattr(model, "positions", None) if gated else None
    trace = []
    if positions:
        # The gradient split needs plain forward passes: single-replica runs only.
        trace = [cb.GateTrace(os.path.join(write_dir, "tensorboard", "gates"),
                              os.path.join(write_dir, TRACE_FILE), positions,
                              every=trace_every, batches=trace_ds)]
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
          data_service: str | None = None, model_file: str = MODEL_FILE,
          init_fn=None, callbacks=(), trace_every: int = 50) -> dict:
    """Trains (or resumes) ``model`` in ``model_dir``; returns the summary it writes.

    ``model`` was built inside ``distribution.scope()`` (default: the default
    distribution).  ``input_cfg.batch_size`` is the global batch: Keras splits it
    across replicas, and the regulariser, added once per replica, is scaled with
    the loss by 1/replicas, so it counts once in the gradient.  A template's
    gates switch on after ``cfg.warmup_epochs`` (and its classifier dropout
    off); a network without gates (a backbone, or a template whose gates hold
    a fixed strategy's masks) simply trains.  ``init_fn(model) -> dict`` runs
    on a fresh run only (a resumed one restores every weight); its report is
    kept in ``init.json`` and the summary.  ``callbacks`` are added to the
    run's own.  The model is saved as ``model_file``; the evaluation of
    ``eval_split`` uses ``input_cfg``'s evaluation protocol; a template's drop rates
    are traced every ``trace_every`` steps (``gate_trace.jsonl``, ``callbacks.GateTrace``).
    """
    distribution = distribution or tf.distribute.get_strategy()
    os.makedirs(model_dir, exist_ok=True)
    manifest = records.read_manifest(data_dir)
    n_train = records.split_size(manifest, train_split)
    steps = cfg.steps_per_epoch or max(1, n_train // input_cfg.batch_size)
    chief, task_id = dist_lib.worker_role(distribution)
    write_dir = model_dir if chief else os.path.join(model_dir, "_worker_scratch", str(task_id))
    keras.utils.set_random_seed(cfg.seed)
    start = cb.checkpoint_epoch(os.path.join(model_dir, "checkpoints"))
    init = _initialise(model, model_dir, init_fn, start, chief, log)
    # Counting needs variables inside the input pipeline, which tf.distribute's dataset
    # rewriting and tf.data service cannot carry: count on single-replica local runs.
    local = not data_service and distribution.num_replicas_in_sync == 1
    stats = pipeline.InputStats() if local else None
    train_ds = pipeline.train_dataset(data_dir, train_split, input_cfg, data_service=data_service,
                                      stats=stats)
    # The gate trace splits gradients on batches of its own (plain forward passes:
    # single-replica local runs only).
    trace_ds = pipeline.train_dataset(data_dir, train_split, input_cfg) if local else None
    ckpt = cb.AtomicCheckpoint(os.path.join(write_dir, "checkpoints"), cfg.keep_checkpoints,
                               restore_from=os.path.join(model_dir, "checkpoints"))
    run_cbs = _callbacks(model, cfg, write_dir, ckpt, stats, trace_ds, trace_every,
                         log) + list(callbacks)
    history, total_steps = _run_phases(model, cfg, distribution, train_ds, start, steps,
                                       input_cfg.batch_size, ckpt, run_cbs, verbose, log)
    cb.set_phase(model, variational=cfg.epochs > cfg.warmup_epochs)
    summary = _summary(model, cfg, distribution, chief, steps, n_train, history, total_steps)
    if init is not None:
        summary["init"] = init
    if not chief:
        shutil.rmtree(write_dir, ignore_errors=True)
        return summary
    files.save_keras(model, os.path.join(model_dir, model_file))
    if eval_split:
        summary["eval"] = {eval_split: _evaluate(model, data_dir, eval_split, input_cfg, manifest,
                                                 verbose, log)}
    files.write_json(os.path.join(model_dir, SUMMARY_FILE), summary)
    return summary


def _initialise(model, model_dir, init_fn, start, chief, log) -> dict | None:
    """Runs ``init_fn`` on a fresh run; returns its report (read back on a resumed run)."""
    path = os.path.join(model_dir, INIT_FILE)
    if init_fn is None:
        return None
    if start:
        return files.read_json(path) if os.path.exists(path) else None
    report = init_fn(model)
    if report is not None:
        log(f"initialised: {json.dumps(report)[:300]}")
        if chief:
            files.write_json(path, report)
    return report


def _run_phases(model, cfg, distribution, train_ds, start, steps, global_batch, ckpt, callbacks,
                verbose, log) -> tuple[dict, int]:
    """Fits each phase from ``start`` on, each with its own optimizer; restores the
    checkpoint into the phase it belongs to.  Returns (history, optimizer steps of the run)."""
    plan = [ph for ph in phases(cfg) if start < ph.end] or [phases(cfg)[-1]]
    history = {}
    for i, ph in enumerate(plan):
        with distribution.scope():
            _compile(model, cfg, steps, ph)
            ckpt.attach(model)
            if i == 0 and start:
                # A checkpoint written at a phase's start holds the previous phase's
                # optimizer: take the weights only, and restart.
                ckpt.restore(optimizer=start > ph.start, log=log)
        offset = ph.start * steps
        for c in callbacks:
            if isinstance(c, cb.GateTrace):
                c.step_offset = offset
        if i == 0 and start:
            log(f"resuming from epoch {start} "
                f"(step {offset + int(model.optimizer.iterations.numpy())})")
        if ph.start > 0 and start <= ph.start:
            log(f"epoch {ph.start}: {ph.name} phase; optimizer and learning-rate schedule "
                f"restarted (lr {ph.learning_rate:g}, steps at epochs {list(ph.lr_steps)}, "
                f"weight decay {ph.weight_decay:g})")
        for k, v in _fit(model, distribution, train_ds, ph.end, max(start, ph.start), steps,
                         global_batch, callbacks, verbose).items():
            history.setdefault(k, []).extend(v)
        start = max(start, ph.end)
    return history, plan[-1].start * steps + int(model.optimizer.iterations.numpy())


def _fit(model, distribution, train_ds, epochs, start_epoch, steps, global_batch, callbacks,
         verbose) -> dict:
    if start_epoch >= epochs:
        return {}
    if dist_lib.is_multi_worker(distribution):
        h = dist_lib.fit_multi_worker(model, distribution, train_ds, epochs, start_epoch,
                                      steps, global_batch, callbacks, verbose)
    else:
        h = model.fit(train_ds, epochs=epochs, initial_epoch=start_epoch,
                      steps_per_epoch=steps, callbacks=callbacks, verbose=verbose).history
    return {k: [float(v) for v in vals] for k, vals in h.items()}


def _summary(model, cfg, distribution, chief, steps, n_train, history, total_steps) -> dict:
    summary = {"epochs": cfg.epochs, "steps": total_steps,
               "replicas": distribution.num_replicas_in_sync, "chief": chief,
               "steps_per_epoch": steps, "dataset_size": n_train, "history": history,
               "phases": [dataclasses.asdict(ph) for ph in phases(cfg)],
               **backbones.count_params(model)}
    if isinstance(model, tpl.Template) and model.strategy is None:
        summary["template_config"] = dataclasses.asdict(model.config)
        summary["drop_rates"] = tpl.TemplateGates(model).drop_rates().tolist()
        summary["positions"] = list(model.positions)
    return summary


def _evaluate(model, data_dir, split, input_cfg, manifest, verbose, log) -> dict:
    expected = records.split_size(manifest, split)
    result = evaluation.evaluate(model, pipeline.eval_dataset(data_dir, split, input_cfg),
                                 expected * input_cfg.num_views,
                                 progress_stream=sys.stderr if verbose else None,
                                 protocol=pipeline.protocol(input_cfg))
    log(f"{split}: {json.dumps(result)}")
    if result["num_videos"] < expected:
        log(f"[input] {split}: {expected - result['num_videos']} of {expected} videos could not "
            "be read (corrupt) and were not scored")
    return result


class DamagedModelFile(UserError):
    """A saved model file that exists but does not load (cut, overwritten)."""


def load_template(model_dir: str) -> keras.Model:
    path = os.path.join(model_dir, MODEL_FILE)
    if not os.path.exists(path):
        raise UserError(f"no trained template at {path}; run --mode=train first")
    try:
        return keras.models.load_model(path)
    except Exception as e:  # noqa: BLE001 - a cut zip, bad JSON or HDF5 fail in many ways
        raise DamagedModelFile(f"{path} does not load ({type(e).__name__}: "
                               f"{str(e).strip()[:160]})") from None


def rebuild_from_checkpoint(model: keras.Model, model_dir: str, reason: str,
                            model_file: str = MODEL_FILE, log=print) -> keras.Model:
    """Rewrites a damaged ``model_file`` of a finished run from its newest complete
    checkpoint: ``model`` (built as in training) takes the checkpoint's weights and gate
    state, as ``train`` left them before saving.  The run's own recipe (``run.json``)
    says how many epochs make it finished."""
    from stfusion_tf import run_record
    record = run_record.read(model_dir)
    if record is None or "train" not in record.get("configs", {}):
        raise UserError(f"{reason}; re-run --mode=train to write it again")
    cfg = record["configs"]["train"]
    epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
    ckpt_dir = os.path.join(model_dir, "checkpoints")
    got = cb.restore_newest(tf.train.Checkpoint(model=model, epoch=epoch), ckpt_dir, epoch, log)
    if got < cfg["epochs"]:
        raise UserError(f"{reason}, and the newest complete checkpoint in {ckpt_dir} is from "
                        f"epoch {got} of {cfg['epochs']}; re-run --mode=train to finish the run")
    cb.set_phase(model, variational=cfg["epochs"] > cfg["warmup_epochs"])
    path = os.path.join(model_dir, model_file)
    if os.path.exists(path):
        os.replace(path, path + ".damaged")
    files.save_keras(model, path)
    log(f"[checkpoint] {reason}; rebuilt it from the checkpoint of epoch {got} (the damaged "
        f"file is kept as {os.path.basename(path)}.damaged)")
    return model
