"""SavedModel export: the probability space and chosen-strategy classifiers.

Both are plain ``tf.Module`` SavedModels in TF-Serving layout
(``<export_dir>/<name>/<version>/``) that load with TensorFlow alone.

``probability_space`` signatures
  ``drop_rates()``      -> drop_rates [P,2] (S branch, T branch), positions [P]
  ``marginals()``       -> marginals [P,4] (Eq. 7: S, ST, S+ST, none),
                           sampling_marginals [P,4] (unit frequencies of ``sample``),
                           positions, unit_names
  ``sample(num, seed)`` -> unit_codes [num,P] int32 (0 S, 1 ST, 2 S+ST, 3 none),
                           positions, unit_names; deterministic per seed.  Each
                           gate is dropped with its learned p, as the authors
                           sampled strategies; where a position has no residual
                           path a 'none' draw is redrawn given a kept branch.

``classifier_<strategy>`` (the strategy's gate-free network, see
``classifier_network``) signatures
  ``serving_default(clips uint8 [B,T,H,W,3])`` -> probabilities [B,C],
      top_k_indices / top_k_names [B,k]; resize of the short side, centre crop,
      central window of the model's frame count (repeated if the clip is
      shorter) happen inside, and the network normalises (ImageNet mean/std).
  ``preprocessed(clips float32 [B,T',S,S,3])`` -> probabilities, top-k: clips
      already sampled, resized and cropped, as float pixel values in [0, 255].

SavedModels compute in the precision policy the network was built in
(``--precision``); TFLite always in float32 (``float32_network``).

TFLite (``export_tflite``, gate-free networks only): ``<export_dir>/tflite/
classifier_<name>.tflite`` computes ``preprocessed``'s probabilities for one
float32 clip [1,T',S,S,3]; beside it the class names (``.labels.txt``) and what
the conversion found (``.json``: input shape, TF Select ops, the largest
difference from the Keras network on a test clip, which must stay under
``TFLITE_TOLERANCE`` or nothing is written).  The DenseNet-3D needs TF Select
(the Flex delegate) for ``AvgPool3D`` and ``MaxPool3D``, which TFLite has no
builtin kernels for; MobileNetV2-3D converts to builtin ops only.
"""

from __future__ import annotations

import json
import os
import re
import tempfile

import keras
import numpy as np
import tensorflow as tf

from stfusion_tf import files
from stfusion_tf.errors import UserError
from stfusion_tf.model import gates as gates_lib
from stfusion_tf.model.backbones import input_geometry
from stfusion_tf.model.strategy import UNITS, FusionStrategy
from stfusion_tf.model.template import Template, TemplateGates, strategy_network

# keep_S + 2 * keep_T -> unit code (none, S, ST, S+ST).
_KEEP_TO_CODE = [3, 0, 1, 2]


