"""2D -> 3D inflation: load a Keras 2D network's weights into a 3D backbone or
into the gated template.

As the authors did (and I3D): a k x k kernel becomes 1 x k x k; a kernel with
temporal size kt > 1 is the 2D kernel repeated kt times and divided by kt.  2D
conv biases (keras' ResNet50 has them) are folded into the following
BatchNorm's moving mean.  A 2D classifier is copied when its class count
matches, else the 3D one is left at its initialisation ("skipped").

**A 2D 1x1 conv that became a fusion unit** (S branch 1x1x1, T branch 3x1x1):

* ``branches="split"`` (default): each branch the network runs gets 1/n of the
  inflated kernel, n = branches kept at that position (2 in the template,
  whose gates keep both in warm-up; 1 or 2 in a strategy's network).  S, ST
  and S+ST then all compute the 2D conv on a still clip, so the BatchNorm
  statistics copied from the 2D network stay right and the inflated network
  *is* the 2D network at step 0.
* ``branches="copy"``: the authors' ``update_state_dict``: the whole kernel
  into each branch.  A single branch is the 2D conv; S+ST is twice it, which
  BatchNorm absorbs in training (batch statistics) but not its copied moving
  statistics.  Each branch's ||W||^2, the regulariser's weight term, is 4x the
  split one's.

With ``temporal_padding="replicate"`` (and, for ResNet, ``stride_on="first"``,
the layout of ``keras.applications.ResNet50``) a split-inflated network gives on
a clip of identical frames exactly the 2D network's logits on one frame; with
zero temporal padding the first and last frames differ slightly.

Weights come from ``keras.applications`` ("imagenet": Keras downloads them once
into ``~/.keras/models``; tests never do) or from a local file: a saved
``.keras`` 2D model or a weights file with or without the classifier.
"""

from __future__ import annotations

import os

import numpy as np
import keras

from stfusion_tf.errors import UserError
from stfusion_tf.model import backbones as bb
from stfusion_tf.model import template as tpl
from stfusion_tf.model.fusion import FusionUnit
from stfusion_tf.model.gates import VariationalDropPath
from stfusion_tf.model.strategy import UNIT_TO_KEEP, FusionStrategy

#: Backbone arch -> builder of the matching keras.applications 2D network.
KERAS_2D = {
    "resnet": "ResNet50",
    "mobilenetv2": "MobileNetV2",
    "densenet": "DenseNet121",
}
BRANCH_INITS = ("split", "copy")
#: keras.applications.DenseNet121's layout, the only template layout it inflates into.
DENSENET121 = {"block_config": (6, 12, 24, 16), "growth_rate": 32, "bn_size": 4,
               "init_features": 64, "compression": 0.5}
_CLASSIFIERS = ("classifier", "predictions")


def keras_2d_model(cfg: bb.BackboneConfig, num_classes: int, weights: str | None = None):
    """The keras.applications network ``cfg`` inflates from: random (``weights=None``),
    ImageNet (``"imagenet"``, without its classifier) or a local file."""
    if cfg.arch == "resnet" and (cfg.groups != 1 or tuple(cfg.depths) != (3, 4, 6, 3)):
        raise ValueError("keras.applications has no 2D ResNeXt / ResNet of depths "
                         f"{cfg.depths}; pass your own 2D model with keras.applications layer "
                         "names to inflate()")
    if cfg.arch == "densenet" and tuple(cfg.depths) != (6, 12, 24, 16):
        raise ValueError(f"keras.applications has no DenseNet of depths {cfg.depths}")
    kwargs = {"input_shape": (cfg.crop_size, cfg.crop_size, 3)}
    if cfg.arch == "mobilenetv2":
        kwargs["alpha"] = cfg.alpha
    return load_2d(KERAS_2D[cfg.arch], weights, num_classes, **kwargs)


