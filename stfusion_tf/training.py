"""Training a network with ``model.fit``: the template (warm-up, then Variational
DropPath), one of its strategies stand-alone, or a backbone.

``train`` takes the model from its caller, built inside the caller's
``distribution.scope()``; it compiles it with the recipe of ``TrainConfig``,
restores the newest checkpoint (or, on a fresh run, initialises the model with
the caller's ``init_fn``), fits with the callbacks of ``callbacks.py``, saves
the model and evaluates it.  Multi-worker runs go through
``distribution.fit_multi_worker`` (Keras 3's ``fit`` does not support them).

The recipe (phases, optimizers, weight decay) is ``optimization.py``.
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
from stfusion_tf.compute import ComputeConfig, resolve_jit, set_memory_efficient
from stfusion_tf.data import pipeline, records
from stfusion_tf.optimization import (  # noqa: F401  (train() takes a TrainConfig)
    GATE_OPTIMIZERS, OPTIMIZERS, Phase, TrainConfig, build_optimizer, compile_model, phases,
    standalone)
from stfusion_tf.model import backbones
from stfusion_tf.model import gates as gates_lib
from stfusion_tf.model import template as tpl

MODEL_FILE = "template.keras"
SUMMARY_FILE = "train_summary.json"
INIT_FILE = "init.json"
TRACE_FILE = "gate_trace.jsonl"
#: Per-class report of the final evaluation: ``<model_dir>/evaluation/<split>.json``.
EVAL_DIR = "evaluation"
NonFiniteLossError = cb.NonFiniteLossError
WorkerLostError = dist_lib.WorkerLostError


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
          init_fn=None, callbacks=(), trace_every: int = 50,
          compute: ComputeConfig | None = None) -> dict:
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
    ``compute``: XLA and memory-efficient dense layers (the precision is the policy
    ``model`` was built in).
    """
    distribution = distribution or tf.distribute.get_strategy()
    os.makedirs(model_dir, exist_ok=True)
    manifest = records.read_manifest(data_dir)
    n_train = records.split_size(manifest, train_split)
    steps = cfg.steps_per_epoch or max(1, n_train // input_cfg.batch_size)
    chief, task_id = dist_lib.worker_role(distribution)
    write_dir = model_dir if chief else os.path.join(model_dir, "_worker_scratch", str(task_id))
    keras.utils.set_random_seed(cfg.seed)
    compute = compute or ComputeConfig()
    set_memory_efficient(model, compute.memory_efficient)
    soft = cfg.label_smoothing > 0 or input_cfg.mixes
    start = cb.checkpoint_epoch(os.path.join(model_dir, "checkpoints"))
    init = _initialise(model, model_dir, init_fn, start, chief, log)
    # Counting needs variables inside the input pipeline, which tf.distribute's dataset
    # rewriting and tf.data service cannot carry: count on single-replica local runs.
    local = not data_service and distribution.num_replicas_in_sync == 1
    stats = pipeline.InputStats() if local else None
    train_ds = pipeline.train_dataset(data_dir, train_split, input_cfg, data_service=data_service,
                                      stats=stats, one_hot=soft)
    # The gate trace splits gradients on batches of its own (plain forward passes:
    # single-replica local runs only).
    trace_ds = pipeline.train_dataset(data_dir, train_split, input_cfg) if local else None
    ckpt = cb.AtomicCheckpoint(os.path.join(write_dir, "checkpoints"), cfg.keep_checkpoints,
                               restore_from=os.path.join(model_dir, "checkpoints"))
    run_cbs = _callbacks(model, cfg, write_dir, ckpt, stats, trace_ds, trace_every,
                         log) + list(callbacks)
    history, total_steps = _run_phases(model, cfg, distribution, train_ds, start, steps,
                                       input_cfg.batch_size, ckpt, run_cbs, verbose, log, soft,
                                       compute.keras_jit_compile)
    if cfg.ema:  # also after a resumed, already finished run (fit did it otherwise; idempotent)
        model.optimizer.finalize_variable_values(model.trainable_variables)
    cb.set_phase(model, variational=cfg.epochs > cfg.warmup_epochs)
    summary = _summary(model, cfg, distribution, chief, steps, n_train, history, total_steps)
    warmup = _warmup_end(history, start, cfg) or _recorded_warmup_end(model_dir, start, cfg)
    summary.update({k: v for k, v in (("warmup_end", warmup), ("init", init)) if v is not None})
    if not chief:
        shutil.rmtree(write_dir, ignore_errors=True)
        return summary
    files.save_keras(model, os.path.join(model_dir, model_file))
    if eval_split:
        summary["eval"] = {eval_split: _evaluate(model, data_dir, eval_split, input_cfg, manifest,
                                                 verbose, log, model_dir, summary["steps"],
                                                 resolve_jit(compute.jit_compile))}
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
                verbose, log, soft=False, jit_compile="auto") -> tuple[dict, int]:
    """Fits each phase from ``start`` on, each with its own optimizer; restores the
    checkpoint into the phase it belongs to.  Returns (history, optimizer steps of the run)."""
    plan = [ph for ph in phases(cfg) if start < ph.end] or [phases(cfg)[-1]]
    history = {}
    for i, ph in enumerate(plan):
        with distribution.scope():
            compile_model(model, cfg, steps, ph, soft, jit_compile)
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
        # The pipeline shuffles; shuffle=False only tells Keras so (it warns otherwise).
        h = model.fit(train_ds, epochs=epochs, initial_epoch=start_epoch, shuffle=False,
                      steps_per_epoch=steps, callbacks=callbacks, verbose=verbose).history
    return {k: [float(v) for v in vals] for k, vals in h.items()}


def _warmup_end(history: dict, start: int, cfg) -> dict | None:
    """Train accuracy of the warm-up's last epoch, when this invocation trained it (a
    template whose gates switch on mid-run): the report checks the template had learned
    something before the drop rates started to move."""
    acc = history.get("accuracy", [])
    i = cfg.warmup_epochs - 1 - start
    if not 0 < cfg.warmup_epochs < cfg.epochs or not 0 <= i < len(acc):
        return None
    return {"epoch": cfg.warmup_epochs, "train_accuracy": acc[i]}


def _recorded_warmup_end(model_dir: str, start: int, cfg) -> dict | None:
    """A run resumed after its warm-up keeps what the summary that trained it recorded."""
    return None if start < cfg.warmup_epochs else recorded_warmup_end(model_dir)


def recorded_warmup_end(model_dir: str) -> dict | None:
    """``warmup_end`` of the run's training summary; None without one (or an unreadable one)."""
    try:
        return files.read_json(os.path.join(model_dir, SUMMARY_FILE)).get("warmup_end")
    except (OSError, ValueError):
        return None


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


def _evaluate(model, data_dir, split, input_cfg, manifest, verbose, log, model_dir, step,
              jit=False) -> dict:
    """Accuracy on ``split``; the per-class report goes to ``evaluation/<split>.json`` and its
    confusion matrix to TensorBoard (``eval``)."""
    expected = records.split_size(manifest, split)
    result = evaluation.evaluate(model, pipeline.eval_dataset(data_dir, split, input_cfg),
                                 expected * input_cfg.num_views,
                                 progress_stream=sys.stderr if verbose else None,
                                 protocol=pipeline.protocol(input_cfg),
                                 label_map=manifest["label_map"], jit_compile=jit)
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