class ProbabilitySpace(tf.Module):
    def __init__(self, positions, drop_rates, required=None):
        super().__init__(name="probability_space")
        self.p = tf.Variable(np.asarray(drop_rates, np.float32), trainable=False, name="drop_rates")
        required = np.zeros(len(positions), bool) if required is None else np.asarray(required)
        #: Positions that must keep a branch (as ``ranking.sample_masks``).
        self.required = tf.constant(required, tf.bool)
        self.positions = tf.constant(list(positions))
        self.unit_names = tf.constant(list(UNITS))

    @tf.function(input_signature=[])
    def drop_rates(self):
        return {"drop_rates": tf.convert_to_tensor(self.p), "positions": self.positions}

    @tf.function(input_signature=[])
    def marginals(self):
        def table(ks, kt):
            return tf.stack([ks * (1 - kt), (1 - ks) * kt, ks * kt, (1 - ks) * (1 - kt)], axis=1)
        keep7 = 1.0 - tf.sqrt(self.p)
        keep = 1.0 - self.p
        sampling = table(keep[:, 0], keep[:, 1])
        # What ``sample`` draws from: where a position must keep a branch, 'none' is
        # excluded and the other three renormalised.
        kept = sampling[:, :3] / tf.maximum(1.0 - sampling[:, 3:], 1e-30)
        conditioned = tf.concat([kept, tf.zeros_like(sampling[:, 3:])], axis=1)
        sampling = tf.where(self.required[:, None], conditioned, sampling)
        return {"marginals": table(keep7[:, 0], keep7[:, 1]), "sampling_marginals": sampling,
                "positions": self.positions, "unit_names": self.unit_names}

    @tf.function(input_signature=[tf.TensorSpec([], tf.int32, name="num"),
                                  tf.TensorSpec([], tf.int64, name="seed")])
    def sample(self, num, seed):
        tf.debugging.assert_positive(num, message="num must be >= 1")
        u = tf.random.stateless_uniform(tf.concat([[num], tf.shape(self.p)], 0),
                                        seed=tf.stack([seed, tf.constant(0, tf.int64)]))
        keep = tf.cast(u >= self.p, tf.int32)
        codes = tf.gather(tf.constant(_KEEP_TO_CODE, tf.int32), keep[..., 0] + 2 * keep[..., 1])
        # Where a position must keep a branch, a 'none' draw is redrawn from the gates'
        # distribution given a kept branch: P(S) : P(ST) : P(S+ST).
        ks, kt = 1.0 - self.p[:, 0], 1.0 - self.p[:, 1]
        w = tf.stack([ks * self.p[:, 1], self.p[:, 0] * kt, ks * kt], 1)
        cum = tf.cumsum(w / tf.maximum(tf.reduce_sum(w, 1, keepdims=True), 1e-30), axis=1)
        v = tf.random.stateless_uniform(tf.stack([num, tf.shape(self.p)[0], 1]),
                                        seed=tf.stack([seed, tf.constant(1, tf.int64)]))
        kept = tf.minimum(tf.reduce_sum(tf.cast(v > cum[None], tf.int32), -1), 2)
        codes = tf.where((codes == 3) & self.required[None], kept, codes)
        return {"unit_codes": codes, "positions": self.positions, "unit_names": self.unit_names}


class Classifier(tf.Module):
    """Serving functions: uint8 clips of any size -> the evaluation view (centre clip of
    the network's frames, short side ``eval_short_side``, centre ``crop_size`` square)."""

    def __init__(self, model, label_map, eval_short_side: int, crop_size: int | None = None,
                 top_k: int = 5):
        super().__init__(name="classifier")
        self.model = model
        self.labels = tf.constant(list(label_map))
        self.k = min(top_k, len(label_map))
        self.frames, size, _, _ = input_geometry(model)
        self.size = int(crop_size or size)
        self.short_side = int(eval_short_side)

    def _outputs(self, x):
        probs = tf.nn.softmax(self.model(x, training=False), axis=-1)
        top = tf.math.top_k(probs, self.k)
        return {"probabilities": probs, "top_k_indices": top.indices,
                "top_k_names": tf.gather(self.labels, top.indices)}

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, None, 3], tf.uint8, name="clips")])
    def serve_uint8(self, clips):
        # Runtime check of rank and channels: signatures do not validate shapes.
        clips = tf.ensure_shape(clips, [None, None, None, None, 3], name="clips_must_be_BTHW3")
        shape = tf.shape(clips)
        b, t, h, w = shape[0], shape[1], shape[2], shape[3]
        tf.debugging.assert_positive(t, message="clips must have at least one frame")
        tf.debugging.assert_positive(h * w, message="clips must have non-empty frames")
        start = tf.maximum(0, (t - self.frames) // 2)
        idx = tf.math.floormod(start + tf.range(self.frames), t)
        x = tf.gather(clips, idx, axis=1)
        x = tf.reshape(x, tf.concat([[b * self.frames], shape[2:]], 0))
        scale = tf.cast(self.short_side, tf.float32) / tf.cast(tf.minimum(h, w), tf.float32)
        nh = tf.maximum(self.short_side, tf.cast(tf.round(tf.cast(h, tf.float32) * scale), tf.int32))
        nw = tf.maximum(self.short_side, tf.cast(tf.round(tf.cast(w, tf.float32) * scale), tf.int32))
        x = tf.image.resize(tf.cast(x, tf.float32), tf.stack([nh, nw]))
        x = tf.image.resize_with_crop_or_pad(x, self.size, self.size)
        x = tf.reshape(x, [b, self.frames, self.size, self.size, 3])
        return self._outputs(x)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, None, 3], tf.float32, name="clips")])
    def serve_float(self, clips):
        return self._outputs(tf.ensure_shape(clips, [None, self.frames, self.size, self.size, 3]))


