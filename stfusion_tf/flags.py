"""Command-line flags, grouped by the config they build, and their resolution
against a run's record.

Each group's flags map one-to-one onto the fields of a library config
dataclass (``InputConfig``, ``GateConfig``, ``TrainConfig``, ``AnalysisConfig``,
``ComputeConfig``);
the configs check themselves, once, and a failed check comes back here to be
reported with flag names.  Only this module and ``main`` read absl flags.

The library is imported inside the builders, not here: absl checks a flag's
value before TensorFlow loads.  For the same reason the choice lists below are
written out; ``tests/test_main.py`` fails when one differs from the library's.
"""

from __future__ import annotations

import dataclasses
import os
import re

from absl import flags

from stfusion_tf.errors import UserError

FLAGS = flags.FLAGS
MODES = ("prepare", "train", "analyze", "export", "generalize", "all", "fidelity", "summary",
         "data_service", "aggregate", "verify")
SYNTHETIC = ("synthetic_motion", "synthetic_appearance",  # data.synthetic.DATASETS
             "synthetic_fine_motion")
LAYOUTS = ("kinetics400", "ssv1", "ssv2", "ucf101", "folder")  # data.convert.LAYOUTS
DATASETS = SYNTHETIC + LAYOUTS
# model.template.preset_names(): the template presets, then every backbone preset.
PRESETS = ("densenet121", "small", "tiny", "resnet50", "resnext50", "resnext101", "mobilenetv2",
           "resnet_tiny", "resnext_tiny", "mobilenetv2_tiny", "densenet_tiny")
SAMPLINGS = ("dense", "segments")  # data.pipeline.SAMPLINGS
FIDELITY_POOLS = ("learned", "uniform")  # analysis.fidelity.POOLS
NUM_CROPS = ("1", "3")  # data.pipeline.NUM_CROPS
EVAL_PROTOCOLS = ("authors", "paper", "10x3", "custom")  # data.pipeline.EVAL_PROTOCOLS
SELECTION_PROTOCOLS = ("same", "authors", "paper", "10x3")  # analysis.report.SELECTION_PROTOCOLS
BRANCH_INITS = ("split", "copy")  # model.inflation.BRANCH_INITS
REGULARIZERS = ("code", "paper")  # model.gates.REGULARIZERS
WEIGHT_TERMS = ("norm", "prior", "compute")  # model.gates.WEIGHT_TERMS
OPTIMIZERS = ("sgd", "adam")  # training.OPTIMIZERS
GATE_OPTIMIZERS = ("shared", "adam", "sgd")  # training.GATE_OPTIMIZERS
DISTRIBUTIONS = ("default", "mirrored", "multi_worker", "tpu")  # distribution.DISTRIBUTIONS
FAMILIES = ("ss", "k400", "ucf")  # model.fusion_rules.FAMILIES
REPAIRS = ("auto", "source", "drop", "none")  # data.verify.REPAIRS
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")  # compute.PRECISIONS
JIT_COMPILE = ("auto", "true", "false")  # compute.JIT_COMPILE

# -- what to run, where --------------------------------------------------------------------
flags.DEFINE_enum("mode", "all", MODES, "What to run.")
flags.DEFINE_enum("dataset", "synthetic_motion", DATASETS, "Dataset to prepare / train on.")
flags.DEFINE_string("data_dir", None, "Dataset directory (shards + manifest.json); local path or "
                    "http(s)/s3 URL. Default: tfrecords/<dataset>.")
flags.DEFINE_string("model_dir", None, "Where checkpoints, TensorBoard logs, the run record, the "
                    "trained template and the analysis go. Default: runs/<dataset>.")
flags.DEFINE_string("export_dir", None, "SavedModel root. Default: <model_dir>/export.")
flags.DEFINE_integer("progress", 1, "Keras progress bar: 0 silent, 1 bar, 2 one line per epoch.")
flags.DEFINE_bool("verbose", False, "Also print TensorFlow's and the library's log lines (C++ "
                  "start-up messages, INFO lines per shard and checkpoint); off: the [mode] lines, "
                  "progress bars, warnings and errors only.")
