"""Clip-level augmentation from Model Garden's ``official.vision.ops.augment``:
RandAugment with one draw per clip, and mixup / cutmix with one mixing per clip.

* ``randaugment_clip``: Model Garden's ``RandAugment`` applied to the whole
  clip tensor [T, H, W, 3]: the ops, their magnitudes and geometric parameters
  are drawn once and every frame gets the same transform.  Its ``Cutout`` op is
  left out: on a 4D tensor it calls ``cutout_video``, which blanks a box over a
  random run of frames only, so frames would differ.
* ``ClipMixer``: Model Garden's ``MixupAndCutmix`` on a batch of clips
  [B, T, H, W, 3]: clip i is mixed with clip B-1-i with its own lambda (mixup:
  a weighted sum of the two clips; cutmix: one box, the same in every frame,
  pasted from the partner); the batch uses mixup or cutmix (each with
  probability 1/2 when both are on).  Labels become soft: lambda times one
  class plus (1 - lambda) times the other, summing to 1.  One change to Model
  Garden's cutmix: its label weight is 1 - box area / frame area with the box
  area before clipping to the frame, so a box that crosses the border gave
  labels that do not match the pixels; here the weight is the clipped area's.
  Label smoothing is left to the loss (smoothing commutes with mixing).
"""

from __future__ import annotations

import tensorflow as tf
from official.vision.ops import augment

#: RandAugment ops that would transform frames of one clip differently.
RANDAUGMENT_EXCLUDED = ("Cutout",)


def parse_randaugment(spec: str) -> tuple[int, float] | None:
    """``"N,M"`` -> (N ops per clip, magnitude M); ``""`` -> None."""
    if not spec:
        return None
    try:
        n, m = spec.split(",")
        n, m = int(n), float(m)
    except ValueError:
        raise ValueError(f"randaugment={spec!r} must be N,M (ops per clip, magnitude), "
                         "e.g. 2,9") from None
    if n < 1 or not 0 <= m <= 30:
        raise ValueError(f"randaugment={spec!r}: N must be >= 1 and M in [0, 30]")
    return n, m


def randaugment_clip(frames, num_layers: int, magnitude: float):
    """RandAugment of one clip [T, H, W, 3] uint8, the same transform for every frame."""
    ra = augment.RandAugment(num_layers=num_layers, magnitude=magnitude,
                             exclude_ops=list(RANDAUGMENT_EXCLUDED))
    return ra.distort(frames)


class ClipMixer(augment.MixupAndCutmix):
    """Mixup / cutmix of a batch of clips (see the module docstring).

    Call with (clips [B, T, H, W, 3], labels [B] int); returns (float32 clips,
    soft labels [B, num_classes]).
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0):
        if not (mixup_alpha > 0 or cutmix_alpha > 0):
            raise ValueError("ClipMixer needs mixup_alpha > 0 or cutmix_alpha > 0")
        super().__init__(num_classes, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
                         label_smoothing=0.0)

    def __call__(self, clips, labels):
        clips = tf.cast(clips, tf.float32)
        if clips.shape.rank != 5:
            raise ValueError(f"ClipMixer needs clips [B, T, H, W, 3], got rank {clips.shape.rank}")
        return self.distort(clips, labels)

    def _cutmix(self, images, labels):
        lam = self._sample_from_beta(self.cutmix_alpha, self.cutmix_alpha, tf.shape(labels))
        ratio = tf.math.sqrt(1.0 - lam)
        shape = tf.shape(images)
        batch, height, width = shape[0], shape[2], shape[3]
        cut_h = tf.cast(ratio * tf.cast(height, tf.float32), tf.int32)
        cut_w = tf.cast(ratio * tf.cast(width, tf.float32), tf.int32)
        cy = tf.random.uniform([batch], 0, height, dtype=tf.int32)
        cx = tf.random.uniform([batch], 0, width, dtype=tf.int32)
        # The box _fill_rectangle_video pastes, clipped to the frame.
        box_h = tf.minimum(height, cy + cut_h // 2) - tf.maximum(0, cy - cut_h // 2)
        box_w = tf.minimum(width, cx + cut_w // 2) - tf.maximum(0, cx - cut_w // 2)
        lam = 1.0 - tf.cast(box_h * box_w, tf.float32) / tf.cast(height * width, tf.float32)
        images = tf.map_fn(
            lambda x: augment._fill_rectangle_video(*x),  # pylint: disable=protected-access
            (images, cx, cy, cut_w // 2, cut_h // 2, tf.reverse(images, [0])),
            fn_output_signature=tf.TensorSpec(images.shape[1:], dtype=images.dtype))
        return images, labels, lam
