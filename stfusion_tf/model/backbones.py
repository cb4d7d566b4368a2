"""3D backbones: ResNet50, ResNeXt50/101, MobileNetV2, DenseNet121, gated or from a strategy.

Every fusion unit is a ``fusion.FusionUnit`` (paper digest §5): a 1x1 conv of the
2D network becomes two parallel branches, 1x1x1 (S) and 3x1x1 (ST), summed
(S+ST) or one of them alone, per the strategy; the k x k convs become 1 x k x k.
Without a strategy every unit is gated (``template.build_template`` of a
``BackboneConfig``): the backbone is a template of its own probability space.

* ResNet / ResNeXt bottleneck: the first 1x1 is the fusion unit, then
  BN-ReLU, the 1x3x3 (grouped for ResNeXt) with the spatial stride, BN-ReLU,
  1x1x1, BN, residual.  ``stride_on="first"`` moves the stride to the fusion
  unit, the layout of ``keras.applications.ResNet50`` (v1), for exact inflation.
  Positions ``C2.B1`` ... ``C5.B3`` (stage ``conv2`` ... ``conv5`` of the 2D net).
  Every block is residual: unit ``none`` is the block's shortcut alone (identity,
  or the projection of a stage's first block).
* MobileNetV2 inverted residual: the expansion 1x1 is the fusion unit; the
  first block (expansion 1, no expansion conv) fuses its projection 1x1
  instead.  Depthwise 1x3x3 convs run per frame (``layers3d.DepthwiseConv3D``).
  Positions ``M1.B1`` ... ``M7.B1``: row r of the (t, c, n, s) table, block b.
  Unit ``none`` exists only at blocks with a residual add (same width, stride 1):
  the block is the identity; a block that changes width or stride must keep a branch.
* DenseNet121-3D: the template's layout (``template.TemplateConfig``), positions as
  the template's; every position must keep a branch.

Layer names follow ``keras.applications`` (``conv2_block1_1_conv`` ...; a
fusion unit's branches add ``_s`` / ``_t``) so ``inflation`` maps 2D weights
by name; gates are ``<position key>_s_gate`` / ``_t_gate`` (``c2_b1_s_gate``).
Stems: (kt x 7 x 7) conv with temporal stride ``temporal_stride`` (2 in the
authors' K400/UCF nets), then a 1x3x3 max-pool.
"""

from __future__ import annotations

import dataclasses

import keras

from stfusion_tf.errors import UserError
from stfusion_tf.model import template as tpl
from stfusion_tf.model.dropout import PhaseDropout
from stfusion_tf.model.fusion import BlockKeep, FusionUnit
from stfusion_tf.model.gates import GateConfig
from stfusion_tf.model.normalization import BatchNorm, PixelNormalization
from stfusion_tf.model.layers3d import (TEMPORAL_PADDINGS, DepthwiseConv3D, Pad3D,
                                        same_padding)
from stfusion_tf.model.strategy import NONE, S, S_ST, ST, UNITS, FusionStrategy  # noqa: F401

