"""Command-line entry point: ``python -m stfusion_tf.main --flagfile=configs/<x>.flags``.

This module is the mode switch (``--mode``; ``flags.MODES``, the README lists what each
does); the flags and their configs live in ``flags.py``.  ``analyze``, ``export``,
``generalize`` and ``fidelity`` take the run's settings from ``<model_dir>/run.json``,
so ``--model_dir`` is enough; one run at a time holds a model directory (``lock.py``).
TensorFlow is imported inside the modes on purpose: a bad flag is reported before it
loads.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from absl import app, logging

from stfusion_tf import flags as cli
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
        manifest = synthetic.prepare_synthetic(data_dir, cli.synthetic_spec(), log=logging.info)
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


def _train(model_fn, run_dir, data_dir, train_cfg, eval_split, model_file="template.keras",
           init_fn=None):
    """Builds ``model_fn(num_classes, num_train, synchronized_bn)`` in the distribution's
    scope and trains it in ``run_dir`` (``init_fn``: initial weights of a fresh run)."""
    from stfusion_tf import distribution as dist_lib
    from stfusion_tf import training
    from stfusion_tf.data import records
    manifest = records.read_manifest(data_dir)
    distribution = dist_lib.make_distribution(FLAGS.distribution, FLAGS.tpu)
    with distribution.scope():
        model = model_fn(manifest["num_classes"], records.split_size(manifest, "train"),
                         distribution.num_replicas_in_sync > 1)
    return training.train(model, run_dir, data_dir, cli.input_config(), train_cfg, distribution,
                          eval_split=eval_split, verbose=FLAGS.verbose, log=logging.info,
                          data_service=FLAGS.data_service, model_file=model_file,
                          init_fn=init_fn, compute=cli.compute_config())


def _template_fn(num_classes, num_train, sync):
    from stfusion_tf.model import template as tpl
    return tpl.build_template(cli.template_config(), num_classes, cli.gate_config(num_train),
                              synchronized_bn=sync)


def _template_init(strategy=None):
    """``--init_weights`` for a template (running ``strategy``'s masks); None: scratch."""
    if FLAGS.init_weights == "none":
        return None
    from stfusion_tf.model import inflation
    return lambda model: inflation.initialize_template(model, FLAGS.init_weights,
                                                       FLAGS.inflate_branches, strategy)


def run_train(data_dir, model_dir):
    from stfusion_tf import lock, training
    if lock.is_chief(FLAGS.distribution, os.environ.get("TF_CONFIG")):
        cli.write_record(model_dir, data_dir)
    try:
        summary = _train(_template_fn, model_dir, data_dir, cli.train_config(),
                         FLAGS.selection_split, init_fn=_template_init())
    except (training.NonFiniteLossError, training.WorkerLostError) as e:
        print(f"[train] stopped: {e}", file=sys.stderr)
        sys.exit(3 if isinstance(e, training.NonFiniteLossError) else 4)
    print(f"[train] {model_dir}: {summary['steps']} steps; " + "; ".join(
        f"{split}: video top-1 {100 * r['video_top1']:.1f}, clip top-1 {100 * r['clip_top1']:.1f} "
        f"({r['protocol']['label']})" for split, r in summary.get("eval", {}).items()))


def _load_template(data_dir, model_dir):
    """The trained template (--precision, --memory_efficient), checked against the input
    geometry the flags give; a damaged ``template.keras`` is rebuilt from its last checkpoint."""
    from stfusion_tf import compute, training
    from stfusion_tf.data import records
    from stfusion_tf.model import backbones
    try:
        model = training.load_template(model_dir)
    except training.DamagedModelFile as e:
        manifest = records.read_manifest(data_dir)
        model = _template_fn(manifest["num_classes"], records.split_size(manifest, "train"), False)
        model = training.rebuild_from_checkpoint(model, model_dir, str(e), log=print)
    compute.set_memory_efficient(model, FLAGS.memory_efficient)
    icfg = cli.input_config()
    backbones.check_geometry(model, (icfg.model_frames, icfg.crop_size, icfg.crop_size),
                             f"the template in {model_dir}")
    return model


def run_analyze(data_dir, model_dir):
    from stfusion_tf.analysis import report
    model = _load_template(data_dir, model_dir)
    result = report.analyze(model, data_dir, model_dir, cli.input_config(), cli.analysis_config(),
                            log=logging.info, jit_compile=FLAGS.jit_compile)
    comp = ", ".join(f"{k} {100 * v['video_top1']:.1f}" for k, v in result["comparison"].items())
    moved = result["drop_rate_movement"]
    print(f"[analyze] {model_dir}/analysis/report.md; drop rates moved: {moved['moved']}/"
          f"{moved['gates']}; Opt {result['opt']['code']}; video top-1 on {FLAGS.report_split} "
          f"({result['report_protocol']['label']}): {comp}")


def _fidelity_scoring(data_dir, model_dir):
    """(the uniform pool's ranking or None, a BN re-calibrated scorer or None): what
    --fidelity_pool and --recalibrate_batches ask of the trained template."""
    if FLAGS.fidelity_pool == "learned" and FLAGS.recalibrate_batches == 0:
        return None, None
    from stfusion_tf.analysis import report
    from stfusion_tf.model.template import TemplateGates
    model, acfg, icfg = _load_template(data_dir, model_dir), cli.analysis_config(), cli.input_config()
    ranked = recalibrated = None
    if FLAGS.fidelity_pool == "uniform":
        ranked = report.uniform_ranking(model, data_dir, model_dir, icfg, acfg, log=logging.info,
                                        jit_compile=FLAGS.jit_compile)
    if FLAGS.recalibrate_batches > 0:
        scorer = report.selection_scorer(model, TemplateGates(model), data_dir, icfg, acfg,
                                         FLAGS.jit_compile, recalibrate=True)

        def recalibrated(strategy):
            return scorer.score(strategy)["video_top1"]
    return ranked, recalibrated


def run_fidelity(data_dir, model_dir):
    from stfusion_tf.analysis import fidelity
    from stfusion_tf.model import template as tpl
    from stfusion_tf import training
    train_cfg = training.standalone(cli.train_config(), FLAGS.epochs)  # gates stay off

    def train_one(strategy, run_dir):
        def model_fn(num_classes, num_train, sync):
            model = _template_fn(num_classes, num_train, sync)
            tpl.TemplateGates(model).hold(strategy)
            return model
        return _train(model_fn, run_dir, data_dir, train_cfg, FLAGS.selection_split,
                      init_fn=_template_init(strategy))

    positions = tpl.template_positions(cli.template_config())
    ranked, recalibrated = _fidelity_scoring(data_dir, model_dir)
    rep = fidelity.run(model_dir, positions, FLAGS.fidelity_strategies, train_one,
                       pool=FLAGS.fidelity_pool, ranked=ranked, recalibrated_fn=recalibrated)
    line = (f"[fidelity] {model_dir}/analysis/{fidelity.report_name(FLAGS.fidelity_pool)}.md "
            f"over {rep['num_strategies']} strategies: {rep['verdict']}")
    if "recalibrated" in rep:
        tau = rep["recalibrated"]["kendall_tau"]
        line += f" BN re-calibrated: Kendall τ = {'undefined' if tau is None else f'{tau:.3f}'}."
    print(line)


def run_export(data_dir, model_dir, export_dir):
    """SavedModels of the probability space and the --strategy classifier (or of the
    --export_model network alone); with --tflite the classifier in TFLite too."""
    from stfusion_tf import export
    from stfusion_tf.data import records
    from stfusion_tf.model.template import TemplateGates
    labels = records.read_manifest(data_dir)["label_map"]
    icfg = cli.input_config()
    say = lambda m: print(f"[export] {m}")  # noqa: E731
    if FLAGS.export_model:
        name, network = export.network_name(FLAGS.export_model), export.load_network(
            FLAGS.export_model)
        paths = [export.export_network(network, name, labels, export_dir, icfg.eval_short_side,
                                       crop_size=icfg.eval_crop)]
    else:
        model = _load_template(data_dir, model_dir)
        name, strategy = export.resolve_strategy(FLAGS.strategy, model_dir,
                                                 TemplateGates(model).positions)
        network = export.classifier_network(model, strategy)
        paths = [export.export_probability_space(model, export_dir),
                 export.export_classifier(model, strategy, name, labels, export_dir,
                                          icfg.eval_short_side, icfg.eval_crop, log=say)]
    if FLAGS.tflite:
        paths.append(export.export_tflite(network, name, labels, export_dir, icfg.crop_size,
                                          log=say))
    print("\n".join(f"[export] {p}" for p in paths))


def _backbone_init(cfg):
    from stfusion_tf.model import inflation
    return inflation.backbone_init(cfg, FLAGS.inflate_weights, FLAGS.init_weights,
                                   FLAGS.inflate_branches, log=logging.warning)


def run_generalize(data_dir, model_dir):
    from stfusion_tf import training
    from stfusion_tf.analysis import generalization
    from stfusion_tf.model import backbones, fusion_rules
    if not FLAGS.backbones:
        raise UserError("--mode=generalize needs --backbones; valid backbones: "
                        f"{', '.join(backbones.PRESETS)}")
    family = fusion_rules.family(FLAGS.dataset, FLAGS.fusion_family)
    try:
        runs = generalization.plan(FLAGS.backbones, FLAGS.backbone_strategies, family,
                                   os.path.join(model_dir, "analysis"), FLAGS.generalize_seeds,
                                   **cli.backbone_overrides())
    except UserError as e:
        raise UserError(f"--backbone_strategies: {e}") from None
    base = training.standalone(cli.train_config(), FLAGS.generalize_epochs or FLAGS.epochs)

    def train_one(cfg, strategy, run_dir, seed):
        def model_fn(num_classes, num_train, sync):
            return backbones.build_backbone(cfg, strategy, num_classes, synchronized_bn=sync)
        return _train(model_fn, run_dir, data_dir, dataclasses.replace(base, seed=base.seed + seed),
                      FLAGS.report_split, model_file="model.keras", init_fn=_backbone_init(cfg))

    table = generalization.run(model_dir, runs, train_one, log=logging.info)
    print(f"[generalize] {model_dir}/analysis/generalization.md: {len(table['results'])} networks")


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
    with lock.for_model_dir(mode, model_dir, FLAGS.distribution, os.environ.get("TF_CONFIG")):
        cli.check_preset(model_dir)
        if mode in ("analyze", "export", "generalize", "fidelity") and \
                cli.apply_record(model_dir, log=print) is not None:
            cli.check()
            data_dir, model_dir, export_dir = cli.paths()
        _run_modes(mode, data_dir, model_dir, export_dir)


def _run_modes(mode, data_dir, model_dir, export_dir):
    cli.compute_config().apply()  # --precision, before any network is built or loaded
    if mode in ("train", "all"):
        run_train(data_dir, model_dir)
    if mode in ("analyze", "all"):
        run_analyze(data_dir, model_dir)
    if mode in ("export", "all"):
        run_export(data_dir, model_dir, export_dir)
    if mode == "generalize" or (mode == "all" and FLAGS.backbones):
        run_generalize(data_dir, model_dir)
    if mode == "fidelity":
        run_fidelity(data_dir, model_dir)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
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
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    app.run(main)


if __name__ == "__main__":
    sys.exit(entry())
