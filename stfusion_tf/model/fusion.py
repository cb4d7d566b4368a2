"""The fusion unit: the one place where a network chooses between 2D and 3D.

A fusion unit (paper §3, digest §5) replaces a 1x1 convolution of a 2D network by
two parallel branches on the same input, summed::

    x --[BN-ReLU]-- 1x1x1 conv (S branch)  --+
    x --[BN-ReLU]-- 3x1x1 conv (T branch)  --+-- sum

``FusionUnit(unit=None)`` keeps both branches, each behind a Variational DropPath
gate (``<key>_s_gate``, ``<key>_t_gate``): the unit of a template, whose drop
rates span the probability space.  ``unit="S"``, ``"ST"`` or ``"S+ST"`` builds the
fixed unit of a gate-free network (only the kept branches exist).  The DenseNet
template pre-activates each branch (``preactivation=True``, the authors'
``_DenseLayer``); the ResNet and MobileNetV2 blocks feed the branches directly.

Both branches dropped (``none``) can only be built where the unit sits on a
residual block: the block becomes its residual path alone.  A gated unit with
``return_keep=True`` also returns the block's keep factor
1 - (1 - f_S)(1 - f_T) (f: the gates' factors, in [0, 1]): the block's residual
branch is multiplied by it (``BlockKeep``), so a template whose two gates are
masked off at a position computes exactly the network that lacks that block's
residual branch, and in training the factor is the relaxed chance that at least
one branch is on.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from stfusion_tf.model.gates import GateConfig, VariationalDropPath
from stfusion_tf.model.layers3d import Pad3D
from stfusion_tf.model.normalization import BatchNorm
from stfusion_tf.model.strategy import NONE, UNIT_TO_KEEP


def _triple(v):
    return (int(v),) * 3 if isinstance(v, int) else tuple(int(i) for i in v)


@keras.saving.register_keras_serializable(package="stfusion_tf")
class FusionUnit(keras.layers.Layer):
    """S (1x1x1) and T (3x1x1) convolutions of one input, summed; gated or fixed.

    Args:
      filters: output channels of each branch.
      unit: ``None`` (gated template unit) or ``"S"``, ``"ST"``, ``"S+ST"``.
      gate: ``GateConfig`` of the gates (gated units only).
      key: prefix of the sub-layer names (``b1_l1``, ``c2_b1``): the gates are
        ``<key>_s_gate`` / ``<key>_t_gate``.
      conv_names: names of the S and T convolutions (default ``<key>_s_conv``,
        ``<key>_t_conv``); the backbones use ``keras.applications``' names so 2D
        weights inflate by name.
      strides: of both convolutions.
      preactivation: BN-ReLU on each branch before its convolution.
      temporal_padding: ``"zeros"`` or ``"replicate"`` (the T branch's 3 frames).
      return_keep: also return the block keep factor [B,1,1,1,1] (gated units).
    """

    def __init__(self, filters, unit=None, gate=None, key="fusion", conv_names=None,
                 strides=1, preactivation=False, bn_epsilon=1e-5, synchronized_bn=False,
                 temporal_padding="zeros", return_keep=False, **kwargs):
        super().__init__(**kwargs)
        if unit == NONE:
            raise ValueError("a fusion unit with no branch ('none') is not a layer: build the "
                             "block's residual path alone")
        if unit is not None and unit not in UNIT_TO_KEEP:
            raise ValueError(f"unknown fusion unit {unit!r}; valid units: S, ST, S+ST")
        if isinstance(gate, dict):
            gate = GateConfig(**gate)
        self.filters, self.unit, self.key = int(filters), unit, key
        self.gate = gate if unit is None else None
        if unit is None and self.gate is None:
            self.gate = GateConfig()
        self.conv_names = tuple(conv_names or (f"{key}_s_conv", f"{key}_t_conv"))
        self.strides = _triple(strides)
        self.preactivation, self.bn_epsilon = bool(preactivation), float(bn_epsilon)
        self.synchronized_bn, self.temporal_padding = bool(synchronized_bn), temporal_padding
        self.return_keep = bool(return_keep) and unit is None
        keep = UNIT_TO_KEEP[unit] if unit else (1, 1)
        #: Letters of the kept branches; each has ``<letter>_bn`` (or None), ``_pad``,
        #: ``_conv`` and ``_gate`` (None in a fixed unit) attributes.
        self.letters = tuple(l for l, kept in zip("st", keep) if kept)
        for letter, kt, conv_name in (("s", 1, self.conv_names[0]), ("t", 3, self.conv_names[1])):
            if letter not in self.letters:
                continue
            bn = BatchNorm(
                epsilon=self.bn_epsilon, momentum=0.9, name=f"{key}_{letter}_bn",
                synchronized=self.synchronized_bn, dtype=self.dtype_policy) \
                if self.preactivation else None
            replicate = kt > 1 and temporal_padding == "replicate"
            pad = Pad3D(time=kt // 2, temporal=temporal_padding, name=f"{key}_{letter}_tpad",
                        dtype=self.dtype_policy) if replicate else None
            conv = keras.layers.Conv3D(
                self.filters, (kt, 1, 1), strides=self.strides,
                padding="valid" if replicate or kt == 1 else "same", use_bias=False,
                kernel_initializer="he_normal", name=conv_name, dtype=self.dtype_policy)
            gated = self.gate.wrap(conv, f"{key}_{letter}_gate") if unit is None else None
            setattr(self, f"{letter}_bn", bn)
            setattr(self, f"{letter}_pad", pad)
            setattr(self, f"{letter}_conv", conv)
            setattr(self, f"{letter}_gate", gated)

    @property
    def branches(self):
        """Per kept branch: (letter, BN or None, Pad3D or None, conv, gate or None)."""
        return [(l, getattr(self, f"{l}_bn"), getattr(self, f"{l}_pad"),
                 getattr(self, f"{l}_conv"), getattr(self, f"{l}_gate")) for l in self.letters]

    # -- sub-layers by role ----------------------------------------------------------
    @property
    def gates(self) -> list[VariationalDropPath]:
        return [g for *_, g in self.branches if g is not None]

    @property
    def convs(self) -> list[keras.layers.Conv3D]:
        return [c for _, _, _, c, _ in self.branches]

    def build(self, input_shape):
        shape = tuple(input_shape)
        for _, bn, pad, conv, gated in self.branches:
            s = shape
            if bn is not None:
                bn.build(s)
            if pad is not None:
                s = pad.compute_output_shape(s)
            (gated or conv).build(s)
        self.built = True

    def call(self, inputs, training=None):
        outs, factors = [], []
        for _, bn, pad, conv, gated in self.branches:
            z = inputs
            if bn is not None:
                z = tf.nn.relu(bn(z, training=training))
            if pad is not None:
                z = pad(z)
            if gated is not None:
                y, f = gated(z, training=training, return_factor=True)
                factors.append(f)
            else:
                y = conv(z)
            outs.append(y)
        y = outs[0] if len(outs) == 1 else outs[0] + outs[1]
        if not self.return_keep:
            return y
        drop_s, drop_t = (1.0 - tf.clip_by_value(f, 0.0, 1.0) for f in factors)
        return y, 1.0 - drop_s * drop_t

    def compute_output_shape(self, input_shape):
        _, _, pad, conv, _ = self.branches[0]
        shape = pad.compute_output_shape(input_shape) if pad is not None else input_shape
        out = conv.compute_output_shape(shape)
        if self.return_keep:
            return out, (input_shape[0], 1, 1, 1, 1)
        return out

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "unit": self.unit,
                "gate": None if self.gate is None else dict(self.gate.__dict__),
                "key": self.key, "conv_names": list(self.conv_names),
                "strides": list(self.strides), "preactivation": self.preactivation,
                "bn_epsilon": self.bn_epsilon, "synchronized_bn": self.synchronized_bn,
                "temporal_padding": self.temporal_padding, "return_keep": self.return_keep}


@keras.saving.register_keras_serializable(package="stfusion_tf")
class BlockKeep(keras.layers.Layer):
    """A residual branch times its fusion unit's block keep factor: ``[y, keep] -> y * keep``."""

    def call(self, inputs):
        y, keep = inputs
        return y * tf.cast(keep, y.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape[0]