def load_2d(name: str, weights: str | None, num_classes: int = 1000, **kwargs) -> keras.Model:
    """``keras.applications.<name>`` with ``weights``: None (random), "imagenet", the
    path of a saved ``.keras`` model, or a weights file (with or without the top)."""
    builder = getattr(keras.applications, name)
    kwargs.setdefault("input_shape", (None, None, 3))
    if weights == "imagenet":
        try:
            return builder(weights="imagenet", include_top=False, **kwargs)
        except ValueError:  # an architecture Keras has no ImageNet weights for
            raise
        except Exception as e:  # no network, bad cache, ...
            raise UserError(f"cannot get the ImageNet weights of keras.applications.{name} "
                            f"({type(e).__name__}: {e}); on an offline machine download them "
                            "once elsewhere (~/.keras/models/) and pass that file's path") from None
    if weights is None:
        return builder(weights=None, classes=num_classes, classifier_activation=None,
                       **dict(kwargs, input_shape=kwargs["input_shape"] if None not in
                              kwargs["input_shape"] else (224, 224, 3)))
    if not os.path.exists(weights):
        raise UserError(f"2D weights file {weights} does not exist")
    if weights.endswith(".keras"):
        return keras.models.load_model(weights, compile=False)
    errors = []
    for top in (True, False):
        shape = kwargs["input_shape"]
        args = dict(kwargs, input_shape=(224, 224, 3) if top and None in shape else shape)
        model = builder(weights=None, include_top=top, classes=num_classes,
                        classifier_activation=None, **args)
        try:
            model.load_weights(weights)
            return model
        except Exception as e:  # wrong head, wrong architecture
            errors.append(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    raise UserError(f"cannot load {weights} into keras.applications.{name} with or without "
                    f"its classifier ({num_classes} classes): {errors[-1]}")


def densenet_names(name: str) -> list[str]:
    """keras.applications DenseNet layer name -> the template's layer name(s)."""
    fixed = {"conv1_conv": ["stem_conv"], "conv1_bn": ["stem_bn"], "bn": ["head_bn"],
             "predictions": ["classifier"]}
    if name in fixed:
        return fixed[name]
    parts = name.split("_")
    if name.startswith("pool"):  # pool{b+1}_{bn,conv}: transition T{b}
        k = f"t{int(parts[0][4:]) - 1}"
        return [f"{k}_s_{parts[1]}", f"{k}_t_{parts[1]}"]
    # conv{b+1}_block{i}_{0_bn,1_conv,1_bn,2_conv}
    k = f"b{int(parts[0][4:]) - 1}_l{int(parts[1][5:])}"
    role = "_".join(parts[2:])
    return {"0_bn": [f"{k}_s_bn", f"{k}_t_bn"], "1_conv": [f"{k}_s_conv", f"{k}_t_conv"],
            "1_bn": [f"{k}_bn"], "2_conv": [f"{k}_spatial_conv"]}[role]


def _target_names(name: str, arch: str) -> list[str]:
    return densenet_names(name) if arch == "densenet" else [name, f"{name}_s", f"{name}_t"]


def _fusion_convs(model3d) -> dict:
    """Name of every fusion-unit conv -> its position (models that know their positions)."""
    keys = {p.lower().replace(".", "_"): p for p in getattr(model3d, "positions", ())}
    return {c.name: keys[l.key] for l in model3d._flatten_layers(include_self=False)
            if isinstance(l, FusionUnit) and l.key in keys for c in l.convs}


def _branch_count(target: str, strategy: FusionStrategy | None, found: int,
                  convs: dict) -> int:
    """Branches the network runs at the fusion unit of conv ``target``: those ``strategy``
    keeps there, else the branches the 3D network has (``found``)."""
    if strategy is None or target not in convs:
        return found
    unit = dict(zip(strategy.positions, strategy.units))[convs[target]]
    return max(1, sum(UNIT_TO_KEEP[unit]))


def _inflate_kernel(k2: np.ndarray, shape3: tuple, scale: float) -> np.ndarray:
    if k2.shape == tuple(shape3):  # DepthwiseConv2D -> layers3d.DepthwiseConv3D: same kernel
        return k2.astype(np.float32)
    kt = shape3[0]
    k3 = np.repeat(k2[None], kt, axis=0) / kt * scale
    if k3.shape != tuple(shape3):
        raise ValueError(f"cannot inflate a kernel {k2.shape} into {tuple(shape3)}")
    return k3.astype(np.float32)


def _copy_dense(layer, target, skipped) -> bool:
    if tuple(target.kernel.shape) != tuple(layer.kernel.shape):
        skipped.append(f"{layer.name} ({layer.kernel.shape[1]} classes in 2D, "
                       f"{target.kernel.shape[1]} in 3D)")
        return False
    target.set_weights([np.asarray(w) for w in layer.weights])
    return True


def inflate(model3d: keras.Model, model2d: keras.Model, arch: str,
            strategy: FusionStrategy | None = None, branches: str = "split") -> dict:
    """Copies ``model2d``'s weights into ``model3d``: a ``build_backbone`` network of
    ``arch`` or, for ``"densenet"``, a template (gates and all).

    ``strategy``: the units a gated template will run (its masks); default both
    branches everywhere, as in warm-up.  ``branches``: ``"split"`` or ``"copy"``
    (module docstring).  Returns ``{"copied": n, "skipped": [...]}``; the
    classifier is skipped when the class counts differ or the 2D model has none.
    Raises if another 3D layer received no weights.
    """
    if branches not in BRANCH_INITS:
        raise UserError(f"branches={branches!r}; valid values: {', '.join(BRANCH_INITS)}")
    layers3d = tpl.layers_by_name(model3d)
    convs = _fusion_convs(model3d)
    biases, done, copied, skipped = {}, set(), set(), []
    layers2d = [l for l in model2d.layers if l.weights]
    for layer in layers2d:  # conv biases first: folded into the next BN
        if isinstance(layer, keras.layers.Conv2D) and layer.use_bias:
            biases[layer.name.rsplit("_", 1)[0] + "_bn"] = np.asarray(layer.bias)
    for layer in layers2d:
        targets = [layers3d[n] for n in _target_names(layer.name, arch) if n in layers3d]
        if not targets:
            raise ValueError(f"the 3D network has no layer for 2D layer {layer.name!r}")
        done.update(t.name for t in targets)
        if isinstance(layer, keras.layers.Dense):
            if _copy_dense(layer, targets[0], skipped):
                copied.add(targets[0].name)
            continue
        copied.update(t.name for t in targets)
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = (np.asarray(w) for w in layer.weights)
            mean = mean - biases.get(layer.name, 0.0)
            for t in targets:
                t.set_weights([gamma, beta, mean, var])
        else:  # Conv2D / DepthwiseConv2D
            k2 = np.asarray(layer.kernel)
            for t in targets:
                n = _branch_count(t.name, strategy, len(targets), convs)
                scale = 1.0 / n if branches == "split" else 1.0
                t.kernel.assign(_inflate_kernel(k2, tuple(t.kernel.shape), scale))
    missing = [n for n, l in layers3d.items() if l.trainable_weights and n not in done
               and not isinstance(l, (VariationalDropPath, FusionUnit))]
    for name in [n for n in missing if n in _CLASSIFIERS]:
        skipped.append(f"{name} (the 2D model has no classifier)")
        missing.remove(name)
    if missing:
        raise ValueError(f"3D layers without 2D weights: {missing[:5]}{'...' if len(missing) > 5 else ''}")
    return {"copied": len(copied), "skipped": skipped}


def inflate_from_keras(model3d: keras.Model, cfg: bb.BackboneConfig,
                       weights: str | None = None, num_classes_2d: int = 1000,
                       branches: str = "split") -> dict:
    """Builds the keras.applications 2D twin of ``cfg`` (``weights``: see ``load_2d``) and
    inflates it."""
    return inflate(model3d, keras_2d_model(cfg, num_classes_2d, weights), cfg.arch,
                   branches=branches)


def backbone_init(cfg: bb.BackboneConfig, inflate_weights: str | None, init_weights: str,
                  branches: str = "split", log=print):
    """A backbone's initialiser for ``training.train`` (None: from scratch):
    ``inflate_weights`` (a 2D file of its own architecture), else the template's
    ``init_weights`` (ImageNet for every backbone keras.applications has; a DenseNet121
    file for DenseNet only).  A backbone without a 2D twin (ResNeXt, the *_tiny nets)
    starts from scratch, and its report says why."""
    weights = inflate_weights or init_weights
    densenet_file = not inflate_weights and weights != "imagenet"
    if weights == "none" or (densenet_file and cfg.arch != "densenet"):
        return None

    def init(model):
        try:
            report = inflate_from_keras(model, cfg, weights, branches=branches)
        except UserError:
            raise
        except ValueError as e:
            log(f"{cfg.arch} starts from scratch: {e}")
            return {"init_weights": "none", "reason": str(e)}
        return {"init_weights": weights, "branches": branches, **report}
    return init


def check_densenet121(config: tpl.TemplateConfig) -> None:
    have = {k: getattr(config, k) for k in DENSENET121}
    have["block_config"] = tuple(have["block_config"])
    if have != DENSENET121:
        raise UserError("initialising a template from keras.applications.DenseNet121 needs its "
                        "layout (--preset=densenet121)")


#: Template presets keras.applications has a 2D twin of (``--init_weights``).
INFLATABLE = ("densenet121", "resnet50", "mobilenetv2")


def initialize_template(model: tpl.Template, weights: str, branches: str = "split",
                        strategy: FusionStrategy | None = None) -> dict:
    """Inflates a keras.applications network (``weights``: "imagenet" or a local file, see
    ``load_2d``) into a template of its layout: DenseNet121 into the DenseNet-121
    template, ResNet50 / MobileNetV2 into their gated backbones.  Stem, every wrapped
    S/T conv, BatchNorm; the classifier stays fresh unless the 2D one has the same
    classes.  Returns the report."""
    if isinstance(model.config, tpl.TemplateConfig):
        check_densenet121(model.config)
        model2d, arch = load_2d("DenseNet121", weights), "densenet"
    else:
        model2d, arch = keras_2d_model(model.config, 1000, weights), model.config.arch
    report = inflate(model, model2d, arch, strategy=strategy, branches=branches)
    return {"init_weights": weights, "branches": branches, **report}