def _save(module, path, signatures):
    """Writes through ``files.atomic_path``: no half-written export."""
    with files.atomic_path(path) as tmp:
        tf.saved_model.save(module, tmp, signatures=signatures)
    return path


def export_probability_space(model, export_dir: str, version: int = 1) -> str:
    gates = TemplateGates(model)
    mod = ProbabilitySpace(gates.positions, gates.drop_rates(), gates.required())
    return _save(mod, os.path.join(export_dir, "probability_space", str(version)),
                 {"drop_rates": mod.drop_rates, "marginals": mod.marginals, "sample": mod.sample})


def strategy_classifier(model, strategy: FusionStrategy):
    """Sets the template's gates to a fixed strategy for inference (masks baked in)."""
    gates = TemplateGates(model)
    gates.set_strategy(strategy)
    gates_lib.set_inference_mode(gates.s + gates.t, "mask")
    if gates.head is not None:
        gates_lib.set_inference_mode([gates.head], "expected")
    return model


def classifier_network(model, strategy: FusionStrategy):
    """The network that serves ``strategy``: its gate-free network
    (``template.strategy_network``) when the model is a ``Template`` (not a
    functional model saved by an older version) and the strategy has ``none``
    only on residual blocks (elsewhere no gate-free network can hold it);
    otherwise the template with the strategy's masks baked in.  Both give the
    same outputs; the first without the dropped branches' weights and FLOPs."""
    if isinstance(model, Template) and strategy.buildable(model.positions, model.none_positions):
        return strategy_network(model, strategy)
    return strategy_classifier(model, strategy)


def export_classifier(model, strategy: FusionStrategy, name: str, label_map, export_dir: str,
                      eval_short_side: int, crop_size: int | None = None, version: int = 1,
                      log=None) -> str:
    """Writes the classifier of ``strategy`` (``classifier_network``); see ``export_network``."""
    network = classifier_network(model, strategy)
    if log:
        kind = "template with masks" if network is model else \
            f"gate-free {network_label(model)}"
        log(f"classifier_{name}: {kind}, {network.count_params():,} parameters "
            f"(template {model.count_params():,})")
    return export_network(network, name, label_map, export_dir, eval_short_side, version,
                          crop_size)


def network_label(model) -> str:
    """``DenseNet-3D``, ``ResNet-3D`` or ``MobileNetV2-3D``: what a template's networks are."""
    kind = getattr(model, "preset_kind", "densenet")
    return {"densenet": "DenseNet-3D", "resnet": "ResNet-3D"}.get(kind, "MobileNetV2-3D")


def export_run(model, model_dir: str, spec: str, label_map, export_dir: str, eval_short_side: int,
               crop_size: int | None = None, log=None) -> tuple:
    """A trained template's probability space and the classifier of strategy ``spec``
    (``resolve_strategy``): (name, the classifier's network, the written paths)."""
    name, strategy = resolve_strategy(spec, model_dir, TemplateGates(model).positions)
    network = classifier_network(model, strategy)
    paths = [export_probability_space(model, export_dir),
             export_classifier(model, strategy, name, label_map, export_dir, eval_short_side,
                               crop_size, log=log)]
    return name, network, paths


