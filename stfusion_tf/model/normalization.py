"""Input normalisation inside the network, so the input pipeline ships raw pixels.

Clips enter every network as float32 pixel values in [0, 255]; the first layer
applies the ImageNet mean/std of the authors' code.  Doing it in the model
(on the accelerator, once per batch) instead of in ``tf.data`` roughly doubles
the clips/s the CPU input pipeline can deliver (benchmarks/input_pipeline.py).
"""

from __future__ import annotations

import keras
import tensorflow as tf

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
