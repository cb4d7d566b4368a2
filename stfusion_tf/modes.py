"""The --mode runners that train or read a network: train, analyze, export, fidelity,
generalize.  ``main.py`` dispatches to them; like it, they turn flags (``flags.py``) into
plain arguments of the library and print one ``[mode]`` line each.
"""
from __future__ import annotations

import dataclasses
import os
import sys

from absl import logging

from stfusion_tf import flags as cli
from stfusion_tf.errors import UserError

FLAGS = cli.FLAGS


def say(message: str) -> None:
    """The library's ``log``: a ``[step] ...`` line (a damaged checkpoint, unreadable
    videos, an overridden flag) always reaches the console (stderr); anything else is an
    INFO line, shown with --verbose."""
    if message.startswith("["):
        print(message, file=sys.stderr, flush=True)
    else:
        logging.info(message)


def _train(model_fn, run_dir, data_dir, train_cfg, eval_split, model_file="template.keras",
           init_fn=None, quiet=False):
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
                          eval_split=eval_split,
                          verbose=0 if quiet and not FLAGS.verbose else FLAGS.progress,
                          log=say,
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
    from stfusion_tf import compute, saved_template
    from stfusion_tf.data import records
    from stfusion_tf.model import backbones
    from stfusion_tf.model import template as tpl
    try:
        model = saved_template.load_template(model_dir)
    except saved_template.DamagedModelFile as e:
        manifest = records.read_manifest(data_dir)
        model = _template_fn(manifest["num_classes"], records.split_size(manifest, "train"), False)
        model = saved_template.rebuild_from_checkpoint(model, model_dir, str(e), log=print)
    compute.set_memory_efficient(model, FLAGS.memory_efficient)
    want = tpl.network_positions(cli.template_config())
    if tuple(getattr(model, "positions", want)) != want:
        raise UserError(f"the template in {model_dir} is not a --preset={FLAGS.preset} network "
                        f"(positions {model.positions[0]} ... {model.positions[-1]}); drop --preset")
    icfg = cli.input_config()
    backbones.check_geometry(model, (icfg.model_frames, icfg.crop_size, icfg.crop_size),
                             f"the template in {model_dir}")
    return model


def run_analyze(data_dir, model_dir):
    from stfusion_tf.analysis import report
    model = _load_template(data_dir, model_dir)
    result = report.analyze(model, data_dir, model_dir, cli.input_config(), cli.analysis_config(),
                            log=say, jit_compile=FLAGS.jit_compile)
    comp = ", ".join(f"{k} {100 * v['video_top1']:.1f}" for k, v in result["comparison"].items())
    moved = result["drop_rate_movement"]
    print(f"[analyze] {model_dir}/analysis/report.md; drop rates moved: {moved['moved']}/"
          f"{moved['gates']}; Opt {result['opt']['code']}; video top-1 on {FLAGS.report_split} "
          f"({result['report_protocol']['label']}): {comp}")


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

    positions = tpl.network_positions(cli.template_config())
    ranked = recalibrated = None
    if FLAGS.fidelity_pool == "uniform" or FLAGS.recalibrate_batches > 0:
        from stfusion_tf.analysis import report
        ranked, recalibrated = report.fidelity_scoring(
            _load_template(data_dir, model_dir), data_dir, model_dir, cli.input_config(),
            cli.analysis_config(), FLAGS.fidelity_pool, FLAGS.recalibrate_batches > 0,
            FLAGS.jit_compile, log=say)
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
    labels = records.read_manifest(data_dir)["label_map"]
    icfg = cli.input_config()
    say = lambda m: print(f"[export] {m}")  # noqa: E731
    if FLAGS.export_model:
        name, network = export.network_name(FLAGS.export_model), export.load_network(
            FLAGS.export_model)
        paths = [export.export_network(network, name, labels, export_dir, icfg.eval_short_side,
                                       crop_size=icfg.eval_crop)]
    else:
        name, network, paths = export.export_run(_load_template(data_dir, model_dir), model_dir,
                                                 FLAGS.strategy, labels, export_dir,
                                                 icfg.eval_short_side, icfg.eval_crop, log=say)
    if FLAGS.tflite:
        paths.append(export.export_tflite(network, name, labels, export_dir, icfg.crop_size,
                                          log=say))
    print("\n".join(f"[export] {p}" for p in paths))


def _backbone_init(cfg):
    from stfusion_tf.model import inflation
    return inflation.backbone_init(cfg, FLAGS.inflate_weights, FLAGS.init_weights,
                                   FLAGS.inflate_branches, log=logging.warning)


SEARCHED_WITH = "searched_with.json"


def searched_weight_term(run_dir: str, default: str) -> str:
    """The weight term a searched template in ``run_dir`` was trained with: its
    ``analysis/searched_with.json``, else ``default`` (runs made before the file existed
    were trained with the run's own --weight_term)."""
    from stfusion_tf import files
    try:
        return files.read_json(os.path.join(run_dir, "analysis", SEARCHED_WITH))["weight_term"]
    except (OSError, ValueError, KeyError, TypeError):
        return default


