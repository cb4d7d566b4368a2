"""Memory-efficient dense layers: ``Template(memory_efficient=True)``, ``--memory_efficient``.

A DenseNet keeps, for its backward pass, each dense layer's concatenated input
and the BN-ReLU outputs computed from it: several tensors per layer as wide as
everything the block has produced so far, so activation memory grows with the
square of a block's depth.  Memory-efficient DenseNets (Pleiss et al. 2017;
torchvision's ``memory_efficient``) store only each layer's new feature map and
recompute the concatenation, BN-ReLU and bottleneck convolution in the backward
pass.

``run`` (called by ``Template.call`` in training) runs the template's own
functional graph, the same layers and weights, through an interpreter that
treats a dense block lazily:

* a block's ``Concatenate`` gives the list of its feature maps, not one tensor;
* a pre-activated ``FusionUnit`` (``model/fusion.py``) that reads it runs its
  branches as one segment, concat -> per branch (BN -> ReLU -> x gate factor ->
  temporal padding -> conv) -> sum, recomputed in the backward pass (``recompute``):
  only the feature maps and a few per-channel vectors are kept for it.  Batch
  statistics are per channel, so the moments of each feature map are computed
  once and shared by every BN of the block that reads it (the plain graph
  recomputes them in each BN); moving statistics are updated once per BN, outside
  the recomputed part, with Keras' formula.  The gates draw their noise and add
  their regulariser outside the segment, so the recomputation sees the same
  sample.

Any other consumer of a pending value gets it materialised.  Outputs and
gradients equal the plain graph's up to float rounding (tests/test_memory.py).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from stfusion_tf.model.fusion import FusionUnit

_AXES = [0, 1, 2, 3]


class _Features:
    """A dense block's concatenation, kept as the list of its feature maps."""

    def __init__(self, parts):
        self.parts = list(parts)


def _plain_bn(layer) -> bool:
    return (isinstance(layer, keras.layers.BatchNormalization) and layer.axis in (-1, 4)
            and layer.center and layer.scale and not layer.renorm)


def _recomputable(op, x, training) -> bool:
    """A pre-activated, template or fixed fusion unit reading a dense block's features."""
    return (isinstance(op, FusionUnit) and isinstance(x, _Features) and bool(training)
            and op.preactivation and not op.return_keep
            and all(_plain_bn(bn) and bn.trainable for _, bn, *_ in op.branches))


class _Interpreter:
    """The ``operation_fn`` of ``Function._run_through_graph`` for one training call."""

    def __init__(self, training):
        self.training = training
        self.moments = {}  # (tensor ref(s), synchronized[, "part"]) -> (mean, variance), float32
        self.affine = {}  # id(bn) -> (scale, offset), float32

    def operation_fn(self, op):
        def call(*args, **kwargs):
            return self.dispatch(op, args, kwargs)
        return call

    def dispatch(self, op, args, kwargs):
        x = args[0] if args else None
        if isinstance(op, keras.layers.Concatenate) and op.axis in (-1, 4) and \
                all(isinstance(t, _Features) or tf.is_tensor(t) for t in x):
            return _Features([p for t in x for p in (t.parts if isinstance(t, _Features) else [t])])
        if _recomputable(op, x, self.training):
            return self.segment(op, x)
        args, kwargs = tf.nest.map_structure(self.materialise, (args, kwargs))
        if "training" in getattr(op, "_call_context_args", ()) and self.training is not None:
            kwargs["training"] = self.training
        return op(*args, **kwargs)

    # -- values -----------------------------------------------------------------------
    def materialise(self, value):
        return _concat(value.parts) if isinstance(value, _Features) else value

    def part_moments(self, part, synchronized: bool):
        key = (part.ref(), synchronized, "part")
        if key not in self.moments:
            self.moments[key] = keras.ops.moments(tf.cast(part, tf.float32), _AXES,
                                                  synchronized=synchronized)
        return self.moments[key]

    def block_moments(self, parts: tuple, synchronized: bool):
        """Per-channel (mean, variance) of concat(parts): the moments of parts[:-1] (as the
        previous dense layer read them) with those of the newest part appended, so a
        block of L layers builds L two-way concatenations, not L^2/2 inputs' worth (each
        input of a concatenation is a slice op in the gradient)."""
        key = (tuple(p.ref() for p in parts), synchronized)
        if key not in self.moments:
            mean, variance = self.part_moments(parts[-1], synchronized)
            if len(parts) > 1:
                head_mean, head_variance = self.block_moments(parts[:-1], synchronized)
                mean = tf.concat([head_mean, mean], 0)
                variance = tf.concat([head_variance, variance], 0)
            self.moments[key] = (mean, variance)
        return self.moments[key]

    def bn_affine(self, bn, features: _Features):
        """(scale, offset) with bn(x) = x * scale + offset, float32, per channel.

        The batch moments come from the feature maps' shared moments; the moving
        statistics are updated here, once per call, as ``BatchNormalization`` does.
        """
        if id(bn) in self.affine:
            return self.affine[id(bn)]
        mean, variance = self.block_moments(tuple(features.parts), bn.synchronized)
        bn.moving_mean.assign(bn.moving_mean * bn.momentum + mean * (1.0 - bn.momentum))
        bn.moving_variance.assign(bn.moving_variance * bn.momentum
                                  + variance * (1.0 - bn.momentum))
        # As tf.nn.batch_normalization: x * inv + (beta - mean * inv).
        scale = tf.math.rsqrt(variance + bn.epsilon) * tf.convert_to_tensor(bn.gamma)
        offset = tf.convert_to_tensor(bn.beta) - mean * scale
        self.affine[id(bn)] = (scale, offset)
        return scale, offset

    def segment(self, unit: FusionUnit, features: _Features):
        """sum_b conv_b(pad_b(relu(concat(parts) * scale_b + offset_b) * factor_b)) under
        ``recompute``.

        A gate factor is >= 0, so relu(z) * f = relu(z * f): it is folded into the
        BN scale and offset (per sample and channel), saving a pass over the tensor.
        """
        parts = features.parts
        args = list(parts)
        for _, bn, _, _, gate in unit.branches:
            scale, offset = self.bn_affine(bn, features)
            if gate is not None:
                factor = gate(parts[0], training=self.training, multiplier_only=True)
                scale, offset = scale * factor, offset * factor
            args += [scale, offset]

        def forward(x, *affine):
            out = None
            for i, (_, _, pad, conv, _) in enumerate(unit.branches):
                scale, offset = affine[2 * i], affine[2 * i + 1]
                z = tf.nn.relu(x * tf.cast(scale, x.dtype) + tf.cast(offset, x.dtype))
                if pad is not None:
                    z = pad(z)
                y = conv(z)
                out = y if out is None else out + y
            return out

        smallest = min(range(len(parts)), key=lambda i: parts[i].shape[-1])
        return recompute(forward, args, anchor=smallest, concat=len(parts))