flags.DEFINE_bool("debug", False, "Show the traceback of a user error (missing data, bad flag).")
# -- preparing a dataset (--mode=prepare) ----------------------------------------------------
flags.DEFINE_string("source_dir", None, "Root of the raw dataset in its official layout "
                    "(see stfusion_tf/data/convert.py); needed to prepare a real dataset.")
flags.DEFINE_list("annotations", [], "Kinetics-400 annotation CSVs (default: "
                  "<source_dir>/annotations/{train,validate}.csv).")
flags.DEFINE_enum("ucf_split", "1", ["1", "2", "3"], "UCF101 train/test split.")
flags.DEFINE_integer("short_side", 256, "Stored frames are resized to this short side.",
                     lower_bound=8)
flags.DEFINE_integer("clips_per_shard", 256, "Clips per TFRecord shard.", lower_bound=1)
flags.DEFINE_integer("prepare_workers", None, "Decoding processes (default: 2 or the core count).")
flags.DEFINE_float("holdout_fraction", 0.0, "Fraction of the training videos moved into a "
                   "'holdout' split (strategy selection) when a dataset has no spare split.")
flags.DEFINE_integer("max_frames", 0, "Keep at most this many frames per video (0: all).",
                     lower_bound=0)
flags.DEFINE_bool("keep_frozen_videos", False, "Keep videos whose decoded frames are all "
                  "identical (a decoder failure mode; skipped by default, always listed in "
                  "manifest.json under 'frozen').")
flags.DEFINE_integer("synthetic_classes", 4, "Classes of a synthetic dataset.", lower_bound=2)
flags.DEFINE_integer("synthetic_train", 256, "Training clips of a synthetic dataset.", lower_bound=1)
flags.DEFINE_integer("synthetic_val", 64, "Selection (val) clips of a synthetic dataset.",
                     lower_bound=1)
flags.DEFINE_integer("synthetic_test", 64, "Reporting (test) clips of a synthetic dataset.",
                     lower_bound=1)
flags.DEFINE_integer("synthetic_frames", 16, "Frames per synthetic clip.", lower_bound=1)
flags.DEFINE_integer("synthetic_size", 40, "Frame side of synthetic clips (pixels).", lower_bound=8)
flags.DEFINE_integer("data_seed", 0, "Seed of the synthetic data.")
flags.DEFINE_enum("repair", "auto", REPAIRS, "--mode=verify: what to do with damaged shards: "
                  "write them again from their source (a synthetic dataset's generator, or "
                  "--source_dir), keep only their readable records (drop, listed in the "
                  "manifest), auto (source when possible, else drop) or none (report only).")
# -- input pipeline (InputConfig) ------------------------------------------------------------
flags.DEFINE_integer("num_frames", 8, "Frames per clip fed to the network.", lower_bound=1)
flags.DEFINE_integer("frame_stride", 1, "Stride between sampled frames (dense sampling).",
                     lower_bound=1)
flags.DEFINE_enum("sampling", "dense", SAMPLINGS, "Frame sampling: dense consecutive "
                  "frames with --frame_stride, or TSN-style segments (one frame from each of "
                  "--num_frames equal segments of the video).")
flags.DEFINE_integer("crop_size", 32, "Spatial crop.", lower_bound=8)
flags.DEFINE_integer("min_short_side", 36, "Training scale jitter: smallest short side.")
flags.DEFINE_integer("max_short_side", 44, "Training scale jitter: largest short side.")
flags.DEFINE_integer("eval_short_side", 40, "Evaluation short side before the centre crop.")
flags.DEFINE_bool("flip", False, "Random horizontal flip (off for direction-sensitive data).")
flags.DEFINE_bool("temporal_pool", False, "Temporal average pooling (window 3, stride 2) of the "
                  "input clip: the supplement's low temporal resolution experiment.")
