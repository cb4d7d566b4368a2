"""Classifier dropout that is on in one training phase and off in the other.

The authors train the warm-up with dropout 0.5 before the classifier and the
v-DropPath phase with none (digest §4).  A Keras ``Dropout`` has its rate fixed
in the graph; ``PhaseDropout`` keeps whether it acts in a non-trainable
variable, so the switch between phases is an assignment (no rebuild, no
retrace) and, being a model variable, survives checkpoints and saving.
"""

from __future__ import annotations

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="stfusion_tf")
class PhaseDropout(keras.layers.Layer):
    """Dropout of ``rate`` in training while ``active`` is 1; the identity otherwise."""

    def __init__(self, rate: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
        self.rate, self.seed = float(rate), seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        self.active = self.add_weight(name="active", shape=(), dtype="int32",
                                      initializer="ones", trainable=False)
        self.built = True

    def call(self, x, training=None):
        if not training or self.rate == 0.0:
            return x
        on = tf.equal(tf.convert_to_tensor(self.active), 1)
        return tf.cond(on, lambda: keras.random.dropout(x, self.rate, seed=self.seed_generator),
                       lambda: tf.identity(x))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


def dropout_layers(model) -> list[PhaseDropout]:
    return [l for l in model._flatten_layers(include_self=False, recursive=True)
            if isinstance(l, PhaseDropout)]


def set_active(model, active: bool) -> None:
    for layer in dropout_layers(model):
        layer.active.assign(1 if active else 0)
