"""The template network: a densely connected 3D CNN (DenseNet-121 layout) whose
fusion units are gated by Variational DropPath.

Dense layer (paper Fig. 3, authors' ``_DenseLayer`` "v1d3")::

    x --BN-ReLU-Conv1x1x1 (S branch, gate "<pos>_s_gate")--+
    x --BN-ReLU-Conv3x1x1 (T branch, gate "<pos>_t_gate")--+-- sum --BN-ReLU-Conv1x3x3--> y
    out = concat([x, y])

Transition: the same two gated branches (c -> c * compression), summed, then
AvgPool (1,2,2) ((2,2,2) in T1 of the temporally down-sampled variant).
Head: BN-ReLU-global average pool-[dropout]-gated features (per-feature concrete
dropout)-Dense; the optional dropout (``TemplateConfig.dropout``, the authors' 0.5)
acts only while the gates are off (``model/dropout.py``).  Positions are named as
in the paper's Fig. 4: ``B1.L1`` ... ``T1`` ... ``B4.L16``.

Given a FusionStrategy, the same code builds the gate-free network of that
strategy (the DenseNet121-3D backbone): only the kept branches exist, with the
template's layer names, so a template's weights load into it by name
(``transfer_template_weights``).  Stem and pooling pad explicitly and
symmetrically, as the authors' PyTorch code and ``keras.applications`` do.

The network is fully convolutional in space: it trains on ``crop_size`` crops
and evaluates on any frame size (the authors score the full 256x256 frame);
the number of frames is fixed.
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from stfusion_tf.errors import UserError
from stfusion_tf.model import memory
from stfusion_tf.model.dropout import PhaseDropout
from stfusion_tf.model.fusion import FusionUnit
from stfusion_tf.model.gates import (GateConfig, VariationalDropPath, bankable,  # noqa: F401
                                     banked, draw_bank, gate_layers, set_inference_mode)
from stfusion_tf.model.normalization import BatchNorm, PixelNormalization
from stfusion_tf.model.layers3d import TEMPORAL_PADDINGS, Pad3D
from stfusion_tf.model.strategy import FusionStrategy


@dataclasses.dataclass(frozen=True)
class TemplateConfig:
    """Architecture of a template network; presets in ``PRESETS``."""

    block_config: tuple[int, ...] = (6, 12, 24, 16)
    growth_rate: int = 32
    bn_size: int = 4
    init_features: int = 64
    compression: float = 0.5
    stem_kernel: tuple[int, int, int] = (5, 7, 7)
    stem_spatial_stride: int = 2
    temporal_downsample: bool = False
    num_frames: int = 16
    crop_size: int = 224
    #: Dropout before the classifier while the gates are off (warm-up, or a network
    #: trained without v-DropPath); off in the v-DropPath phase, as the authors.
    dropout: float = 0.0
    #: Padding of temporal kernels: "zeros" (authors) or "replicate" (edge frames).
    temporal_padding: str = "zeros"

    def __post_init__(self):
        if self.temporal_padding not in TEMPORAL_PADDINGS:
            raise UserError(f"temporal_padding={self.temporal_padding!r}; valid values: "
                            f"{', '.join(TEMPORAL_PADDINGS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def bottleneck_width(self) -> int:
        return self.bn_size * self.growth_rate

    @classmethod
    def from_dict(cls, d: dict) -> "TemplateConfig":
        """Inverse of ``dataclasses.asdict`` after a JSON round trip (lists -> tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


PRESETS = {
    # The paper's template (3D DenseNet-121, "v1d3" in the authors' code).
    "densenet121": TemplateConfig(),
    # Same layout, narrower and shallower: for 2-core CPU experiments.
    "small": TemplateConfig(block_config=(3, 4, 6, 3), growth_rate=16, bn_size=4,
                            init_features=32, stem_kernel=(3, 5, 5),
                            num_frames=8, crop_size=64),
    # Smallest sensible template: tests, the demo and the science benchmark.  Its stem is
    # 2D: the stem is never gated, so with a 3D stem part of the temporal modelling would
    # happen outside the probability space (measured: with a 3x5x5 stem an all-S template
    # still learns synthetic_motion); with this one an all-S network is invariant to
    # reversing time and cannot tell a direction from its opposite.
    "tiny": TemplateConfig(block_config=(2, 2, 2, 2), growth_rate=8, bn_size=2,
                           init_features=16, stem_kernel=(1, 5, 5),
                           num_frames=8, crop_size=32),
}


def preset_names() -> tuple[str, ...]:
    """Every name ``preset`` takes: the template presets, then every backbone preset."""
    from stfusion_tf.model import backbones as bb
    return tuple(dict.fromkeys([*PRESETS, *bb.PRESETS]))


def preset(name: str, **overrides):
    """A template preset (``TemplateConfig``) or a backbone preset as a template: its
    ``BackboneConfig`` (ResNet, ResNeXt, MobileNetV2) or, for a DenseNet backbone, the
    ``TemplateConfig`` it is built from.  ``overrides``: TemplateConfig fields
    (``temporal_downsample`` is a backbone's stem temporal stride 2)."""
    from stfusion_tf.model import backbones as bb
    if name in PRESETS:
        return dataclasses.replace(PRESETS[name], **overrides)
    if name in bb.PRESETS:
        return bb.template_preset(name, **overrides)
    raise UserError(f"unknown preset {name!r}; valid presets: {', '.join(preset_names())}")


def network_positions(config) -> tuple[str, ...]:
    """Fusion positions of a template (``TemplateConfig``) or backbone (``BackboneConfig``)."""
    if isinstance(config, TemplateConfig):
        return template_positions(config)
    from stfusion_tf.model import backbones as bb
    return bb.positions(config)


def none_positions(config) -> frozenset:
    """Positions whose unit may be ``none``: those on a residual block (the block becomes
    its residual path).  A DenseNet has none: every layer and transition must produce
    features (``FusionStrategy.check_buildable``)."""
    if isinstance(config, TemplateConfig):
        return frozenset()
    from stfusion_tf.model import backbones as bb
    return bb.residual_positions(config)


def template_positions(config: TemplateConfig) -> tuple[str, ...]:
    """Fusion positions in network order: B1.L1 ... T1 ... B4.Ln."""
    out = []
    for b, n in enumerate(config.block_config, start=1):
        out.extend(f"B{b}.L{i}" for i in range(1, n + 1))
        if b < len(config.block_config):
            out.append(f"T{b}")
    return tuple(out)


def _key(position: str) -> str:
    return position.lower().replace(".", "_")


def _gate_names(position: str) -> tuple[str, str]:
    k = _key(position)
    return f"{k}_s_gate", f"{k}_t_gate"


def _bn(name, synchronized=False):
    return BatchNorm(epsilon=1e-5, momentum=0.9, name=name, synchronized=synchronized)


def _conv(filters, kernel, name, strides=(1, 1, 1), padding="same"):
    return keras.layers.Conv3D(filters, kernel, strides=strides, padding=padding,
                               use_bias=False, kernel_initializer="he_normal", name=name)


def _fusion_unit(x, position, filters, gate: GateConfig, sync=False, unit=None, tpad="zeros"):
    """The pre-activated fusion unit of a dense layer or transition (gated: ``unit=None``)."""
    k = _key(position)
    return FusionUnit(filters, unit, gate, key=k, preactivation=True, synchronized_bn=sync,
                      temporal_padding=tpad, name=f"{k}_fusion")(x)


def _graph(config, num_classes: int, gate: GateConfig, sync: bool,
           strategy: FusionStrategy | None):
    """(inputs, logits) of the network; with ``strategy`` only its branches, no gates."""
    positions = network_positions(config)
    units = dict.fromkeys(positions)
    if strategy is not None:
        strategy.check_buildable(positions, network_name(config), none_positions(config))
        units = dict(zip(strategy.positions, strategy.units))
    if not isinstance(config, TemplateConfig):
        from stfusion_tf.model import backbones as bb
        return bb.graph(config, num_classes, gate, sync, units)
    tpad = config.temporal_padding
    # Any frame size: training crops and full-frame evaluation views (``crop_size`` is
    # the training crop).
    inputs = keras.Input((config.num_frames, None, None, 3), name="clip")
    x = _stem(PixelNormalization(name="input_norm")(inputs), config, sync)
    channels = config.init_features
    for b, n_layers in enumerate(config.block_config, start=1):
        for i in range(1, n_layers + 1):
            pos = f"B{b}.L{i}"
            k = _key(pos)
            y = _fusion_unit(x, pos, config.bottleneck_width, gate, sync, units[pos], tpad)
            y = keras.layers.ReLU(name=f"{k}_relu")(_bn(f"{k}_bn", sync)(y))
            y = _conv(config.growth_rate, (1, 3, 3), f"{k}_spatial_conv")(y)
            x = keras.layers.Concatenate(name=f"{k}_concat")([x, y])
            channels += config.growth_rate
        if b < len(config.block_config):
            pos = f"T{b}"
            channels = int(channels * config.compression)
            x = _fusion_unit(x, pos, channels, gate, sync, units[pos], tpad)
            pool_t = 2 if (config.temporal_downsample and b == 1) else 1
            x = keras.layers.AveragePooling3D((pool_t, 2, 2), strides=(pool_t, 2, 2),
                                              name=f"t{b}_pool")(x)
    x = keras.layers.ReLU(name="head_relu")(_bn("head_bn", sync)(x))
    # The head runs in float32 under any precision policy: pooled features, dropout,
    # the classifier and its gate, so logits and the loss are float32.
    x = keras.layers.GlobalAveragePooling3D(name="head_pool", dtype="float32")(x)
    if config.dropout > 0:
        x = PhaseDropout(config.dropout, name="head_dropout", dtype="float32")(x)
    return inputs, classifier(x, num_classes, gate, strategy is None, "classifier")


def network_name(config) -> str:
    """What the network of ``config`` is called in messages."""
    if isinstance(config, TemplateConfig):
        return "DenseNet template"
    return f"{config.arch} backbone"


def classifier(x, num_classes: int, gate: GateConfig, gated: bool, name: str):
    """The float32 classifier; in a template behind the per-feature ``head_gate``."""
    dense = keras.layers.Dense(num_classes, name=name, dtype="float32")
    if not gated:
        return dense(x)
    return gate.wrap(dense, "head_gate", noise="feature", dtype="float32")(x)


def _stem(x, config: TemplateConfig, sync: bool):
    """Stem conv (explicit symmetric padding), BN-ReLU, 3x3x3 max-pool."""
    t_stride = 2 if config.temporal_downsample else 1
    s_stride = config.stem_spatial_stride
    kt, kh, kw = config.stem_kernel
    x = Pad3D(kt // 2, kh // 2, kw // 2, temporal=config.temporal_padding, name="stem_pad")(x)
    x = _conv(config.init_features, config.stem_kernel, "stem_conv",
              strides=(t_stride, s_stride, s_stride), padding="valid")(x)
    x = keras.layers.ReLU(name="stem_relu")(_bn("stem_bn", sync)(x))
    # Zero padding after ReLU is max-pooling's -inf padding.
    x = Pad3D(1, 1, 1, name="stem_pool_pad")(x)
    return keras.layers.MaxPooling3D((3, 3, 3), strides=(t_stride, 2, 2), padding="valid",
                                     name="stem_pool")(x)


@keras.saving.register_keras_serializable(package="stfusion_tf")
class Template(keras.Model):
    """The template (or, with ``strategy``, the gate-free network of one strategy)
    as a functional Keras model: clips [B,T,H,W,3] (pixel values in [0, 255], any H and W)
    -> logits.

    Its ``get_config`` carries the architecture, the gate settings and the
    strategy, so a saved model reloads as a ``Template`` that knows its
    positions and config (keras-hub's backbone pattern).  ``synchronized_bn``
    makes BatchNorm statistics global across replicas.
    """

    def __init__(self, config, num_classes: int, gate: GateConfig = GateConfig(),
                 strategy: FusionStrategy | None = None, synchronized_bn: bool = False,
                 name: str = "template", memory_efficient: bool = False, **kwargs):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        inputs, logits = _graph(config, num_classes, gate, synchronized_bn, strategy)
        super().__init__(inputs=inputs, outputs=logits, name=name, **kwargs)
        self.config, self.gate_config, self.strategy = config, gate, strategy
        self.num_classes, self.synchronized_bn = int(num_classes), bool(synchronized_bn)
        #: Training calls recompute the dense layers' concatenation, BN-ReLU and
        #: bottleneck in the backward pass (``model/memory.py``): same layers, weights
        #: and results, less memory.  Read when a call is traced: set it before compiling.
        self.memory_efficient = bool(memory_efficient)
        if gate.weight_term == "compute" and strategy is None:
            from stfusion_tf.analysis.cost import assign_compute_prices
            assign_compute_prices(self)

    def call(self, inputs, training=None, mask=None):
        gates = bankable(gate_layers(self)) if training else []
        if not gates:
            return self._run(inputs, training, mask)
        # Every path gate's relaxed draw and regulariser at once (``gates.draw_bank``);
        # the gates read their column.  Same distribution and loss as per-gate draws.
        batch = inputs.shape[0] if inputs.shape[0] is not None else tf.shape(inputs)[0]
        factors, reg = draw_bank(gates, batch)
        with banked(factors):
            outputs = self._run(inputs, training, mask)
        # Added after the forward pass: under MirroredStrategy the replicas' threads take
        # turns at synchronised BN's all-reduce, and a replica entering the model clears
        # its losses, so a loss added before that would be dropped from this replica's
        # (tests/test_distributed.py).  Functional's own add_loss is symbolic-only.
        keras.layers.Layer.add_loss(self, reg)
        return outputs

    def _run(self, inputs, training, mask):
        if training and self.memory_efficient:
            return memory.run(self, inputs, training)
        return super().call(inputs, training=training, mask=mask)

    @property
    def positions(self) -> tuple[str, ...]:
        return network_positions(self.config)

    @property
    def none_positions(self) -> frozenset:
        """Positions whose unit may be ``none`` (see ``none_positions``)."""
        return none_positions(self.config)

    @property
    def preset_kind(self) -> str:
        """``"densenet"``, ``"resnet"`` or ``"mobilenetv2"``: the layout of the network."""
        return "densenet" if isinstance(self.config, TemplateConfig) else self.config.arch

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable,
                "config": dataclasses.asdict(self.config), "num_classes": self.num_classes,
                "gate": dataclasses.asdict(self.gate_config),
                "strategy": None if self.strategy is None else self.strategy.to_dict(),
                "synchronized_bn": self.synchronized_bn, "memory_efficient": self.memory_efficient}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["config"] = config_from_dict(config["config"])
        config["gate"] = GateConfig(**config["gate"])
        if config.get("strategy") is not None:
            config["strategy"] = FusionStrategy.from_dict(config["strategy"])
        return cls(**config)


def config_from_dict(d: dict):
    """A ``TemplateConfig`` or, with an ``arch`` key, a ``BackboneConfig`` from its dict."""
    if "arch" in d:
        from stfusion_tf.model import backbones as bb
        return bb.BackboneConfig.from_dict(d)
    return TemplateConfig.from_dict(d)


def build_template(config, num_classes: int,
                   gate: GateConfig = GateConfig(), name: str = "template",
                   synchronized_bn: bool = False,
                   strategy: FusionStrategy | None = None,
                   memory_efficient: bool = False) -> Template:
    """The template network of ``config`` (a ``TemplateConfig`` or any
    ``BackboneConfig``; see ``Template``): every fusion unit gated.  With
    ``strategy``, the gate-free network of that strategy."""
    return Template(config, num_classes, gate, strategy=strategy,
                    synchronized_bn=synchronized_bn, name=name, memory_efficient=memory_efficient)


def layers_by_name(model: keras.Model) -> dict:
    """Every layer of ``model`` by name, the layers a gate wraps included
    (``model.get_layer`` cannot see those: ``b1_l1_s_conv`` inside ``b1_l1_s_gate``)."""
    out = {}
    for layer in model._flatten_layers(include_self=False, recursive=True):
        out[layer.name] = layer
        if isinstance(layer, VariationalDropPath):
            out[layer.layer.name] = layer.layer
    return out


def transfer_template_weights(template: keras.Model, network: keras.Model) -> int:
    """Loads a template's weights into a gate-free network built from the same config.

    Layers are matched by name (a gate's wrapped layer by its own name; the layers
    inside fusion units by theirs).  The head gate's inference-time scaling (1 - p,
    when it is on and not rescaling) is folded into the classifier kernel, so the
    network reproduces the template's ``mask``-mode outputs exactly.  Returns the
    number of layers copied.
    """
    import numpy as np
    source = layers_by_name(template)
    head = source.get("head_gate")
    copied = 0
    for name, layer in layers_by_name(network).items():
        if not layer.weights or isinstance(layer, (FusionUnit, VariationalDropPath)):
            continue
        if name not in source:
            raise ValueError(f"the template has no layer {name!r}")
        values = [np.asarray(v) for v in source[name].weights]
        if head is not None and name == head.layer.name and int(head.enabled.numpy()) \
                and not head.rescale:
            values[0] = values[0] * (1.0 - float(head.drop_rate))
        layer.set_weights(values)
        copied += 1
    return copied


def strategy_network(template: Template, strategy: FusionStrategy,
                     name: str | None = None) -> Template:
    """The gate-free network of ``strategy`` carrying ``template``'s weights.

    It computes what the template computes with that strategy's masks in
    inference, without the dropped branches' parameters and FLOPs and without
    gates: the network to deploy.
    """
    name = name or {"densenet": "densenet3d"}.get(template.preset_kind,
                                                   f"{template.preset_kind}3d")
    net = build_template(template.config, template.num_classes, strategy=strategy, name=name)
    transfer_template_weights(template, net)
    return net


class TemplateGates:
    """Named access to a template's gates: positions, drop rates, masks, modes.

    Works on any model built by ``build_template`` (also after loading it
    from disk): positions come from the model, gates by their layer names.
    """

    def __init__(self, model: keras.Model, positions=None):
        by_name = {g.name: g for g in gate_layers(model)}
        units = {u.key: u for u in model._flatten_layers(include_self=False, recursive=True)
                 if isinstance(u, FusionUnit) and u.gates}
        if positions is None:
            positions = getattr(model, "positions", None)
        if positions is None and units:  # a functional copy, or a user's own network
            positions = [_position_from_key(k) for k in units]
        if positions is None:  # a functional model saved before the Template class
            positions = [_position_from_key(n[: -len("_s_gate")])
                         for n in by_name if n.endswith("_s_gate")]
        self.positions = tuple(positions)
        try:
            self.s = [by_name[_gate_name(p, 0, by_name)] for p in self.positions]
            self.t = [by_name[_gate_name(p, 1, by_name)] for p in self.positions]
        except KeyError as e:
            raise ValueError(f"model has no gate {e.args[0]!r}; is it a template?") from None
        self.head = by_name.get("head_gate")
        self.all = self.s + self.t + ([self.head] if self.head is not None else [])
        #: Positions that may be ``none``: their unit sits on a residual block (it returns
        #: a block keep factor); sampling keeps a branch everywhere else.
        self.none_positions = frozenset(
            p for p in self.positions
            if getattr(units.get(_key(p), units.get(p)), "return_keep", False))

    def required(self):
        """Bool [P]: positions that must keep a branch (no residual path to fall back to)."""
        import numpy as np
        return np.array([p not in self.none_positions for p in self.positions], dtype=bool)

    def drop_rates(self):
        """Learned drop rates as a NumPy array [P, 2] (columns: S branch, T branch)."""
        import numpy as np
        return np.array([[float(s.drop_rate), float(t.drop_rate)]
                         for s, t in zip(self.s, self.t)], dtype=np.float64)

    def set_mask(self, mask) -> None:
        """Assigns a keep mask [P, 2]; no retrace.  Use inside tf.function too."""
        for i, (s, t) in enumerate(zip(self.s, self.t)):
            s.mask.assign(mask[i][0])
            t.mask.assign(mask[i][1])

    def set_strategy(self, strategy: FusionStrategy) -> None:
        if tuple(strategy.positions) != self.positions:
            raise ValueError("strategy positions do not match the template's")
        self.set_mask(strategy.to_mask())

    def hold(self, strategy: FusionStrategy) -> None:
        """``strategy``'s masks in training too: the template trains as that sub-network."""
        self.set_strategy(strategy)
        set_inference_mode(self.s + self.t, "mask")


def _gate_name(position: str, branch: int, by_name: dict) -> str:
    """The S (0) or T (1) gate's name: ``<key>_s_gate`` of this package's positions, else
    ``<position>_s_gate`` (a user's unit key with capitals)."""
    name = _gate_names(position)[branch]
    return name if name in by_name else f"{position}_{'st'[branch]}_gate"


def _position_from_key(key: str) -> str:
    """Inverse of ``_key`` for this package's positions (``b1_l2`` -> ``B1.L2``, ``t1`` ->
    ``T1``, ``c2_b1`` -> ``C2.B1``); any other key (a user's unit) is its own position."""
    import re
    if re.fullmatch(r"[bcm]\d+_[lb]\d+", key):
        head, tail = key.split("_")
        return f"{head.upper()}.{tail.upper()}"
    if re.fullmatch(r"t\d+", key):
        return key.upper()
    return key