def recompute(forward, args, anchor: int = 0, concat: int = 0):
    """``forward(*args)`` whose activations are recomputed in the backward pass.

    With ``concat=n`` forward gets the first n args concatenated on the last axis as its
    first argument; the backward pass splits that tensor's gradient back into the n
    parts with one op (the concatenation's own gradient is a slice per part: on the full
    template ~2,400 more ops to trace and optimise).

    ``tf.recompute_grad`` with less work: to order the recomputation after the incoming
    gradient (and, under XLA, to keep it from being merged with the forward pass) it adds
    a scalar that depends on the gradient to *every* input, a full copy of each of a
    dense block's feature maps; here it is added to ``args[anchor]`` only, which makes
    every recomputed op depend on the gradient all the same if every op of ``forward``
    reads it (the caller picks the smallest feature map that its concatenation reads;
    otherwise Grappler's or XLA's common-subexpression pass may merge the recomputation
    with the forward and keep the forward's tensors alive).
    """

    n = concat
    sizes = [int(a.shape[-1]) for a in args[:n]]

    def body(*tensors):
        return forward(_concat(tensors[:n]), *tensors[n:]) if n else forward(*tensors)

    @tf.custom_gradient
    def run(*xs):
        y = _unrecorded(body, xs)  # as tf.recompute_grad: no tape keeps the forward

        def grad(dy, variables=None):
            # 0, or NaN when dy's first element is: a value no compiler can fold away.
            first = tf.reshape(dy, [-1])[:1]
            dep = tf.where(tf.math.is_nan(first), tf.constant(float("nan"), first.dtype),
                           tf.zeros_like(first))
            with tf.GradientTape() as tape:
                inputs = list(xs)
                inputs[anchor] = xs[anchor] + tf.cast(dep, xs[anchor].dtype)
                if n:
                    inputs = [_concat(inputs[:n])] + inputs[n:]
                tape.watch(inputs)
                y2 = forward(*inputs)
            variables = list(variables or [])
            grads = tape.gradient(y2, inputs + variables, output_gradients=dy)
            grads = [tf.zeros_like(v) if g is None else g for g, v in
                     zip(grads, inputs + variables)]
            if n:
                grads = (tf.split(grads[0], sizes, axis=-1) if n > 1 else grads[:1]) + grads[1:]
            return grads[:len(xs)], grads[len(xs):]

        return y, grad

    return run(*args)


def _unrecorded(fn, xs):
    from tensorflow.python.eager import record  # what tf.recompute_grad uses; no public API
    with record.stop_recording():
        return fn(*xs)


def _concat(parts):
    parts = list(parts)
    return parts[0] if len(parts) == 1 else tf.concat(parts, -1)


def run(model, inputs, training):
    """The output of ``model`` (a functional Template) on ``inputs`` in training,
    with memory-efficient dense layers."""
    inputs = model._standardize_inputs(inputs)
    outputs = model._run_through_graph(inputs, operation_fn=_Interpreter(training).operation_fn)
    return outputs[0] if isinstance(outputs, (list, tuple)) and len(outputs) == 1 else outputs
