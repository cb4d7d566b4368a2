"""Input normalisation inside the network, so the input pipeline ships raw pixels.

Clips enter every network as float32 pixel values in [0, 255]; the first layer
applies the ImageNet mean/std of the authors' code.  Doing it in the model
(on the accelerator, once per batch) instead of in ``tf.data`` roughly doubles
the clips/s the CPU input pipeline can deliver (benchmarks/input_pipeline.py).
"""

from __future__ import annotations

import keras
import tensorflow as tf
from tensorflow.python.ops import control_flow_util

MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@keras.saving.register_keras_serializable(package="stfusion_tf")
class PixelNormalization(keras.layers.Layer):
    """(x - mean) / std per RGB channel of [..., 3] pixel values.

    Written as a 1x1 convolution with a diagonal kernel plus ``bias_add``: on CPU
    this is about 2x faster than broadcasting a 3-vector.
    """

    def __init__(self, mean=MEAN_RGB, stddev=STDDEV_RGB, **kwargs):
        super().__init__(**kwargs)
        self.mean = tuple(float(m) for m in mean)
        self.stddev = tuple(float(s) for s in stddev)

    def call(self, x):
        x = tf.cast(x, tf.float32)
        kernel = tf.linalg.diag(tf.constant([1.0 / s for s in self.stddev], tf.float32))
        offset = tf.constant([-m / s for m, s in zip(self.mean, self.stddev)], tf.float32)
        shape = tf.shape(x)
        flat = tf.reshape(x, tf.concat([[-1], shape[-3:]], 0))  # conv2d wants rank 4
        y = tf.nn.bias_add(tf.nn.conv2d(flat, tf.reshape(kernel, [1, 1, 3, 3]), 1, "VALID"), offset)
        return tf.cast(tf.reshape(y, shape), self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mean": self.mean, "stddev": self.stddev}


@keras.saving.register_keras_serializable(package="stfusion_tf")
class BatchNorm(keras.layers.BatchNormalization):
    """Keras ``BatchNormalization`` computed by one ``FusedBatchNormV3`` op.

    Same weights, config and statistics as Keras' layer: the moving variance takes
    the biased batch variance, as Keras' does (the fused op returns the unbiased one,
    corrected here by (n-1)/n).  Keras' layer builds ~25 ops per call and ~25 more for
    their gradients; the fused op is one each way, which on the full template is
    ~9,000 fewer ops to trace and optimise (start-up time and the memory of the
    graph) and a faster step (``docs/benchmarks.md``); 5-D inputs run as 4-D, where
    oneDNN takes over on CPU (``_as_4d``).  Synchronised, renormalised,
    masked or non-channels-last calls, and ranks other than 4 and 5, fall back to
    Keras' own computation.
    """

    def _fusable(self, inputs, mask) -> bool:
        rank = len(inputs.shape)
        return (rank in (4, 5) and self.axis in (-1, rank - 1) and mask is None
                and not self.synchronized and not self.renorm
                and keras.backend.backend() == "tensorflow"
                and inputs.dtype in (tf.float32, tf.bfloat16, tf.float16))

    def call(self, inputs, training=None, mask=None):
        if not self._fusable(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        channels = inputs.shape[-1]
        inputs, shape5 = _as_4d(inputs)
        fmt = "NDHWC" if len(inputs.shape) == 5 else "NHWC"
        gamma = (tf.cast(self.gamma, tf.float32) if self.scale else tf.ones([channels]))
        beta = (tf.cast(self.beta, tf.float32) if self.center else tf.zeros([channels]))
        x = tf.cast(inputs, self.compute_dtype)  # no op when it already is
        if training and self.trainable:
            y, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
                x=x, scale=gamma, offset=beta, mean=tf.zeros([0]), variance=tf.zeros([0]),
                epsilon=self.epsilon, exponential_avg_factor=1.0, data_format=fmt,
                is_training=True)
            n = x.shape[:-1].num_elements()
            if n is None:
                n = tf.cast(tf.size(x, out_type=tf.int64) // channels, tf.float32)
                variance = variance * ((n - 1.0) / tf.maximum(n, 1.0))
            else:
                variance = variance * ((n - 1.0) / max(n, 1))
            # moving <- moving * momentum + batch * (1 - momentum), as Keras' layer.
            rate = 1.0 - self.momentum
            _assign_sub(self.moving_mean, (self.moving_mean - mean) * rate)
            _assign_sub(self.moving_variance, (self.moving_variance - variance) * rate)
        else:
            y = tf.raw_ops.FusedBatchNormV3(
                x=x, scale=gamma, offset=beta, mean=tf.cast(self.moving_mean, tf.float32),
                variance=tf.cast(self.moving_variance, tf.float32), epsilon=self.epsilon,
                data_format=fmt, is_training=False)[0]
        return y if shape5 is None else tf.reshape(y, shape5)


def _as_4d(x):
    """(N,D*H,W,C view of a 5-D x, the shape to restore) or (x, None).

    Per-channel statistics do not see how the other axes are laid out, and oneDNN's
    layout pass rewrites only the 4-D FusedBatchNormV3 and its gradient: ~2x faster than
    the Eigen kernels of the 5-D op on CPU (docs/benchmarks.md).  The reshape is free.
    Not under XLA, which gains nothing from it and whose expansion of the reshaped op
    moved the tiny template's gradients by ~1e-3 of their scale (tests/test_memory.py)."""
    if len(x.shape) != 5 or control_flow_util.GraphOrParentsInXlaContext(
            tf.compat.v1.get_default_graph()):
        return x, None
    if None in x.shape[1:]:
        shape = tf.shape(x)
        return tf.reshape(x, tf.stack([-1, shape[1] * shape[2], shape[3], shape[4]])), shape
    _, d, h, w, c = x.shape
    return tf.reshape(x, [-1, d * h, w, c]), [-1, d, h, w, c]


def _assign_sub(variable, delta) -> None:
    """``variable -= delta`` as one ``AssignSubVariableOp`` (Keras' ``assign_sub`` reads,
    subtracts and assigns: ~700 more ops on the full template); Keras' own path under a
    distribution strategy (its aggregation) or a stateless scope (no tf.Variable)."""
    value = variable.value
    if isinstance(value, tf.Variable) and not tf.distribute.has_strategy():
        value.assign_sub(tf.cast(delta, value.dtype), read_value=False)
    else:
        variable.assign_sub(delta)