flags.DEFINE_float("mixup_alpha", 0.0, "Mixup: clips mixed pairwise with lambda ~ Beta(a, a), "
                   "one lambda per clip, labels mixed alike (0: off, the paper).")
flags.DEFINE_float("cutmix_alpha", 0.0, "Cutmix: one box per clip, the same in every frame, "
                   "pasted from the partner clip; labels weighted by area (0: off). With "
                   "--mixup_alpha too, each batch uses one of the two.")
flags.DEFINE_string("randaugment", "", "RandAugment N,M (e.g. 2,9): N ops of magnitude M drawn "
                    "once per training clip and applied identically to all its frames (Model "
                    "Garden's ops without Cutout; empty: off).")
flags.DEFINE_integer("batch_size", 8, "Global batch size.", lower_bound=1)
flags.DEFINE_enum("eval_protocol", "custom", EVAL_PROTOCOLS, "Views per video behind every "
                  "reported accuracy: authors (1 clip x 1 centre crop of --eval_short_side^2, the "
                  "authors' selection), paper (2 clips x the same crop, the authors' test), 10x3 "
                  "(10 clips x 3 crops of --eval_short_side^2), custom (--num_clips x --num_crops "
                  "crops of --eval_crop_size).")
flags.DEFINE_enum("selection_protocol", "same", SELECTION_PROTOCOLS, "Views per video when "
                  "ranking sampled strategies (same: --eval_protocol).")
flags.DEFINE_integer("num_clips", 1, "--eval_protocol=custom: evaluation clips per video.",
                     lower_bound=1)
flags.DEFINE_enum("num_crops", "1", NUM_CROPS, "--eval_protocol=custom: evaluation crops per clip.")
flags.DEFINE_integer("eval_crop_size", 0, "--eval_protocol=custom: side of the evaluation crops "
                     "(0: --crop_size).", lower_bound=0)
flags.DEFINE_string("data_service", None, "grpc://HOST:PORT of a tf.data service dispatcher: "
                    "run training-input preprocessing on its workers.")
flags.DEFINE_integer("data_service_port", 5050, "--mode=data_service: dispatcher port.")
flags.DEFINE_integer("data_service_workers", 2, "--mode=data_service: workers in this process "
                     "(0: a dispatcher alone; with --data_service, workers that join it).",
                     lower_bound=0)
flags.DEFINE_string("data_service_work_dir", None, "--mode=data_service: the dispatcher's "
                    "journal (fault-tolerant mode: a restarted dispatcher recovers its jobs).")
# -- the template (TemplateConfig) and its gates (GateConfig) ------------------------------
flags.DEFINE_enum("preset", "tiny", PRESETS, "Template network: the DenseNet template presets "
                  "(densenet121, small, tiny) or any backbone preset, whose fusion units are then "
                  "gated and searched the same way.")
flags.DEFINE_bool("temporal_downsample", False, "Temporally down-sampled template variant.")
flags.DEFINE_float("dropout", 0.0, "Dropout before the classifier while the gates are off (the "
                   "warm-up, and networks trained without v-DropPath; the authors: 0.5); off in "
                   "the v-DropPath phase.", lower_bound=0.0, upper_bound=0.99)
flags.DEFINE_integer("num_classes", 174, "Classes for --mode=summary.")
flags.DEFINE_string("init_weights", "none", "Initial weights of the template: none (from "
                    "scratch), imagenet (keras.applications.DenseNet121's, downloaded once by "
                    "Keras), or the path of a local DenseNet121 (.keras model, or a weights file "
                    "with or without the classifier). Inflated into the stem, every S/T branch, "
                    "transition and BatchNorm; the classifier stays fresh. Needs "
                    "--preset=densenet121; a resumed run keeps its checkpoint.")
flags.DEFINE_enum("inflate_branches", "split", BRANCH_INITS, "How a 2D 1x1 kernel initialises a "
                  "unit's S (1x1x1) and T (3x1x1) branches: split between the branches the "
                  "network runs (it then equals the 2D network on a still clip) or copied whole "
                  "into each (the authors).")
