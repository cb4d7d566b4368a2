"""Clip augmentation: one transform for every frame of a clip, labels consistent with pixels."""

import numpy as np
import pytest
import tensorflow as tf

from stfusion_tf.data import augment, pipeline, records


def _same_frames(clip) -> bool:
    clip = np.asarray(clip)
    return all(np.array_equal(clip[0], f) for f in clip[1:])


def test_randaugment_draws_once_per_clip():
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (24, 24, 3), dtype=np.uint8) for _ in range(2))
    tf.random.set_seed(1)
    changed = 0
    for _ in range(30):
        out = augment.randaugment_clip(tf.constant(np.stack([a, b] * 3)), 2, 9).numpy()
        # Frames that were equal stay equal: every frame got the same ops and parameters.
        assert _same_frames(out[0::2]) and _same_frames(out[1::2])
        changed += not np.array_equal(out[0], a)
    assert changed >= 10  # and it does augment
    assert augment.parse_randaugment("2,9") == (2, 9.0) and augment.parse_randaugment("") is None
    with pytest.raises(ValueError, match="N,M"):
        augment.parse_randaugment("2")


def test_randaugment_in_the_training_pipeline_keeps_a_still_clip_still():
    frame = np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    encoded = tf.constant([records.encode_jpeg(frame)] * 12)
    cfg = pipeline.InputConfig(randaugment="3,10")
    plain = pipeline.preprocess_train(encoded, pipeline.InputConfig())
    assert plain.dtype == tf.uint8 and _same_frames(plain)
    outs = [pipeline.preprocess_train(encoded, cfg).numpy() for _ in range(8)]
    assert all(_same_frames(o) and o.shape == (8, 32, 32, 3) for o in outs)


def _constant_batch(values, shape=(3, 16, 16, 3)):
    return tf.constant(np.stack([np.full(shape, v, np.float32) for v in values]))


@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_mixing_is_one_per_clip_and_labels_match_the_pixels(mode):
    values = np.array([10.0, 60.0, 110.0, 160.0])
    partner = values[::-1]
    mixer = augment.ClipMixer(5, mixup_alpha=0.8 if mode == "mixup" else 0.0,
                              cutmix_alpha=1.0 if mode == "cutmix" else 0.0)
    tf.random.set_seed(3)
    weights = []
    for _ in range(10):
        clips, labels = mixer(_constant_batch(values), tf.constant([0, 1, 2, 3]))
        clips, labels = clips.numpy(), labels.numpy()
        np.testing.assert_allclose(labels.sum(1), 1.0, atol=1e-6)
        assert labels[:, 4].max() == 0  # only the two mixed classes
        for i in range(4):
            own = labels[i, i] if i != 3 - i else 1.0
            assert all(np.array_equal(clips[i, 0], f) for f in clips[i])  # every frame alike
            if mode == "mixup":
                # One lambda for the whole clip: every pixel is lambda * own + (1 - lambda) * other.
                np.testing.assert_allclose(clips[i], own * values[i] + (1 - own) * partner[i],
                                           rtol=1e-5)
            else:
                # The label weight of the clip's own class is the share of its own pixels.
                share = np.mean(clips[i] == values[i])
                assert set(np.unique(clips[i])) <= {values[i], partner[i]}
                assert share == pytest.approx(own, abs=1e-6)
            weights.append(own)
    assert min(weights) < 0.9  # clips were mixed

def test_training_batches_carry_soft_labels(motion_dir):
    cfg = pipeline.InputConfig(batch_size=4, mixup_alpha=0.4, cutmix_alpha=1.0)
    x, y = next(iter(pipeline.train_dataset(motion_dir, "train", cfg)))
    assert x.dtype == tf.float32 and y.shape == (4, 4)
    np.testing.assert_allclose(y.numpy().sum(1), 1.0, atol=1e-6)
    x, y = next(iter(pipeline.train_dataset(motion_dir, "train", pipeline.InputConfig(batch_size=4),
                                            one_hot=True)))
    assert x.dtype == tf.uint8 and set(np.unique(y.numpy())) == {0.0, 1.0}
    with pytest.raises(ValueError, match="must be >= 0"):
        pipeline.InputConfig(mixup_alpha=-1.0)
