"""Command-line entry point: ``python -m stfusion_tf.main --flagfile=configs/<x>.flags``.

Modes: ``prepare`` (write the dataset's TFRecord shards; converts Kinetics-400,
Something-Something V1/V2, UCF101 or a folder of videos from ``--source_dir``),
``data_service`` (run a tf.data service dispatcher and workers), ``train`` (warm-up
then v-DropPath training of the template), ``analyze`` (marginals, strategy
ranking, Opt, report), ``export`` (SavedModels), ``all`` (the four in order, then
``generalize`` when ``--backbones`` is set), ``generalize`` (train 3D backbones
with fusion strategies taken from the template, the paper's rules and uniform
units: the paper's Table 6), ``fidelity`` (train ranked strategies stand-alone to
check the ranking), ``summary`` (parameter counts of a preset and backbones) and
``verify`` (check every shard against the manifest, repair the damaged ones).

This module is the mode switch; the flags and their configs live in
``flags.py``.  ``analyze``, ``export``, ``generalize`` and ``fidelity`` take the
run's settings from ``<model_dir>/run.json``, so ``--model_dir`` is enough; one
run at a time holds a model directory (``lock.py``).  TensorFlow is imported
inside the modes on purpose: a bad flag is reported before it loads.
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
            return convert.prepare(
                FLAGS.dataset, FLAGS.source_dir, data_dir, short_side=FLAGS.short_side,
                clips_per_shard=FLAGS.clips_per_shard, workers=FLAGS.prepare_workers,
                max_frames=FLAGS.max_frames, ucf_split=int(FLAGS.ucf_split),
                annotations=FLAGS.annotations, holdout_fraction=FLAGS.holdout_fraction,
                keep_frozen=FLAGS.keep_frozen_videos)
        manifest = synthetic.prepare_synthetic(data_dir, synthetic.SyntheticSpec(
            name=FLAGS.dataset, num_classes=FLAGS.synthetic_classes,
            num_train=FLAGS.synthetic_train, num_val=FLAGS.synthetic_val,
            num_test=FLAGS.synthetic_test, num_frames=FLAGS.synthetic_frames,
            size=FLAGS.synthetic_size, seed=FLAGS.data_seed), log=logging.info)
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
    from stfusion_tf import training
    cli.write_record(model_dir, data_dir)
    try:
        summary = _train(_template_fn, model_dir, data_dir, cli.train_config(),
                         FLAGS.selection_split, init_fn=_template_init())
    except (training.NonFiniteLossError, training.WorkerLostError) as e:
        print(f"[train] stopped: {e}", file=sys.stderr)
        sys.exit(3 if isinstance(e, training.NonFiniteLossError) else 4)
    print(f"[train] {model_dir}: {summary['steps']} steps; "
          f"{json.dumps(summary.get('eval', {}))}")


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
    want = (icfg.model_frames, icfg.crop_size, icfg.crop_size)
    have = backbones.input_geometry(model)[:3]
    if have != want:
        raise UserError(f"the template in {model_dir} takes {'x'.join(map(str, have))} clips; "
                        f"--num_frames/--crop_size/--temporal_pool give {'x'.join(map(str, want))}; "
                        "drop those flags to use the run's own geometry")
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


def run_fidelity(data_dir, model_dir):
    from stfusion_tf.analysis import fidelity
    from stfusion_tf.model import gates as gates_lib
    from stfusion_tf.model import template as tpl
    from stfusion_tf import training
    train_cfg = training.standalone(cli.train_config(), FLAGS.epochs)  # gates stay off

    def train_one(strategy, run_dir):
        def model_fn(num_classes, num_train, sync):
            model = _template_fn(num_classes, num_train, sync)
            gates = tpl.TemplateGates(model)
            gates.set_strategy(strategy)  # the strategy's masks hold in training too
            gates_lib.set_inference_mode(gates.s + gates.t, "mask")
            return model
        return _train(model_fn, run_dir, data_dir, train_cfg, FLAGS.selection_split,
                      init_fn=_template_init(strategy))

    positions = tpl.template_positions(cli.template_config())
    rep = fidelity.run(model_dir, positions, FLAGS.fidelity_strategies, train_one)
    print(f"[fidelity] {model_dir}/analysis/fidelity.md over {rep['num_strategies']} strategies: "
          f"{rep['verdict']}")


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
        name, network = cli.export_network_name(FLAGS.export_model), \
            export.load_network(FLAGS.export_model)
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


def _backbone_overrides():
    return {"num_frames": cli.input_config().model_frames, "crop_size": FLAGS.crop_size,
            "temporal_stride": FLAGS.backbone_temporal_stride, "dropout": FLAGS.dropout}


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
    family = (fusion_rules.DATASET_FAMILY[FLAGS.dataset] if FLAGS.fusion_family == "auto"
              else FLAGS.fusion_family)
    try:
        runs = generalization.plan(FLAGS.backbones, FLAGS.backbone_strategies, family,
                                   os.path.join(model_dir, "analysis"), FLAGS.generalize_seeds,
                                   **_backbone_overrides())
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
    out = summary.template_summary(FLAGS.preset, cli.template_config(), cli.gate_config(),
                                   FLAGS.num_classes)
    out["backbones"] = [summary.backbone_summary(
        name, backbones.preset(name, **_backbone_overrides()), FLAGS.num_classes)
        for name in FLAGS.backbones]
    model_dir = cli.paths()[1]
    sampled = summary.sampled_strategies(os.path.join(model_dir, "analysis"))
    if sampled is not None:
        out["sampled_strategies"] = {"model_dir": model_dir, "strategies": sampled}
    print(json.dumps(out, indent=1))


def run_data_service():
    """A dispatcher (journal in --data_service_work_dir) and --data_service_workers workers;
    with --data_service=grpc://HOST:PORT, workers that join that dispatcher."""
    from stfusion_tf.data import service
    if not FLAGS.data_service and FLAGS.data_service_port < 1:
        raise UserError("--data_service_port must be a port number >= 1")
    svc = service.serve(FLAGS.data_service_port, FLAGS.data_service_workers,
                        FLAGS.data_service_work_dir, join_target=FLAGS.data_service)
    print(f"[data_service] {svc.describe()}", flush=True)
    svc.join()


def run_aggregate():
    from stfusion_tf.analysis import aggregate
    if not FLAGS.runs:
        raise UserError("--mode=aggregate needs --runs=DIR,DIR,... (analysed model directories)")
    out = FLAGS.aggregate_dir or os.path.join(os.path.dirname(FLAGS.runs[0].rstrip("/")), "aggregate")
    r = aggregate.aggregate(FLAGS.runs, out)
    tu = r["temporal_use"]["T_use"]
    print(f"[aggregate] {out}/aggregate.md: {len(FLAGS.runs)} runs; T-branch use "
          f"{tu[0]:.3f} ± {tu[1]:.3f}; consensus Opt {r['consensus']['code']}")


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