def _searched(name, data_dir, model_dir) -> str:
    """The analysis directory of backbone ``name``'s own v-DropPath template: from
    --searched_runs, else trained and analysed under <model_dir>/searched/<name> with this
    run's recipe, data and seed (reused when complete; re-trained when damaged).  It starts
    from scratch even under --init_weights (the stand-alone networks are inflated)."""
    from stfusion_tf import files, saved_template
    from stfusion_tf.analysis import report
    from stfusion_tf.model import backbones
    from stfusion_tf.model import template as tpl
    from stfusion_tf.model.strategy import FusionStrategy
    given = dict(s.split("=", 1) for s in FLAGS.searched_runs if "=" in s)
    run_dir = given.get(name) or os.path.join(model_dir, "searched", name)
    opt = os.path.join(run_dir, "analysis", "opt_strategy.json")
    want = cli.gate_config(searched=True).weight_term
    try:
        FusionStrategy.load(opt)
        got = searched_weight_term(run_dir, FLAGS.weight_term)
        if name in given or got == want:
            return os.path.dirname(opt)
        kept = f"{run_dir}.weight_term-{got}"
        while os.path.exists(kept):
            kept += "+"
        os.replace(run_dir, kept)
        print(f"[generalize] {run_dir} was searched with --weight_term={got}, not {want}: "
              f"searched again (the old search kept in {kept})", flush=True)
    except UserError as e:
        if name in given:
            raise UserError(f"--searched_runs: {e}; make it with python -m stfusion_tf.main "
                            f"--mode=all --preset={name} --backbones= --model_dir={run_dir}") from None
        if os.path.exists(opt):
            print(f"[generalize] {opt} is damaged: the {name} template is analysed again")
    # The backbone's own layout and clip, as --mode=generalize trains it stand-alone.
    config = backbones.template_preset(name, **cli.backbone_overrides())
    print(f"[generalize] searching {name}: v-DropPath template in {run_dir}", flush=True)

    def model_fn(num_classes, num_train, sync):
        return tpl.build_template(config, num_classes, cli.gate_config(num_train, searched=True),
                                  synchronized_bn=sync)
    _train(model_fn, run_dir, data_dir, cli.train_config(), FLAGS.selection_split, quiet=True)
    try:
        model = saved_template.load_template(run_dir)
    except saved_template.DamagedModelFile as e:
        model = saved_template.rebuild_from_checkpoint(model_fn(*_sizes(data_dir), False),
                                                       run_dir, str(e), log=print)
    result = report.analyze(model, data_dir, run_dir, cli.input_config(), cli.analysis_config(),
                            log=say, jit_compile=FLAGS.jit_compile)
    files.write_json(os.path.join(run_dir, "analysis", SEARCHED_WITH), {"weight_term": want})
    print(f"[generalize] searched {name}: Opt {result['opt']['code']}", flush=True)
    return os.path.dirname(opt)


def _sizes(data_dir):
    from stfusion_tf.data import records
    manifest = records.read_manifest(data_dir)
    return manifest["num_classes"], records.split_size(manifest, "train")


def run_generalize(data_dir, model_dir):
    from stfusion_tf import training
    from stfusion_tf.analysis import generalization
    from stfusion_tf.model import backbones, fusion_rules
    if not FLAGS.backbones:
        raise UserError("--mode=generalize needs --backbones; valid backbones: "
                        f"{', '.join(backbones.PRESETS)}")
    family = fusion_rules.family(FLAGS.dataset, FLAGS.fusion_family)

    def plan(specs, searched=None):
        try:
            return generalization.plan(FLAGS.backbones, specs, family,
                                       os.path.join(model_dir, "analysis"), FLAGS.generalize_seeds,
                                       searched=searched, **cli.backbone_overrides())
        except UserError as e:
            raise UserError(f"--backbone_strategies: {e}") from None
    # Every other spec is checked before the searched templates take their training time.
    plan([s for s in FLAGS.backbone_strategies if s != "searched"])
    searched = {name: _searched(name, data_dir, model_dir) for name in FLAGS.backbones
                if "searched" in FLAGS.backbone_strategies}
    runs = plan(FLAGS.backbone_strategies, searched)
    base = training.standalone(cli.train_config(), FLAGS.generalize_epochs or FLAGS.epochs)

    def train_one(cfg, strategy, run_dir, seed):
        def model_fn(num_classes, num_train, sync):
            return backbones.build_backbone(cfg, strategy, num_classes, synchronized_bn=sync)
        return _train(model_fn, run_dir, data_dir, dataclasses.replace(base, seed=base.seed + seed),
                      FLAGS.report_split, model_file="model.keras", init_fn=_backbone_init(cfg),
                      quiet=True)

    table = generalization.run(model_dir, runs, train_one, log=print)
    print(f"[generalize] {model_dir}/analysis/generalization.md: {len(table['results'])} networks")
