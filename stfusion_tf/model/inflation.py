"""2D -> 3D inflation: load a Keras 2D network's weights into a 3D backbone.

As the authors did (and I3D): a k x k kernel becomes 1 x k x k; a kernel with
temporal size kt > 1 is the 2D kernel repeated kt times and divided by kt.  A
2D 1x1 conv that became a fusion unit gives each kept branch its inflated
kernel divided by the number of kept branches, so S, ST and S+ST all sum to
the 2D conv on a static clip.  2D conv biases (keras' ResNet50 has them) are
folded into the following BatchNorm's moving mean.

With ``temporal_padding="replicate"`` (and, for ResNet, ``stride_on="first"``,
the layout of ``keras.applications.ResNet50``) the inflated network gives on a
clip of identical frames exactly the 2D network's logits on one frame; with
zero temporal padding the first and last frames differ slightly.

Nothing is downloaded: the 2D architecture comes from ``keras.applications``
with ``weights=None`` and its weights from a local file when given.
"""

from __future__ import annotations

import numpy as np
import keras

from stfusion_tf.model import backbones as bb

#: Backbone arch -> builder of the matching keras.applications 2D network.
KERAS_2D = {
    "resnet": "ResNet50",
    "mobilenetv2": "MobileNetV2",
    "densenet": "DenseNet121",
}


def keras_2d_model(cfg: bb.BackboneConfig, num_classes: int, weights: str | None = None):
    """The keras.applications network ``cfg`` inflates from (random or local weights)."""
    if cfg.arch == "resnet" and (cfg.groups != 1 or tuple(cfg.depths) != (3, 4, 6, 3)):
        raise ValueError("keras.applications has no 2D ResNeXt / ResNet of depths "
                         f"{cfg.depths}; pass your own 2D model with keras.applications layer "
                         "names to inflate()")
    if cfg.arch == "densenet" and tuple(cfg.depths) != (6, 12, 24, 16):
        raise ValueError(f"keras.applications has no DenseNet of depths {cfg.depths}")
    size = cfg.crop_size
    kwargs = dict(weights=None, input_shape=(size, size, 3), classes=num_classes,
                  classifier_activation=None)
    if cfg.arch == "mobilenetv2":
        kwargs["alpha"] = cfg.alpha
    model = getattr(keras.applications, KERAS_2D[cfg.arch])(**kwargs)
    if weights:
        model.load_weights(weights)
    return model


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


def _targets(model3d, name: str, arch: str) -> list:
    names = densenet_names(name) if arch == "densenet" else [name, f"{name}_s", f"{name}_t"]
    found = []
    for n in names:
        try:
            found.append(model3d.get_layer(n))
        except ValueError:
            pass
    return found


def _inflate_kernel(k2: np.ndarray, shape3: tuple, n_branches: int) -> np.ndarray:
    if k2.shape == tuple(shape3):  # DepthwiseConv2D -> layers3d.DepthwiseConv3D: same kernel
        return k2.astype(np.float32)
    kt = shape3[0]
    k3 = np.repeat(k2[None], kt, axis=0) / kt / n_branches
    if k3.shape != tuple(shape3):
        raise ValueError(f"cannot inflate a kernel {k2.shape} into {tuple(shape3)}")
    return k3.astype(np.float32)


def inflate(model3d: keras.Model, model2d: keras.Model, arch: str) -> dict:
    """Copies ``model2d``'s weights into ``model3d`` (a ``build_backbone`` network of ``arch``).

    Returns ``{"copied": n, "skipped": [...], "missing": [...]}``; the classifier
    is skipped when the class counts differ (fine-tuning on another dataset).
    Raises if a 3D layer other than the classifier received no weights.
    """
    biases, done, skipped = {}, set(), []
    layers2d = [l for l in model2d.layers if l.weights]
    for layer in layers2d:  # conv biases first: folded into the next BN
        if isinstance(layer, keras.layers.Conv2D) and layer.use_bias:
            biases[layer.name.rsplit("_", 1)[0] + "_bn"] = np.asarray(layer.bias)
    for layer in layers2d:
        targets = _targets(model3d, layer.name, arch)
        if not targets:
            raise ValueError(f"the 3D network has no layer for 2D layer {layer.name!r}")
        if isinstance(layer, keras.layers.Dense):
            t = targets[0]
            if tuple(t.kernel.shape) != tuple(layer.kernel.shape):
                skipped.append(f"{layer.name} ({layer.kernel.shape[1]} classes in 2D, "
                               f"{t.kernel.shape[1]} in 3D)")
                done.add(t.name)
                continue
            t.set_weights([np.asarray(w) for w in layer.weights])
        elif isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = (np.asarray(w) for w in layer.weights)
            mean = mean - biases.get(layer.name, 0.0)
            for t in targets:
                t.set_weights([gamma, beta, mean, var])
        else:  # Conv2D / DepthwiseConv2D
            k2 = np.asarray(layer.kernel)
            for t in targets:
                t.kernel.assign(_inflate_kernel(k2, tuple(t.kernel.shape), len(targets)))
        done.update(t.name for t in targets)
    missing = [l.name for l in model3d.layers if l.weights and l.name not in done]
    if missing:
        raise ValueError(f"3D layers without 2D weights: {missing[:5]}{'...' if len(missing) > 5 else ''}")
    return {"copied": len(done) - len(skipped), "skipped": skipped, "missing": missing}


def inflate_from_keras(model3d: keras.Model, cfg: bb.BackboneConfig,
                       weights: str | None = None, num_classes_2d: int = 1000) -> dict:
    """Builds the keras.applications 2D twin of ``cfg`` (local ``weights`` if given) and inflates it."""
    return inflate(model3d, keras_2d_model(cfg, num_classes_2d, weights), cfg.arch)