ARCHS = ("resnet", "mobilenetv2", "densenet")
#: MobileNetV2's (expansion t, channels c, repeats n, stride s) rows.
MOBILENET_ROWS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                  (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
    """Architecture of a 3D backbone; presets in ``PRESETS``.

    ``depths``: blocks per stage (ResNet), repeats per row (MobileNetV2) or
    layers per dense block (DenseNet).  ``width``: stage-1 planes (ResNet),
    growth rate (DenseNet); ``alpha``: MobileNetV2 width multiplier.
    """

    arch: str
    depths: tuple[int, ...]
    width: int = 64
    groups: int = 1
    width_per_group: int = 64
    alpha: float = 1.0
    stem_features: int = 64
    stem_temporal_kernel: int = 5
    stem_spatial_kernel: int = 7  # DenseNet only (ResNets keep keras.applications' 7x7)
    temporal_stride: int = 1
    stride_on: str = "spatial"
    temporal_padding: str = "zeros"
    num_frames: int = 8
    crop_size: int = 32
    #: Dropout before the classifier (``model/dropout.py``; on while there are no gates).
    dropout: float = 0.0

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch={self.arch!r}; valid values: {', '.join(ARCHS)}")
        if self.stride_on not in ("spatial", "first"):
            raise ValueError(f"stride_on={self.stride_on!r}; valid values: spatial, first")
        if self.temporal_padding not in TEMPORAL_PADDINGS:
            raise ValueError(f"temporal_padding={self.temporal_padding!r}; valid values: "
                             f"{', '.join(TEMPORAL_PADDINGS)}")
        if self.arch == "mobilenetv2" and len(self.depths) != len(MOBILENET_ROWS):
            raise ValueError(f"MobileNetV2 needs {len(MOBILENET_ROWS)} row depths, got {self.depths}")

    @classmethod
    def from_dict(cls, d: dict) -> "BackboneConfig":
        """Inverse of ``dataclasses.asdict`` after a JSON round trip (lists -> tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


PRESETS = {
    "resnet50": BackboneConfig("resnet", (3, 4, 6, 3)),
    "resnext50": BackboneConfig("resnet", (3, 4, 6, 3), groups=32, width_per_group=4),
    "resnext101": BackboneConfig("resnet", (3, 4, 23, 3), groups=32, width_per_group=4),
    "mobilenetv2": BackboneConfig("mobilenetv2", (1, 2, 3, 4, 3, 3, 1), stem_temporal_kernel=3),
    "densenet121": BackboneConfig("densenet", (6, 12, 24, 16), width=32),
    # Narrow, shallow versions built by the same code, for 2-core CPU experiments.  Their
    # stem is 2D (as the tiny template's): every temporal operation is a fusion unit, so an
    # all-S network is blind to the direction of time.
    "resnet_tiny": BackboneConfig("resnet", (1, 1, 1, 1), width=8, stem_features=8,
                                  stem_temporal_kernel=1),
    "resnext_tiny": BackboneConfig("resnet", (1, 1, 1, 1), width=8, groups=4, width_per_group=16,
                                   stem_features=8, stem_temporal_kernel=1),
    "mobilenetv2_tiny": BackboneConfig("mobilenetv2", (1, 1, 1, 1, 1, 1, 1), alpha=0.25,
                                       stem_temporal_kernel=1),
    "densenet_tiny": BackboneConfig("densenet", (2, 2, 2, 2), width=8, stem_features=16,
                                    stem_temporal_kernel=1, stem_spatial_kernel=5),
}


def preset(name: str, **overrides) -> BackboneConfig:
    if name not in PRESETS:
        raise UserError(f"unknown backbone {name!r}; valid backbones: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def template_preset(name: str, temporal_downsample: bool = False, **overrides):
    """Backbone preset ``name`` as a template's config: a ``BackboneConfig``, or for a
    DenseNet the ``TemplateConfig`` it is built from.  ``temporal_downsample``: stem
    temporal stride 2."""
    cfg = preset(name, **overrides)
    if temporal_downsample:
        cfg = dataclasses.replace(cfg, temporal_stride=2)
    return _template_config(cfg) if cfg.arch == "densenet" else cfg


def _make_divisible(v, divisor=8):
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def _template_config(cfg: BackboneConfig) -> tpl.TemplateConfig:
    """The TemplateConfig a DenseNet backbone is built from."""
    bn_size = 4 if cfg.width >= 32 else 2
    return tpl.TemplateConfig(block_config=cfg.depths, growth_rate=cfg.width, bn_size=bn_size,
                              init_features=cfg.stem_features,
                              stem_kernel=(cfg.stem_temporal_kernel, cfg.stem_spatial_kernel,
                                           cfg.stem_spatial_kernel),
                              temporal_downsample=cfg.temporal_stride > 1,
                              num_frames=cfg.num_frames, crop_size=cfg.crop_size,
                              temporal_padding=cfg.temporal_padding, dropout=cfg.dropout)


def positions(cfg: BackboneConfig) -> tuple[str, ...]:
    """Fusion positions in network order."""
    if cfg.arch == "densenet":
        return tpl.template_positions(_template_config(cfg))
    if cfg.arch == "resnet":
        return tuple(f"C{i + 2}.B{j + 1}" for i, n in enumerate(cfg.depths) for j in range(n))
    return tuple(b.position for b in _mobilenet_blocks(cfg))


def residual_positions(cfg: BackboneConfig) -> frozenset:
    """Positions on a residual block: where the unit ``none`` can be built."""
    if cfg.arch == "resnet":
        return frozenset(positions(cfg))
    if cfg.arch == "mobilenetv2":
        return frozenset(b.position for b in _mobilenet_blocks(cfg) if b.residual)
    return frozenset()


@dataclasses.dataclass(frozen=True)
class _MobileBlock:
    position: str
    prefix: str
    expansion: int
    in_channels: int
    filters: int
    stride: int

    @property
    def residual(self) -> bool:
        return self.in_channels == self.filters and self.stride == 1


def _mobilenet_blocks(cfg: BackboneConfig) -> list[_MobileBlock]:
    """The inverted-residual blocks of a MobileNetV2, as keras.applications lays them out."""
    out, in_ch = [], _make_divisible(32 * cfg.alpha, 8)
    for r, ((t, c, _, s), n) in enumerate(zip(MOBILENET_ROWS, cfg.depths)):
        for j in range(n):
            filters = _make_divisible(int(c * cfg.alpha), 8)
            block_id = len(out)
            prefix = "expanded_conv_" if block_id == 0 else f"block_{block_id}_"
            out.append(_MobileBlock(f"M{r + 1}.B{j + 1}", prefix, t, in_ch, filters,
                                    s if j == 0 else 1))
            in_ch = filters
    return out


def stage_of(position: str) -> str:
    return position.split(".")[0]


# -- layers -----------------------------------------------------------------------

class _Builder:
    """Keeps the per-network settings the layer helpers need.  ``units``: position ->
    unit, or -> None everywhere for a gated template (``gate`` its settings)."""

    def __init__(self, cfg: BackboneConfig, units: dict, sync: bool, gate: GateConfig):
        self.cfg, self.units, self.sync, self.gate = cfg, units, sync, gate
        self.eps = 1e-3 if cfg.arch == "mobilenetv2" else 1.001e-5

    def bn(self, x, name):
        return BatchNorm(epsilon=self.eps, momentum=0.9, name=name, synchronized=self.sync)(x)

    def conv(self, x, filters, kernel, name, strides=(1, 1, 1), groups=1, pad=(0, 0, 0),
             padding="valid"):
        """Conv3D with explicit symmetric/asymmetric padding (time padded per config)."""
        if any(p if isinstance(p, int) else sum(p) for p in pad):
            x = Pad3D(*pad, temporal=self.cfg.temporal_padding, name=f"{name}_pad")(x)
        return keras.layers.Conv3D(filters, kernel, strides=strides, padding=padding,
                                   groups=groups, use_bias=False,
                                   kernel_initializer="he_normal", name=name)(x)

    def dropped(self, position) -> bool:
        """Whether the strategy drops the block at ``position`` (unit ``none``)."""
        return self.units[position] == NONE

    def fusion(self, x, position, filters, name, strides=(1, 1, 1), residual=False):
        """(output, keep): the fusion unit at ``position`` (convs ``<name>_s`` / ``_t``);
        ``keep`` is the block keep factor of a gated unit on a residual block, else None."""
        key = position.lower().replace(".", "_")
        unit = self.units[position]
        gated_residual = unit is None and residual
        out = FusionUnit(filters, unit, self.gate, key=key, conv_names=(f"{name}_s", f"{name}_t"),
                         strides=strides, temporal_padding=self.cfg.temporal_padding,
                         return_keep=gated_residual, name=f"{key}_fusion")(x)
        return out if gated_residual else (out, None)


def _keep(y, keep, name):
    return y if keep is None else BlockKeep(name=f"{name}_keep")([y, keep])


def _stem(b: _Builder, x, filters, kernel, spatial_pad, name):
    cfg = b.cfg
    kt = cfg.stem_temporal_kernel
    return b.conv(x, filters, (kt, kernel, kernel), name,
                  strides=(cfg.temporal_stride, 2, 2), pad=(kt // 2, spatial_pad, spatial_pad))


def _resnet(b: _Builder, x, position_names):
    cfg = b.cfg
    x = _stem(b, x, cfg.stem_features, 7, 3, "conv1_conv")
    x = keras.layers.ReLU(name="conv1_relu")(b.bn(x, "conv1_bn"))
    x = Pad3D(0, 1, 1, name="pool1_pad")(x)
    x = keras.layers.MaxPooling3D((1, 3, 3), strides=(1, 2, 2), name="pool1_pool")(x)
    pos = iter(position_names)
    for i, n in enumerate(cfg.depths):
        planes = cfg.width * 2 ** i
        mid = int(planes * cfg.width_per_group / 64) * cfg.groups
        out = planes * 4
        for j in range(n):
            name = f"conv{i + 2}_block{j + 1}"
            position = next(pos)
            s = 2 if (j == 0 and i > 0) else 1
            first = (1, s, s) if cfg.stride_on == "first" else (1, 1, 1)
            spatial = (1, 1, 1) if cfg.stride_on == "first" else (1, s, s)
            if j == 0:
                shortcut = b.conv(x, out, (1, 1, 1), f"{name}_0_conv", (1, s, s))
                shortcut = b.bn(shortcut, f"{name}_0_bn")
            else:
                shortcut = x
            if b.dropped(position):  # the block is its shortcut (x >= 0: relu(x) = x)
                x = keras.layers.ReLU(name=f"{name}_out")(shortcut) if j == 0 else shortcut
                continue
            y, keep = b.fusion(x, position, mid, f"{name}_1_conv", first, residual=True)
            y = keras.layers.ReLU(name=f"{name}_1_relu")(b.bn(y, f"{name}_1_bn"))
            if spatial[1] == 1:  # "same" is symmetric here, and spares a Pad op
                y = b.conv(y, mid, (1, 3, 3), f"{name}_2_conv", groups=cfg.groups, padding="same")
            else:
                y = b.conv(y, mid, (1, 3, 3), f"{name}_2_conv", spatial, groups=cfg.groups,
                           pad=(0, 1, 1))
            y = keras.layers.ReLU(name=f"{name}_2_relu")(b.bn(y, f"{name}_2_bn"))
            y = _keep(b.bn(b.conv(y, out, (1, 1, 1), f"{name}_3_conv"), f"{name}_3_bn"), keep, name)
            x = keras.layers.ReLU(name=f"{name}_out")(keras.layers.Add(name=f"{name}_add")([shortcut, y]))
    return x


def _mobilenetv2(b: _Builder, x, position_names):
    cfg = b.cfg
    relu6 = lambda name: keras.layers.ReLU(6.0, name=name)  # noqa: E731
    first = _make_divisible(32 * cfg.alpha, 8)
    size = cfg.crop_size
    x = _stem(b, x, first, 3, same_padding(size, 3, 2), "Conv1")
    size = -(-size // 2)
    x = relu6("Conv1_relu")(b.bn(x, "bn_Conv1"))
    for block_id, blk in enumerate(_mobilenet_blocks(cfg)):
        prefix = blk.prefix
        if b.dropped(blk.position):  # only at residual blocks: the identity
            continue
        y, keep = x, None
        if block_id:
            y, keep = b.fusion(y, blk.position, blk.expansion * blk.in_channels, f"{prefix}expand",
                               residual=blk.residual)
            y = relu6(f"{prefix}expand_relu")(b.bn(y, f"{prefix}expand_BN"))
        if blk.stride == 2:
            pad = (0, 1) if size % 2 == 0 else (1, 1)
            y = Pad3D(0, pad, pad, name=f"{prefix}pad")(y)
            y = DepthwiseConv3D(3, 2, "valid", name=f"{prefix}depthwise")(y)
            size = -(-size // 2)
        else:
            y = DepthwiseConv3D(3, 1, "same", name=f"{prefix}depthwise")(y)
        y = relu6(f"{prefix}depthwise_relu")(b.bn(y, f"{prefix}depthwise_BN"))
        if block_id:
            y = b.conv(y, blk.filters, (1, 1, 1), f"{prefix}project")
        else:
            y, keep = b.fusion(y, blk.position, blk.filters, f"{prefix}project",
                               residual=blk.residual)
        y = _keep(b.bn(y, f"{prefix}project_BN"), keep, prefix.rstrip("_"))
        if blk.residual:
            y = keras.layers.Add(name=f"{prefix}add")([x, y])
        x = y
    last = _make_divisible(1280 * cfg.alpha, 8) if cfg.alpha > 1.0 else 1280
    x = b.conv(x, last, (1, 1, 1), "Conv_1")
    return relu6("out_relu")(b.bn(x, "Conv_1_bn"))


def graph(cfg: BackboneConfig, num_classes: int, gate: GateConfig, sync: bool, units: dict):
    """(inputs, logits) of a ResNet / MobileNetV2 backbone: ``units`` position -> unit, or
    -> None everywhere for the gated template (``template._graph`` dispatches here)."""
    if cfg.arch == "densenet":
        raise ValueError("a DenseNet backbone is built from its TemplateConfig (template_preset)")
    b = _Builder(cfg, units, sync, gate)
    # Any frame size (full-frame evaluation); MobileNetV2's stride-2 padding is laid out for
    # ``crop_size``, the same for any size divisible by 32.
    inputs = keras.Input((cfg.num_frames, None, None, 3), name="clip")
    x = PixelNormalization(name="input_norm")(inputs)
    x = (_resnet if cfg.arch == "resnet" else _mobilenetv2)(b, x, positions(cfg))
    # Pooled features and logits in float32 under any precision policy (as the template).
    x = keras.layers.GlobalAveragePooling3D(name="avg_pool", dtype="float32")(x)
    if cfg.dropout > 0:
        x = PhaseDropout(cfg.dropout, name="head_dropout", dtype="float32")(x)
    gated = all(u is None for u in units.values())
    return inputs, tpl.classifier(x, num_classes, gate, gated, "predictions")


def build_backbone(cfg: BackboneConfig, strategy: FusionStrategy | None, num_classes: int,
                   name: str | None = None, synchronized_bn: bool = False,
                   gate: GateConfig = GateConfig(), memory_efficient: bool = False) -> tpl.Template:
    """A 3D backbone of ``cfg`` with ``strategy``'s unit at each position, or with
    ``strategy=None`` the backbone as a gated template (``gate`` its gates).

    Input: clips [B, T, H, W, 3] of float pixel values in [0, 255] (H, W: the training
    crop ``cfg.crop_size`` or any evaluation size); output: logits.
    """
    config = _template_config(cfg) if cfg.arch == "densenet" else cfg
    name = name or (f"{cfg.arch}3d" if strategy is not None else f"{cfg.arch}_template")
    return tpl.build_template(config, num_classes, gate, name=name,
                              synchronized_bn=synchronized_bn, strategy=strategy,
                              memory_efficient=memory_efficient)


def count_params(model: keras.Model) -> dict:
    import numpy as np
    trainable = int(sum(np.prod(v.shape) for v in model.trainable_weights))
    return {"params_trainable": trainable, "params_total": int(model.count_params())}


def check_geometry(model: keras.Model, want: tuple[int, int, int], what: str) -> None:
    """A UserError unless ``model`` trains on (frames, height, width) ``want``."""
    have = input_geometry(model)[:3]
    if tuple(have) != tuple(want):
        raise UserError(f"{what} takes {'x'.join(map(str, have))} clips; "
                        f"--num_frames/--crop_size/--temporal_pool give "
                        f"{'x'.join(map(str, want))}; drop those flags to use the run's own "
                        "geometry")


def input_geometry(model: keras.Model) -> tuple[int, int, int, int]:
    """(frames, height, width, channels) a network trains on: its config's crop (the
    networks take any frame size), else its input shape."""
    frames, h, w, c = model.input_shape[1:]
    config = getattr(model, "config", None)
    crop = getattr(config, "crop_size", None)
    return (frames, crop or h, crop or w, c)


__all__ = ["ARCHS", "BackboneConfig", "PRESETS", "preset", "positions", "build_backbone",
           "count_params", "UNITS", "S", "ST", "S_ST"]