flags.DEFINE_float("init_drop_rate", 0.1, "Initial drop rate of every gate.")
flags.DEFINE_float("temperature", 0.2, "RelaxedBernoulli temperature.")
flags.DEFINE_bool("rescale", False, "Divide kept activations by (1 - p).")
flags.DEFINE_enum("regularizer", "code", REGULARIZERS, "Form of the variational regulariser.")
flags.DEFINE_float("length_scale", 10.0, "Length-scale prior k of the regulariser.")
flags.DEFINE_enum("weight_term", "norm", WEIGHT_TERMS, "||W||^2 in the regulariser's weight "
                  "term: the kernel's as trained (norm: paper and code), or its expected value "
                  "under the weight prior, n_W/k^2 (prior: a price of 1/k nats per kept "
                  "parameter, independent of the kernel scale that BatchNorm makes arbitrary), "
                  "or the prior's total shared out by each branch's MACs per clip (compute: "
                  "not the paper's; for a search that should cut compute).")
# -- training (TrainConfig) and distribution -------------------------------------------------
flags.DEFINE_integer("epochs", 6, "Total epochs (warm-up included).", lower_bound=1)
flags.DEFINE_integer("warmup_epochs", 2, "Epochs without v-DropPath at the start.", lower_bound=0)
flags.DEFINE_float("learning_rate", 0.01, "Initial learning rate (of the v-DropPath phase with "
                   "--restart_at_switch).")
flags.DEFINE_list("lr_steps", [], "Epochs at which the learning rate is multiplied by 0.1, "
                  "counted from the start of the run (with --restart_at_switch: the v-DropPath "
                  "phase's, each after --warmup_epochs).")
flags.DEFINE_bool("restart_at_switch", False, "When the gates switch on, restart the optimizer "
                  "(fresh momentum) and the learning-rate schedule, as the authors' second "
                  "launch; the warm-up then has its own --warmup_learning_rate, "
                  "--warmup_lr_steps and --warmup_weight_decay. Without it one optimizer and one "
                  "schedule span the run.")
flags.DEFINE_float("warmup_learning_rate", None, "With --restart_at_switch: the warm-up's initial "
                   "learning rate (default: --learning_rate).")
flags.DEFINE_list("warmup_lr_steps", [], "With --restart_at_switch: warm-up epochs at which its "
                  "learning rate is multiplied by 0.1 (the authors: 30,40).")
flags.DEFINE_float("weight_decay", 0.0, "Decoupled weight decay (w -= lr*wd*w each step) of the "
                   "v-DropPath phase, or of the whole run without --restart_at_switch; on kernels, "
                   "biases and BatchNorm, never on the gates' drop logits. PyTorch's coupled "
                   "SGD weight_decay l with momentum m corresponds to l/(1-m).", lower_bound=0.0)
flags.DEFINE_float("warmup_weight_decay", 0.0, "With --restart_at_switch: the warm-up's "
                   "decoupled weight decay (the authors' 5e-4 with momentum 0.9: 5e-3).",
                   lower_bound=0.0)
flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
flags.DEFINE_enum("optimizer", "sgd", OPTIMIZERS, "SGD with momentum is the paper's; "
                  "Adam gets the tiny synthetic runs to converge within the CPU budget.")
flags.DEFINE_enum("gate_optimizer", "shared", GATE_OPTIMIZERS, "Optimizer of the gates' drop "
                  "logits: shared with the weights (the authors'), or an Adam / SGD of their own "
                  "with --gate_learning_rate (same step schedule).")
flags.DEFINE_float("gate_learning_rate", None, "Learning rate of the gates' own optimizer.")
flags.DEFINE_float("label_smoothing", 0.0, "Label smoothing e of the loss: targets "
                   "(1 - e) y + e / classes (0: off, the paper).")
flags.DEFINE_bool("ema", False, "Exponential moving average of the weights (Keras optimizer "
                  "use_ema); training ends with the averaged weights, which evaluation, the saved "
                  "model and the analysis use. The gates' drop logits are not averaged.")
