"""Command-line entry point: ``python -m stfusion_tf.main --flagfile=configs/<x>.flags``.

This module is the mode switch (``--mode``; ``flags.MODES``, the README lists what each
does) and runs the modes that need no network; ``modes.py`` runs those that train or
read one; the flags and their configs live in ``flags.py``.  ``analyze``, ``export``,
``generalize`` and ``fidelity`` take the run's settings from ``<model_dir>/run.json``,
so ``--model_dir`` is enough; one run at a time holds a model directory (``lock.py``).
TensorFlow is imported inside the modes on purpose: a bad flag is reported before it
loads.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, logging

from stfusion_tf import flags as cli
from stfusion_tf import modes
from stfusion_tf.errors import UserError, environment_message

FLAGS = cli.FLAGS


def run_prepare(data_dir):
    from stfusion_tf import lock
    from stfusion_tf.data import convert, synthetic
    if FLAGS.dataset not in cli.SYNTHETIC and not os.path.isdir(FLAGS.source_dir or ""):
        raise UserError(f"--dataset={FLAGS.dataset} needs --source_dir, the raw dataset's "
                        f"folder{f'; {FLAGS.source_dir} is none' if FLAGS.source_dir else ''}")
    t0 = time.time()
    with lock.for_data_dir(data_dir, "prepare"):
        if FLAGS.dataset not in cli.SYNTHETIC:
            return convert.prepare(FLAGS.dataset, FLAGS.source_dir, data_dir,
                                   **cli.convert_settings())
        manifest = synthetic.prepare_synthetic(data_dir, cli.synthetic_spec(), log=modes.say)
    counts = {k: v["num_clips"] for k, v in manifest["splits"].items()}
    print(f"[prepare] {data_dir}: {counts} clips, {manifest['num_skipped']} skipped, "
          f"{time.time() - t0:.1f}s")


def run_verify(data_dir):
    """Checks every shard against the manifest and repairs the damaged ones (--repair)."""
    from stfusion_tf import lock
    from stfusion_tf.data import verify
    with lock.for_data_dir(data_dir, "verify"):
        out = verify.verify(data_dir, FLAGS.repair, FLAGS.source_dir, log=print)
    print(verify.summary_line(data_dir, out))
    if out["remaining"]:
        sys.exit(1)


def run_summary():
    """Sizes and costs of the preset, its uniform strategies, --backbones and a run's samples."""
    from stfusion_tf import summary
    from stfusion_tf.model import backbones
    nets = {name: backbones.preset(name, **cli.backbone_overrides()) for name in FLAGS.backbones}
    print(json.dumps(summary.summarize(FLAGS.preset, cli.template_config(), cli.gate_config(),
                                       FLAGS.num_classes, nets, cli.paths()[1]), indent=1))


def run_data_service():
    """A dispatcher (journal in --data_service_work_dir) and --data_service_workers workers;
    with --data_service=grpc://HOST:PORT, workers that join that dispatcher."""
    from stfusion_tf.data import service
    svc = service.serve(FLAGS.data_service_port, FLAGS.data_service_workers,
                        FLAGS.data_service_work_dir, join_target=FLAGS.data_service)
    print(f"[data_service] {svc.describe()}", flush=True)
    svc.join()


def run_aggregate():
    from stfusion_tf.analysis import aggregate
    if not FLAGS.runs:
        raise UserError("--mode=aggregate needs --runs=DIR,DIR,... (analysed model directories)")
    print(aggregate.summary_line(aggregate.aggregate(FLAGS.runs, FLAGS.aggregate_dir)))


def run(mode: str) -> None:
    """Runs ``mode`` (``all``: prepare -> train -> analyze -> export [-> generalize])."""
    from stfusion_tf import lock
    cli.check()
    if mode == "summary":
        return run_summary()
    if mode == "data_service":
        return run_data_service()
    if mode == "aggregate":
        return run_aggregate()
    data_dir, model_dir, export_dir = cli.paths()
    if mode == "verify":
        return run_verify(data_dir)
    if mode in ("prepare", "all"):
        run_prepare(data_dir)
    if mode in ("train", "all"):  # no dataset: stop before a model directory is made
        from stfusion_tf.data import records
        records.read_manifest(data_dir)
    cli.check_preset(model_dir)  # before the lock: a refused run leaves nothing behind
    with lock.for_model_dir(mode, model_dir, FLAGS.distribution, os.environ.get("TF_CONFIG")):
        if mode in ("analyze", "export", "generalize", "fidelity") and \
                cli.apply_record(model_dir, log=print) is not None:
            cli.check()
            data_dir, model_dir, export_dir = cli.paths()
        _run_modes(mode, data_dir, model_dir, export_dir)


def _run_modes(mode, data_dir, model_dir, export_dir):
    cli.compute_config().apply()  # --precision, before any network is built or loaded
    if mode in ("train", "all"):
        modes.run_train(data_dir, model_dir)
    if mode in ("analyze", "all"):
        modes.run_analyze(data_dir, model_dir)
    if mode in ("export", "all"):
        modes.run_export(data_dir, model_dir, export_dir)
    if mode == "generalize" or (mode == "all" and FLAGS.backbones):
        modes.run_generalize(data_dir, model_dir)
    if mode == "fidelity":
        modes.run_fidelity(data_dir, model_dir)


def _quiet() -> None:
    """Without --verbose: no TensorFlow C++ start-up lines (cuFFT/cuDNN/cuBLAS factory
    errors on a machine without CUDA), no INFO log lines (per shard, per checkpoint) and
    no Python deprecation chatter from imports; warnings and errors still show."""
    import warnings
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    logging.set_verbosity(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.verbose:
        _quiet()
    try:
        run(FLAGS.mode)
    except Exception as e:  # a user's mistake, a full disk, a foreign directory: one line
        message = str(e) if isinstance(e, UserError) else environment_message(e)
        if message is None or FLAGS.debug:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


def entry():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # --verbose keeps it; see _quiet
    app.run(main)


if __name__ == "__main__":
    sys.exit(entry())
