"""Command-line entry point: ``python -m stfusion_tf.main --flagfile=configs/<x>.flags``.

Modes: ``prepare`` (write the dataset's TFRecord shards; converts Kinetics-400,
Something-Something V1/V2, UCF101 or a folder of videos from ``--source_dir``),
``data_service`` (run a tf.data service dispatcher and workers), ``train`` (warm-up
then v-DropPath training of the template), ``analyze`` (marginals, strategy
ranking, Opt, report), ``export`` (SavedModels), ``all`` (the four in order) and
``generalize`` (train 3D backbones with fusion strategies taken from the template,
the paper's rules and uniform units, and tabulate them as the paper's Table 6),
``fidelity`` (train ranked strategies stand-alone to check the ranking) and
``summary`` (build a template preset or backbones and print parameter counts).  This is
the only module that reads absl flags; everything it calls takes plain
arguments or frozen dataclasses.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags, logging

MODES = ("prepare", "train", "analyze", "export", "generalize", "all", "fidelity", "summary",
         "data_service")
SYNTHETIC = ("synthetic_motion", "synthetic_appearance")
REAL = ("kinetics400", "ssv1", "ssv2", "ucf101", "folder")
DATASETS = SYNTHETIC + REAL
PRESETS = ("tiny", "small", "densenet121")

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", "all", MODES, "What to run.")
flags.DEFINE_enum("dataset", "synthetic_motion", DATASETS, "Dataset to prepare / train on.")
flags.DEFINE_string("data_dir", None, "Dataset directory (shards + manifest.json); local path or "
                    "http(s)/s3 URL. Default: tfrecords/<dataset>.")
flags.DEFINE_string("model_dir", None, "Where checkpoints, TensorBoard logs, the trained template "
                    "and the analysis go. Default: runs/<dataset>.")
flags.DEFINE_string("export_dir", None, "SavedModel root. Default: <model_dir>/export.")
# Real datasets (--mode=prepare converts them from their official layout).
flags.DEFINE_string("source_dir", None, "Root of the raw dataset in its official layout "
                    "(see stfusion_tf/data/convert.py); needed to prepare a real dataset.")
flags.DEFINE_list("annotations", [], "Kinetics-400 annotation CSVs (default: "
                  "<source_dir>/annotations/{train,validate}.csv).")
flags.DEFINE_enum("ucf_split", "1", ["1", "2", "3"], "UCF101 train/test split.")
flags.DEFINE_integer("short_side", 256, "Stored frames are resized to this short side.", lower_bound=8)
flags.DEFINE_integer("clips_per_shard", 256, "Clips per TFRecord shard.", lower_bound=1)
flags.DEFINE_integer("prepare_workers", None, "Decoding processes (default: 2 or the core count).")
flags.DEFINE_float("holdout_fraction", 0.0, "Fraction of the training videos moved into a "
                   "'holdout' split (strategy selection) when a dataset has no spare split.")
flags.DEFINE_integer("max_frames", 0, "Keep at most this many frames per video (0: all).", lower_bound=0)
# Synthetic data.
flags.DEFINE_integer("synthetic_classes", 4, "Classes of a synthetic dataset.", lower_bound=2)
flags.DEFINE_integer("synthetic_train", 256, "Training clips of a synthetic dataset.", lower_bound=1)
flags.DEFINE_integer("synthetic_val", 64, "Selection (val) clips of a synthetic dataset.", lower_bound=1)
flags.DEFINE_integer("synthetic_test", 64, "Reporting (test) clips of a synthetic dataset.", lower_bound=1)
flags.DEFINE_integer("synthetic_frames", 16, "Frames per synthetic clip.", lower_bound=1)
flags.DEFINE_integer("synthetic_size", 40, "Frame side of synthetic clips (pixels).", lower_bound=8)
flags.DEFINE_integer("data_seed", 0, "Seed of the synthetic data.")
# Input pipeline.
flags.DEFINE_integer("num_frames", 8, "Frames per clip fed to the network.", lower_bound=1)
flags.DEFINE_integer("frame_stride", 1, "Stride between sampled frames (dense sampling).",
                     lower_bound=1)
flags.DEFINE_enum("sampling", "dense", ["dense", "segments"], "Frame sampling: dense consecutive "
                  "frames with --frame_stride, or TSN-style segments (one frame from each of "
                  "--num_frames equal segments of the video).")
flags.DEFINE_integer("crop_size", 32, "Spatial crop.", lower_bound=8)
flags.DEFINE_integer("min_short_side", 36, "Training scale jitter: smallest short side.")
flags.DEFINE_integer("max_short_side", 44, "Training scale jitter: largest short side.")
flags.DEFINE_integer("eval_short_side", 40, "Evaluation short side before the centre crop.")
flags.DEFINE_bool("flip", False, "Random horizontal flip (off for direction-sensitive data).")
flags.DEFINE_bool("temporal_pool", False, "Temporal average pooling (window 3, stride 2) of the "
                  "input clip: the supplement's low temporal resolution experiment.")
flags.DEFINE_integer("batch_size", 8, "Global batch size.", lower_bound=1)
flags.DEFINE_string("data_service", None, "grpc://HOST:PORT of a tf.data service dispatcher: "
                    "run training-input preprocessing on its workers.")
flags.DEFINE_integer("data_service_port", 5050, "--mode=data_service: dispatcher port.")
flags.DEFINE_integer("data_service_workers", 2, "--mode=data_service: workers in this process.",
                     lower_bound=1)
flags.DEFINE_integer("num_clips", 1, "Evaluation clips per video.", lower_bound=1)
flags.DEFINE_enum("num_crops", "1", ["1", "3"], "Evaluation crops per clip.")
# Model.
flags.DEFINE_enum("preset", "tiny", PRESETS, "Template network preset.")
flags.DEFINE_bool("temporal_downsample", False, "Temporally down-sampled template variant.")
flags.DEFINE_float("init_drop_rate", 0.1, "Initial drop rate of every gate.")
flags.DEFINE_float("temperature", 0.2, "RelaxedBernoulli temperature.")
flags.DEFINE_bool("rescale", False, "Divide kept activations by (1 - p).")
flags.DEFINE_enum("regularizer", "code", ["code", "paper"], "Form of the variational regulariser.")
flags.DEFINE_float("length_scale", 10.0, "Length-scale prior k of the regulariser.")
flags.DEFINE_integer("num_classes", 174, "Classes for --mode=summary.")
# Training.
flags.DEFINE_integer("epochs", 6, "Total epochs (warm-up included).", lower_bound=1)
flags.DEFINE_integer("warmup_epochs", 2, "Epochs without v-DropPath at the start.", lower_bound=0)
flags.DEFINE_float("learning_rate", 0.01, "Initial SGD learning rate.")
flags.DEFINE_list("lr_steps", [], "Epochs at which the learning rate is multiplied by 0.1.")
flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
flags.DEFINE_enum("optimizer", "sgd", ["sgd", "adam"], "SGD with momentum is the paper's; Adam "
                  "gets the tiny synthetic runs to converge within the CPU budget.")
flags.DEFINE_integer("steps_per_epoch", None, "Steps per epoch (default: clips // batch).")
flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints kept.", lower_bound=1)
flags.DEFINE_enum("distribution", "default", ["default", "mirrored", "multi_worker", "tpu"],
                  "tf.distribute strategy.")
flags.DEFINE_string("tpu", "", "TPU address for --distribution=tpu.")
flags.DEFINE_integer("seed", 0, "Training seed.")
flags.DEFINE_integer("verbose", 1, "Keras progress bar: 0 silent, 1 bar, 2 one line per epoch.")
# Analysis.
flags.DEFINE_integer("num_samples", 100, "Strategies sampled for ranking.", lower_bound=1)
flags.DEFINE_integer("sample_seed", 0, "Seed of the strategy sampler.")
flags.DEFINE_string("selection_split", "val", "Split that ranks strategies.")
flags.DEFINE_integer("recalibrate_batches", 0, "Also rank with BatchNorm statistics re-estimated "
                     "per sampled sub-network on this many training batches (0: off, as the "
                     "authors); the report compares both rankings.", lower_bound=0)
flags.DEFINE_string("report_split", "test", "Split on which Opt and uniform strategies are reported.")
flags.DEFINE_integer("fidelity_strategies", 5, "--mode=fidelity: strategies trained stand-alone.",
                     lower_bound=2)
# Backbones (--mode=generalize, --mode=summary).
flags.DEFINE_list("backbones", [], "3D backbones for --mode=generalize (also run by --mode=all "
                  "when set) and --mode=summary: resnet50, resnext50, resnext101, mobilenetv2, "
                  "densenet121, or the *_tiny versions.")
flags.DEFINE_list("backbone_strategies", ["opt", "S+ST", "S", "ST"], "Fusion strategies per "
                  "backbone: opt (from the template's analysis), paper (the paper's hand rule), "
                  "S, ST, S+ST, a unit list per stage or position, or a FusionStrategy JSON path.")
flags.DEFINE_enum("fusion_family", "auto", ["auto", "ss", "k400", "ucf"], "Dataset family of "
                  "the paper's hand rules (auto: from --dataset).")
flags.DEFINE_integer("generalize_epochs", 0, "Epochs of each --mode=generalize network (0: "
                     "--epochs); every backbone and strategy gets the same budget.", lower_bound=0)
flags.DEFINE_integer("generalize_seeds", 1, "Training runs (seeds 0..N-1) per --mode=generalize "
                     "cell; the table reports mean and standard deviation.", lower_bound=1)
flags.DEFINE_integer("backbone_temporal_stride", 1, "Temporal stride of the backbones' stem "
                     "(2 in the authors' Kinetics/UCF networks).", lower_bound=1)
flags.DEFINE_string("inflate_weights", None, "Local weights file of the keras.applications 2D "
                    "network (ResNet50, MobileNetV2, DenseNet121) to inflate into each backbone "
                    "before training; nothing is downloaded.")
# Export.
flags.DEFINE_string("strategy", "opt", "Classifier to export: 'opt' (the analysis' best sampled "
                    "strategy), 'S', 'ST', 'S+ST', or a FusionStrategy JSON path.")


def _validate():
    if FLAGS.warmup_epochs > FLAGS.epochs and FLAGS.mode in ("train", "all"):
        raise app.UsageError(f"--warmup_epochs={FLAGS.warmup_epochs} exceeds --epochs={FLAGS.epochs}")
    if not 0.0 < FLAGS.init_drop_rate < 1.0:
        raise app.UsageError(f"--init_drop_rate must be in (0, 1), got {FLAGS.init_drop_rate}")
    if FLAGS.temperature <= 0:
        raise app.UsageError(f"--temperature must be > 0, got {FLAGS.temperature}")
    if FLAGS.learning_rate <= 0:
        raise app.UsageError(f"--learning_rate must be > 0, got {FLAGS.learning_rate}")
    try:
        steps = [int(s) for s in FLAGS.lr_steps]
    except ValueError:
        raise app.UsageError(f"--lr_steps must be whole epoch numbers, got {FLAGS.lr_steps}") from None
    if steps != sorted(steps):
        raise app.UsageError(f"--lr_steps must increase, got {FLAGS.lr_steps}")
    if not FLAGS.min_short_side <= FLAGS.max_short_side:
        raise app.UsageError("--min_short_side must be <= --max_short_side")
    if min(FLAGS.min_short_side, FLAGS.eval_short_side) < FLAGS.crop_size:
        raise app.UsageError("--min_short_side and --eval_short_side must be >= --crop_size")
    if FLAGS.temporal_pool and FLAGS.num_frames < 3:
        raise app.UsageError("--temporal_pool needs --num_frames >= 3")
    if FLAGS.selection_split == FLAGS.report_split:
        raise app.UsageError("--selection_split and --report_split must differ")


def _paths():
    data_dir = FLAGS.data_dir or os.path.join("tfrecords", FLAGS.dataset)
    model_dir = FLAGS.model_dir or os.path.join("runs", FLAGS.dataset)
    export_dir = FLAGS.export_dir or os.path.join(model_dir, "export")
    return data_dir, model_dir, export_dir


def _input_cfg():
    from stfusion_tf.data.pipeline import InputConfig
    return InputConfig(num_frames=FLAGS.num_frames, stride=FLAGS.frame_stride,
                       crop_size=FLAGS.crop_size, min_short_side=FLAGS.min_short_side,
                       max_short_side=FLAGS.max_short_side, eval_short_side=FLAGS.eval_short_side,
                       flip=FLAGS.flip, num_clips=FLAGS.num_clips, num_crops=int(FLAGS.num_crops),
                       temporal_pool=FLAGS.temporal_pool, sampling=FLAGS.sampling,
                       batch_size=FLAGS.batch_size)


def _template_cfg():
    from stfusion_tf.model import template
    return template.preset(FLAGS.preset, temporal_downsample=FLAGS.temporal_downsample)


def _gate_cfg():
    from stfusion_tf.model import template
    return template.GateConfig(init_drop_rate=FLAGS.init_drop_rate, temperature=FLAGS.temperature,
                               rescale=FLAGS.rescale, regularizer=FLAGS.regularizer,
                               length_scale=FLAGS.length_scale)


def run_prepare(data_dir):
    if FLAGS.dataset in REAL:
        return _prepare_real(data_dir)
    from stfusion_tf.data import synthetic
    spec = synthetic.SyntheticSpec(
        name=FLAGS.dataset, num_classes=FLAGS.synthetic_classes, num_train=FLAGS.synthetic_train,
        num_val=FLAGS.synthetic_val, num_test=FLAGS.synthetic_test,
        num_frames=FLAGS.synthetic_frames, size=FLAGS.synthetic_size, seed=FLAGS.data_seed)
    t0 = time.time()
    manifest = synthetic.prepare_synthetic(data_dir, spec, log=logging.info)
    counts = {k: v["num_clips"] for k, v in manifest["splits"].items()}
    print(f"[prepare] {data_dir}: {counts} clips, {manifest['num_skipped']} skipped, "
          f"{time.time() - t0:.1f}s")


def _prepare_real(data_dir):
    from stfusion_tf.data import convert
    if not FLAGS.source_dir:
        raise app.UsageError(f"--dataset={FLAGS.dataset} needs --source_dir (the raw dataset)")
    try:
        listing = convert.list_dataset(FLAGS.dataset, FLAGS.source_dir, int(FLAGS.ucf_split),
                                       FLAGS.annotations)
        listing = convert.carve_holdout(listing, FLAGS.holdout_fraction)
    except (FileNotFoundError, ValueError) as e:
        raise app.UsageError(f"cannot read {FLAGS.dataset} from {FLAGS.source_dir}: {e}") from None
    manifest = convert.convert(listing, data_dir, FLAGS.dataset, short_side=FLAGS.short_side,
                               clips_per_shard=FLAGS.clips_per_shard, workers=FLAGS.prepare_workers,
                               max_frames=FLAGS.max_frames)
    if not any(s["num_clips"] for s in manifest["splits"].values()):
        raise app.UsageError(f"no clip of {FLAGS.source_dir} could be converted; "
                             f"see {data_dir}/manifest.json for the reasons")


def _train_cfg():
    from stfusion_tf import training
    return training.TrainConfig(
        epochs=FLAGS.epochs, warmup_epochs=FLAGS.warmup_epochs, learning_rate=FLAGS.learning_rate,
        lr_steps=tuple(int(s) for s in FLAGS.lr_steps), momentum=FLAGS.momentum,
        optimizer=FLAGS.optimizer,
        steps_per_epoch=FLAGS.steps_per_epoch, keep_checkpoints=FLAGS.keep_checkpoints,
        seed=FLAGS.seed)


def run_train(data_dir, model_dir):
    from stfusion_tf import training
    cfg = _train_cfg()
    try:
        summary = training.train(model_dir, data_dir, _template_cfg(), _gate_cfg(), _input_cfg(), cfg,
                                 distribution=FLAGS.distribution, tpu=FLAGS.tpu,
                                 data_service=FLAGS.data_service,
                                 eval_split=FLAGS.selection_split, verbose=FLAGS.verbose)
    except training.NonFiniteLossError as e:
        print(f"[train] stopped: {e}", file=sys.stderr)
        sys.exit(3)
    print(f"[train] {model_dir}: {summary['steps']} steps; "
          f"{json.dumps(summary.get('eval', {}))}")


def run_analyze(data_dir, model_dir):
    from stfusion_tf import training
    from stfusion_tf.analysis import report
    model = training.load_template(model_dir)
    cfg = report.AnalysisConfig(num_samples=FLAGS.num_samples, seed=FLAGS.sample_seed,
                                selection_split=FLAGS.selection_split,
                                report_split=FLAGS.report_split,
                                recalibrate_batches=FLAGS.recalibrate_batches)
    result = report.analyze(model, data_dir, model_dir, _input_cfg(), cfg, log=logging.info)
    comp = ", ".join(f"{k} {100 * v['video_top1']:.1f}" for k, v in result["comparison"].items())
    print(f"[analyze] {model_dir}/analysis/report.md; Opt {result['opt']['code']}; "
          f"video top-1 on {FLAGS.report_split}: {comp}")


def run_fidelity(data_dir, model_dir):
    from stfusion_tf import training
    from stfusion_tf.analysis import fidelity
    from stfusion_tf.model import template
    positions = template.template_positions(_template_cfg())

    def train_one(strategy, run_dir):
        return training.train(run_dir, data_dir, _template_cfg(), _gate_cfg(), _input_cfg(),
                              _train_cfg(), distribution=FLAGS.distribution, tpu=FLAGS.tpu,
                              eval_split=FLAGS.selection_split, verbose=FLAGS.verbose,
                              fixed_strategy=strategy)

    try:
        rep = fidelity.run(model_dir, positions, FLAGS.fidelity_strategies, train_one)
    except FileNotFoundError as e:
        raise app.UsageError(str(e)) from None
    print(f"[fidelity] {model_dir}/analysis/fidelity.md over {rep['num_strategies']} strategies: "
          f"{rep['verdict']}")


def _export_strategy(model_dir, positions):
    from stfusion_tf.model.strategy import UNITS, FusionStrategy
    if FLAGS.strategy == "opt":
        path = os.path.join(model_dir, "analysis", "opt_strategy.json")
        if not os.path.exists(path):
            raise app.UsageError(f"--strategy=opt needs {path}; run --mode=analyze first")
        return "opt", FusionStrategy.load(path)
    if FLAGS.strategy in UNITS[:3]:
        name = FLAGS.strategy.replace("+", "_plus_")
        return name, FusionStrategy.uniform(positions, FLAGS.strategy)
    if os.path.exists(FLAGS.strategy):
        return os.path.splitext(os.path.basename(FLAGS.strategy))[0], FusionStrategy.load(FLAGS.strategy)
    raise app.UsageError(f"--strategy={FLAGS.strategy!r}: valid values are opt, S, ST, S+ST or "
                         "the path of a FusionStrategy JSON file")


def run_export(data_dir, model_dir, export_dir):
    from stfusion_tf import export, training
    from stfusion_tf.data import records
    from stfusion_tf.model.template import TemplateGates
    model = training.load_template(model_dir)
    name, strategy = _export_strategy(model_dir, TemplateGates(model).positions)
    manifest = records.read_manifest(data_dir)
    p1 = export.export_probability_space(model, export_dir)
    p2 = export.export_classifier(model, strategy, name, manifest["label_map"], export_dir,
                                  FLAGS.eval_short_side, training.load_template_config(model_dir),
                                  log=lambda m: print(f"[export] {m}"))
    print(f"[export] {p1}\n[export] {p2}")


def _family():
    from stfusion_tf.model import fusion_rules
    if FLAGS.fusion_family != "auto":
        return FLAGS.fusion_family
    return fusion_rules.DATASET_FAMILY[FLAGS.dataset]


def _backbone_overrides():
    return {"num_frames": _input_cfg().model_frames, "crop_size": FLAGS.crop_size,
            "temporal_stride": FLAGS.backbone_temporal_stride}


def _check_backbones():
    from stfusion_tf.model import backbones
    bad = [b for b in FLAGS.backbones if b not in backbones.PRESETS]
    if bad:
        raise app.UsageError(f"--backbones: unknown {', '.join(bad)}; valid backbones: "
                             f"{', '.join(backbones.PRESETS)}")


def run_generalize(data_dir, model_dir):
    from stfusion_tf import training
    from stfusion_tf.analysis import generalization
    from stfusion_tf.model import backbones, inflation
    if not FLAGS.backbones:
        raise app.UsageError("--mode=generalize needs --backbones; valid backbones: "
                             f"{', '.join(backbones.PRESETS)}")
    try:
        runs = generalization.plan(FLAGS.backbones, FLAGS.backbone_strategies, _family(),
                                   os.path.join(model_dir, "analysis"), FLAGS.generalize_seeds,
                                   **_backbone_overrides())
    except (ValueError, FileNotFoundError) as e:
        raise app.UsageError(f"--backbone_strategies: {e}") from None

    import dataclasses
    epochs = FLAGS.generalize_epochs or FLAGS.epochs
    train_cfg = _train_cfg()
    train_cfg = dataclasses.replace(train_cfg, epochs=epochs, warmup_epochs=0,
                                    lr_steps=tuple(e for e in train_cfg.lr_steps if e < epochs))

    def train_one(cfg, strategy, run_dir, seed):
        def model_fn(num_classes, sync):
            model = backbones.build_backbone(cfg, strategy, num_classes, synchronized_bn=sync)
            if FLAGS.inflate_weights:
                inflation.inflate_from_keras(model, cfg, FLAGS.inflate_weights)
            return model
        return training.train(run_dir, data_dir, _template_cfg(), _gate_cfg(), _input_cfg(),
                              dataclasses.replace(train_cfg, seed=FLAGS.seed + seed),
                              distribution=FLAGS.distribution, tpu=FLAGS.tpu,
                              data_service=FLAGS.data_service, eval_split=FLAGS.report_split,
                              verbose=FLAGS.verbose, model_fn=model_fn, model_file="model.keras")

    table = generalization.run(model_dir, runs, train_one, log=logging.info)
    print(f"[generalize] {model_dir}/analysis/generalization.md: {len(table['results'])} networks")


def run_summary():
    import dataclasses
    import numpy as np
    from stfusion_tf.model import backbones, template
    cfg = dataclasses.replace(_template_cfg(), num_frames=_input_cfg().model_frames,
                              crop_size=FLAGS.crop_size)
    model = template.build_template(cfg, FLAGS.num_classes, _gate_cfg())
    counts = backbones.count_params(model)
    kernels = int(sum(np.prod(v.shape) for v in model.weights if v.path.endswith("kernel")))
    out = {"preset": FLAGS.preset, "input": list(model.input_shape[1:]),
           "num_classes": FLAGS.num_classes, "positions": len(template.template_positions(cfg)),
           **counts, "params_conv_fc_kernels": kernels, "backbones": []}
    for name in FLAGS.backbones:
        bcfg = backbones.preset(name, **_backbone_overrides())
        pos = backbones.positions(bcfg)
        row = {"backbone": name, "input": [bcfg.num_frames, bcfg.crop_size, bcfg.crop_size, 3],
               "positions": len(pos)}
        for unit in ("S", "ST", "S+ST"):
            net = backbones.build_backbone(bcfg, backbones.FusionStrategy.uniform(pos, unit),
                                           FLAGS.num_classes)
            row[f"params_{unit}"] = backbones.count_params(net)["params_trainable"]
        out["backbones"].append(row)
    print(json.dumps(out, indent=1))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    _validate()
    _check_backbones()
    data_dir, model_dir, export_dir = _paths()
    mode = FLAGS.mode
    if mode == "summary":
        return run_summary()
    if mode == "data_service":
        from stfusion_tf.data import service
        if FLAGS.data_service_port < 1:
            raise app.UsageError("--data_service_port must be a port number >= 1")
        svc = service.start(FLAGS.data_service_port, FLAGS.data_service_workers)
        print(f"[data_service] dispatcher at {svc.target} with {FLAGS.data_service_workers} workers; "
              f"train with --data_service={svc.target}", flush=True)
        svc.join()
        return 0
    if FLAGS.data_service and not FLAGS.data_service.startswith("grpc://"):
        raise app.UsageError(f"--data_service={FLAGS.data_service!r} must look like grpc://HOST:PORT")
    if mode in ("prepare", "all"):
        run_prepare(data_dir)
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
    return 0


def run():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    app.run(main)


if __name__ == "__main__":
    sys.exit(run())