flags.DEFINE_float("ema_momentum", 0.999, "EMA momentum: the average spans about "
                   "1 / (1 - momentum) steps.")
flags.DEFINE_integer("steps_per_epoch", None, "Steps per epoch (default: clips // batch).")
flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints kept.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Training seed.")
flags.DEFINE_enum("distribution", "default", DISTRIBUTIONS, "tf.distribute strategy.")
flags.DEFINE_string("tpu", "", "TPU address for --distribution=tpu.")
# -- how networks compute (ComputeConfig): every mode, recorded with the run ------------------
flags.DEFINE_enum("precision", "float32", PRECISIONS, "Keras dtype policy of every network: "
                  "float32, or mixed (float32 variables, 16-bit compute; gate logits, drop "
                  "rates, regulariser, logits and loss stay float32; mixed_float16 trains with "
                  "dynamic loss scaling).")
flags.DEFINE_enum("jit_compile", "auto", JIT_COMPILE, "XLA for training, evaluation and "
                  "strategy scoring (auto: Keras' choice, XLA when a GPU is present and no "
                  "tf.distribute strategy is active).")
flags.DEFINE_bool("memory_efficient", False, "Memory-efficient dense layers: recompute each "
                  "dense layer's concatenation, BN-ReLU and bottleneck in the backward pass "
                  "instead of storing them (template and DenseNet backbones; same results, "
                  "less activation memory, some more compute).")
# -- analysis (AnalysisConfig) ------------------------------------------------------------------
flags.DEFINE_integer("num_samples", 100, "Strategies sampled for ranking.", lower_bound=1)
flags.DEFINE_integer("sample_seed", 0, "Seed of the strategy sampler.")
flags.DEFINE_string("selection_split", "val", "Split that ranks strategies.")
flags.DEFINE_string("report_split", "test", "Split on which Opt and uniform strategies are "
                    "reported.")
flags.DEFINE_integer("recalibrate_batches", 0, "Also rank with BatchNorm statistics re-estimated "
                     "per sampled sub-network on this many training batches (0: off, as the "
                     "authors); the report compares both rankings, and --mode=fidelity "
                     "correlates both with stand-alone accuracy.", lower_bound=0)
flags.DEFINE_float("max_gmacs", None, "Compute budget of Opt: the best sampled strategy whose "
                   "network needs at most this many GMACs (multiply-accumulates, 1e9) per clip "
                   "(default: no budget, the paper's Opt).")
flags.DEFINE_float("max_params", None, "Parameter budget of Opt (a count, e.g. 2e7); with "
                   "--max_gmacs both must hold.")
flags.DEFINE_integer("fidelity_strategies", 5, "--mode=fidelity: strategies trained stand-alone.",
                     lower_bound=2)
flags.DEFINE_enum("fidelity_pool", "learned", FIDELITY_POOLS, "--mode=fidelity: which ranking "
                  "the strategies are taken from: 'learned' (the samples of --mode=analyze) or "
                  "'uniform' (--num_samples strategies drawn uniformly from the whole space, "
                  "ranked with the same inherited weights).")
flags.DEFINE_list("runs", [], "--mode=aggregate: analysed model directories of one template "
                  "trained with different seeds.")
flags.DEFINE_string("aggregate_dir", None, "--mode=aggregate: output folder (default: "
                    "'aggregate' beside the first run).")
# -- backbones (--mode=generalize, --mode=summary) ---------------------------------------------
flags.DEFINE_list("backbones", [], "3D backbones for --mode=generalize (also run by --mode=all "
                  "when set) and --mode=summary: resnet50, resnext50, resnext101, mobilenetv2, "
                  "densenet121, or the *_tiny versions.")