def export_network(network, name: str, label_map, export_dir: str, eval_short_side: int,
                   version: int = 1, crop_size: int | None = None) -> str:
    """Writes ``<export_dir>/classifier_<name>/<version>`` through Keras' ``ExportArchive``.

    (A plain ``tf.Module`` holding a Keras 3 model loads with TF2's
    ``tf.saved_model.load`` but not with the TF1 loader that ``saved_model_cli
    run`` and TF Serving use: "Could not find variable ...".)
    """
    mod = Classifier(network, label_map, eval_short_side, crop_size)
    archive = keras.export.ExportArchive()
    archive.track(network)
    archive.add_endpoint("serving_default", mod.serve_uint8)
    archive.add_endpoint("preprocessed", mod.serve_float)
    path = os.path.join(export_dir, f"classifier_{name}", str(version))
    with files.atomic_path(path) as tmp:
        archive.write_out(tmp, verbose=False)
    return path


def resolve_strategy(spec: str, model_dir: str, positions) -> tuple[str, FusionStrategy]:
    """(name, strategy) of ``--strategy``: ``opt`` (the analysis' best sampled strategy),
    a uniform unit, or a FusionStrategy JSON path."""
    if spec == "opt":
        path = os.path.join(model_dir, "analysis", "opt_strategy.json")
        if not os.path.exists(path):
            raise UserError(f"--strategy=opt needs {path}; run --mode=analyze first")
        return "opt", FusionStrategy.load(path)
    if spec in UNITS[:3]:
        return spec.replace("+", "_plus_"), FusionStrategy.uniform(positions, spec)
    if os.path.exists(spec):
        return os.path.splitext(os.path.basename(spec))[0], FusionStrategy.load(spec)
    raise UserError(f"--strategy={spec!r}: valid values are opt, S, ST, S+ST or the path of a "
                    "FusionStrategy JSON file")


def network_name(path: str) -> str:
    """``.../generalize/<backbone>/<spec>/model.keras`` -> ``<backbone>_<spec>``."""
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    return re.sub(r"[^\w.-]+", "_", "_".join(parts[-3:-1]))


def load_network(path: str):
    """A trained gate-free network saved as ``.keras`` (e.g. a ``--mode=generalize`` backbone)."""
    if not os.path.exists(path):
        raise UserError(f"no model at {path}")
    network = keras.models.load_model(path)
    if gates_lib.gate_layers(network):
        raise UserError(f"{path} is a gated template; export one of its strategies with "
                        "--strategy instead")
    return network


#: Largest |TFLite - Keras| probability allowed on the conversion's test clip (float32).
TFLITE_TOLERANCE = 1e-4


def float32_network(network):
    """``network`` computing in float32, same layers and weights (itself when it already
    does): a network built or trained under a mixed ``--precision`` for TFLite, which has
    no bfloat16 kernels.  A Template rebuilds from its config; any other functional model
    is cloned with every layer's dtype policy set to float32."""
    from stfusion_tf.compute import precision_scope
    if all(l.dtype_policy.name == "float32" for l in network._flatten_layers()):
        return network
    with precision_scope("float32"):
        if isinstance(network, Template):
            clone = Template.from_config(network.get_config())
        else:
            clone = keras.models.clone_model(network, clone_function=lambda layer: type(
                layer).from_config({**layer.get_config(), "dtype": "float32"}))
    clone.set_weights(network.get_weights())
    return clone


def _tflite_bytes(network, shape) -> bytes:
    """Converts the network's probabilities for one clip, via a SavedModel (the converter
    cannot freeze a Keras 3 model's variables from a concrete function)."""
    archive = keras.export.ExportArchive()
    archive.track(network)
    archive.add_endpoint(
        "serve", lambda clips: {"probabilities": tf.nn.softmax(network(clips, training=False), -1)},
        input_signature=[tf.TensorSpec(shape, tf.float32, name="clips")])
    with tempfile.TemporaryDirectory() as d:
        archive.write_out(os.path.join(d, "sm"), verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(os.path.join(d, "sm"),
                                                             signature_keys=["serve"])
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS,
                                               tf.lite.OpsSet.SELECT_TF_OPS]
        return converter.convert()


