"""The training loss and metrics, one definition for ``model.fit`` and the multi-worker loop.

Integer labels (the paper's recipe) train with sparse cross-entropy.  Soft
labels (label smoothing, mixup / cutmix: one-hot rows that sum to 1) train with
Keras' categorical cross-entropy, which applies ``label_smoothing`` itself:
y' = (1 - e) y + e / classes.  Accuracy compares the prediction with the
label's largest entry (for a mixed clip, its larger part).
"""

from __future__ import annotations

import keras


def make_loss(soft: bool, label_smoothing: float = 0.0, reduction="sum_over_batch_size"):
    if soft:
        return keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=label_smoothing, reduction=reduction)
    if label_smoothing:
        raise ValueError("label smoothing needs soft (one-hot) labels")
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction)


def per_example(loss):
    """The same loss without reduction (one value per example)."""
    return loss.__class__.from_config({**loss.get_config(), "reduction": None})


def is_soft(loss) -> bool:
    return isinstance(loss, keras.losses.CategoricalCrossentropy)


def make_metrics(soft: bool) -> list:
    """``cross_entropy`` (against the labels as given, no smoothing) and ``accuracy``."""
    if soft:
        return [keras.metrics.CategoricalCrossentropy(from_logits=True, name="cross_entropy"),
                keras.metrics.CategoricalAccuracy(name="accuracy")]
    return [keras.metrics.SparseCategoricalCrossentropy(from_logits=True, name="cross_entropy"),
            keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