flags.DEFINE_list("backbone_strategies", ["opt", "S+ST", "S", "ST"], "Fusion strategies per "
                  "backbone: searched (the Opt of a v-DropPath template of that backbone, trained "
                  "and analysed under <model_dir>/searched/<backbone> with this run's recipe, or "
                  "given by --searched_runs), opt (transferred from this run's template), "
                  "opt_depth (the earlier transfer rule), paper (the paper's hand rule), S, ST, "
                  "S+ST, a unit list per stage or position, or a FusionStrategy JSON path.")
flags.DEFINE_list("searched_runs", [], "BACKBONE=MODEL_DIR,...: analysed template runs of those "
                  "backbones (--preset=BACKBONE) to take 'searched' from instead of training one.")
flags.DEFINE_enum("searched_weight_term", None, WEIGHT_TERMS, "Weight term of the backbones' "
                  "own templates that --mode=generalize trains for 'searched' (default: "
                  "--weight_term). compute: their search prices MACs, not weights.")
flags.DEFINE_enum("fusion_family", "auto", ("auto",) + FAMILIES, "Dataset family of "
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
# -- export ------------------------------------------------------------------------------------
flags.DEFINE_string("strategy", "opt", "Classifier to export: 'opt' (the analysis' best sampled "
                    "strategy), 'S', 'ST', 'S+ST', or a FusionStrategy JSON path.")

flags.DEFINE_bool("tflite", False, "--mode=export: also write the classifier as TFLite "
                  "(<export_dir>/tflite/classifier_<name>.tflite, float32, one clip), checked "
                  "against the Keras network; gate-free networks only.")
flags.DEFINE_string("export_model", None, "--mode=export: export this trained gate-free .keras "
                    "network (e.g. <model_dir>/generalize/mobilenetv2_tiny/S_plus_ST/model.keras) "
                    "instead of the template's --strategy.")

#: Config field -> flag, per config: the one place that ties flags to the library.
INPUT_FLAGS = {"num_frames": "num_frames", "stride": "frame_stride", "crop_size": "crop_size",
               "min_short_side": "min_short_side", "max_short_side": "max_short_side",
               "eval_short_side": "eval_short_side", "flip": "flip", "num_clips": "num_clips",
               "num_crops": "num_crops", "temporal_pool": "temporal_pool",
               "sampling": "sampling", "batch_size": "batch_size",
               "eval_protocol": "eval_protocol", "eval_crop_size": "eval_crop_size",
               "mixup_alpha": "mixup_alpha", "cutmix_alpha": "cutmix_alpha",
               "randaugment": "randaugment"}
GATE_FLAGS = {"init_drop_rate": "init_drop_rate", "temperature": "temperature",
              "rescale": "rescale", "regularizer": "regularizer", "length_scale": "length_scale",
              "weight_term": "weight_term"}
TRAIN_FLAGS = {"epochs": "epochs", "warmup_epochs": "warmup_epochs",
               "learning_rate": "learning_rate", "lr_steps": "lr_steps", "momentum": "momentum",
               "optimizer": "optimizer", "steps_per_epoch": "steps_per_epoch",
               "keep_checkpoints": "keep_checkpoints", "seed": "seed",
               "gate_optimizer": "gate_optimizer", "gate_learning_rate": "gate_learning_rate",
               "weight_decay": "weight_decay", "restart_at_switch": "restart_at_switch",
               "warmup_learning_rate": "warmup_learning_rate",
               "warmup_lr_steps": "warmup_lr_steps", "warmup_weight_decay": "warmup_weight_decay",
               "label_smoothing": "label_smoothing", "ema": "ema", "ema_momentum": "ema_momentum"}
COMPUTE_FLAGS = {"precision": "precision", "jit_compile": "jit_compile",
                 "memory_efficient": "memory_efficient"}
ANALYSIS_FLAGS = {"num_samples": "num_samples", "seed": "sample_seed",
                  "selection_split": "selection_split", "report_split": "report_split",
                  "recalibrate_batches": "recalibrate_batches",
                  "selection_protocol": "selection_protocol", "max_gmacs": "max_gmacs",
                  "max_params": "max_params"}
#: Flags that do not define a run, so the run record neither keeps nor restores them.
OPERATIONAL = ("mode", "model_dir", "export_dir", "verbose", "progress", "debug", "strategy",
               "runs", "aggregate_dir", "repair", "tflite", "export_model",
               "data_service_port", "data_service_workers", "data_service_work_dir",
               "prepare_workers", "num_classes", "fidelity_pool")


def _build(cls, mapping: dict, convert_values=None):
    values = {field: FLAGS[flag].value for field, flag in mapping.items()}
    values.update(convert_values or {})
    try:
        return cls(**values)
    except (UserError, ValueError, TypeError) as e:
        raise UserError(flag_message(str(e), mapping)) from None


def flag_message(message: str, mapping: dict) -> str:
    """A config's error message with its field names replaced by the flags that set them."""
    for field, flag in sorted(mapping.items(), key=lambda kv: -len(kv[0])):
        message = re.sub(rf"(?<![\w-]){field}(?=\W|$)", f"--{flag}", message)
    return message


def input_config():
    from stfusion_tf.data import pipeline
    if FLAGS.eval_protocol != "custom":
        given = [n for n in ("num_clips", "num_crops", "eval_crop_size") if FLAGS[n].present]
        if given:
            raise UserError(f"--{given[0]} is a setting of --eval_protocol=custom; "
                            f"--eval_protocol={FLAGS.eval_protocol} has its own views")
    return _build(pipeline.InputConfig, INPUT_FLAGS, {"num_crops": int(FLAGS.num_crops)})


def template_config():
    """The preset with the input geometry (frames after pooling, crop) and variant."""
    from stfusion_tf.model import template as tpl
    icfg = input_config()
    return tpl.preset(FLAGS.preset, temporal_downsample=FLAGS.temporal_downsample,
                      num_frames=icfg.model_frames, crop_size=icfg.crop_size,
                      dropout=FLAGS.dropout)


def gate_config(dataset_size: int = 1, searched: bool = False):
    """The gates' settings; ``searched``: of a backbone's own template trained for the
    ``searched`` strategy (``--searched_weight_term``)."""
    from stfusion_tf.model import template as tpl
    config = _build(tpl.GateConfig, GATE_FLAGS, {"dataset_size": dataset_size})
    if searched and FLAGS.searched_weight_term:
        config = dataclasses.replace(config, weight_term=FLAGS.searched_weight_term)
    return config


def _epochs(name: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in FLAGS[name].value)
    except ValueError:
        raise UserError(f"--{name} must be whole epoch numbers, got {FLAGS[name].value}") from None


def train_config():
    from stfusion_tf import training
    return _build(training.TrainConfig, TRAIN_FLAGS,
                  {"lr_steps": _epochs("lr_steps"), "warmup_lr_steps": _epochs("warmup_lr_steps")})


def analysis_config():
    from stfusion_tf.analysis import report
    return _build(report.AnalysisConfig, ANALYSIS_FLAGS)


def compute_config():
    from stfusion_tf import compute
    return _build(compute.ComputeConfig, COMPUTE_FLAGS)


def synthetic_spec():
    """The embedded dataset ``--dataset`` names, at the --synthetic_* sizes."""
    from stfusion_tf.data import synthetic
    return synthetic.SyntheticSpec(
        name=FLAGS.dataset, num_classes=FLAGS.synthetic_classes, num_train=FLAGS.synthetic_train,
        num_val=FLAGS.synthetic_val, num_test=FLAGS.synthetic_test,
        num_frames=FLAGS.synthetic_frames, size=FLAGS.synthetic_size, seed=FLAGS.data_seed)


def backbone_overrides() -> dict:
    """What a backbone preset takes from the run: its clip, stem stride and dropout."""
    return {"num_frames": input_config().model_frames, "crop_size": FLAGS.crop_size,
            "temporal_stride": FLAGS.backbone_temporal_stride, "dropout": FLAGS.dropout}


def convert_settings() -> dict:
    """Keyword arguments of ``convert.prepare`` for a real dataset."""
    return {"short_side": FLAGS.short_side, "clips_per_shard": FLAGS.clips_per_shard,
            "workers": FLAGS.prepare_workers, "max_frames": FLAGS.max_frames,
            "ucf_split": int(FLAGS.ucf_split), "annotations": FLAGS.annotations,
            "holdout_fraction": FLAGS.holdout_fraction, "keep_frozen": FLAGS.keep_frozen_videos}


def check() -> None:
    """Builds every config once, so a bad flag stops the run before any work."""
    input_config()
    template_config()
    gate_config()
    train_config()
    analysis_config()
    compute_config()
    if FLAGS.data_service and not FLAGS.data_service.startswith("grpc://"):
        raise UserError(f"--data_service={FLAGS.data_service!r} must look like grpc://HOST:PORT")
    _check_init()
    from stfusion_tf.model import backbones
    bad = [b for b in FLAGS.backbones if b not in backbones.PRESETS]
    if bad:
        raise UserError(f"--backbones: unknown {', '.join(bad)}; valid backbones: "
                        f"{', '.join(backbones.PRESETS)}")


def _check_init() -> None:
    """A file given to --init_weights is checked where a fresh run reads it (a finished
    run's later modes do not need it)."""
    from stfusion_tf.model.inflation import INFLATABLE
    value = FLAGS.init_weights
    if value != "none" and FLAGS.preset not in INFLATABLE:
        raise UserError(f"--init_weights={value} inflates a keras.applications network and "
                        f"needs --preset={', '.join(INFLATABLE)} (got --preset={FLAGS.preset})")


def paths() -> tuple[str, str, str]:
    data_dir = FLAGS.data_dir or os.path.join("tfrecords", FLAGS.dataset)
    model_dir = FLAGS.model_dir or os.path.join("runs", FLAGS.dataset)
    export_dir = FLAGS.export_dir or os.path.join(model_dir, "export")
    return data_dir, model_dir, export_dir


def _recorded() -> list[str]:
    return [name for name in FLAGS.get_key_flags_for_module(__name__)
            if name.name not in OPERATIONAL]


def write_record(model_dir: str, data_dir: str) -> dict:
    """Writes the run record of a training run (see ``run_record``)."""
    values = {f.name: f.value for f in _recorded()}
    values["data_dir"] = data_dir if "://" in data_dir else os.path.abspath(data_dir)
    configs = {"input": input_config(), "template": template_config(), "gate": gate_config(),
               "train": train_config(), "analysis": analysis_config(),
               "compute": compute_config()}
    from stfusion_tf import run_record
    return run_record.write(model_dir, values,
                            {k: dataclasses.asdict(v) for k, v in configs.items()})


def apply_record(model_dir: str, log=print) -> dict | None:
    """Takes every run-defining flag the user did not give from ``model_dir``'s run
    record; a flag given explicitly wins, and each one that differs is said in one line."""
    from stfusion_tf import run_record
    record = run_record.read(model_dir)
    if record is None:
        return None
    for flag in _recorded():
        if flag.name not in record["flags"]:
            continue
        value = record["flags"][flag.name]
        if flag.present:
            if flag.value != value:
                log(f"[run] --{flag.name}={_show(flag.value)} overrides the run record's "
                    f"{_show(value)}")
        else:
            flag.value = value
    return record


def check_preset(model_dir: str) -> None:
    """A ``UserError`` when ``--preset`` names another network than the run in
    ``model_dir`` was trained with: its checkpoints and ``template.keras`` would not fit,
    and nothing of the run is touched."""
    from stfusion_tf import run_record
    record = run_record.read(model_dir)
    recorded = (record or {}).get("flags", {}).get("preset")
    if recorded and FLAGS["preset"].present and FLAGS.preset != recorded:
        raise UserError(f"{model_dir} holds a template of --preset={recorded}; --preset="
                        f"{FLAGS.preset} is another network: drop --preset to continue that run, "
                        "or give another --model_dir")


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