def tflite_ops(flatbuffer: bytes) -> tuple[list[str], list[str]]:
    """(builtin op names, TF Select op names) a TFLite model uses."""
    from tensorflow.lite.python import schema_py_generated as schema
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(flatbuffer, 0))
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    builtin, select = set(), set()
    for code in model.operatorCodes:
        op = max(code.builtinCode, code.deprecatedBuiltinCode)
        if op == schema.BuiltinOperator.CUSTOM:
            custom = code.customCode.decode()
            (select if custom.startswith("Flex") else builtin).add(custom.removeprefix("Flex"))
        else:
            builtin.add(names[op])
    return sorted(builtin), sorted(select)


def run_tflite(flatbuffer: bytes, clips: np.ndarray) -> np.ndarray:
    """Probabilities [N, classes] of clips [N,T,S,S,3] from the TFLite interpreter, one by one."""
    interpreter = tf.lite.Interpreter(model_content=flatbuffer)
    interpreter.allocate_tensors()
    out = []
    for clip in np.asarray(clips, np.float32):
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], clip[None])
        interpreter.invoke()
        out.append(interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0])
    return np.stack(out)


def export_tflite(network, name: str, label_map, export_dir: str, crop_size: int | None = None,
                  log=None) -> str:
    """Writes ``<export_dir>/tflite/classifier_<name>.tflite`` (see the module docstring) for
    clips of ``crop_size`` (default: the size the network trains on)."""
    if gates_lib.gate_layers(network):
        raise UserError(f"classifier_{name} is the template with masks (its strategy has a 'none' "
                        "unit), which TFLite cannot take; export a strategy without 'none' "
                        "(--strategy=S+ST, or a FusionStrategy JSON)")
    network = float32_network(network)
    t, s, _, _ = input_geometry(network)
    s = crop_size or s
    if s is None:
        raise UserError(f"classifier_{name} takes any frame size; give the crop size of its "
                        "TFLite input (--crop_size)")
    flat = _tflite_bytes(network, [1, t, s, s, 3])
    clip = np.random.default_rng(0).uniform(0, 255, (1, t, s, s, 3)).astype(np.float32)
    want = tf.nn.softmax(network(clip, training=False), -1).numpy()
    diff = float(np.abs(run_tflite(flat, clip) - want).max())
    if not diff <= TFLITE_TOLERANCE:
        raise RuntimeError(f"the TFLite model of classifier_{name} differs from the network by "
                           f"{diff:.3g} (> {TFLITE_TOLERANCE}); nothing written")
    builtin, select = tflite_ops(flat)
    out = os.path.join(export_dir, "tflite")
    path = os.path.join(out, f"classifier_{name}.tflite")
    files.write_text(os.path.join(out, f"classifier_{name}.labels.txt"),
                     "".join(f"{label}\n" for label in label_map))
    files.write_text(os.path.join(out, f"classifier_{name}.json"), json.dumps({
        "input": {"name": "clips", "shape": [1, t, s, s, 3], "dtype": "float32",
                  "values": "pixels in [0, 255], frames sampled, resized and centre-cropped"},
        "output": "probabilities [1, classes]", "builtin_ops": builtin, "tf_select_ops": select,
        "max_abs_diff_vs_keras": diff}, indent=1))
    files.write_text(path, flat)  # last: the .tflite appears only with its sidecars
    if log:
        log(f"classifier_{name}.tflite: {len(flat) / 1e6:.2f} MB, max |TFLite - Keras| {diff:.2g}; "
            f"TF Select ops: {', '.join(select) or 'none'}")
    return path
