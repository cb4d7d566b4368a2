"""Evaluation protocols: named views per video, chunked per clip, labelled results."""

import numpy as np
import pytest
import tensorflow as tf

from stfusion_tf import evaluation
from stfusion_tf.data import pipeline
from stfusion_tf.errors import UserError
from stfusion_tf.model import template as T


def test_named_protocols_fix_clips_crops_and_the_full_frame_crop():
    base = pipeline.InputConfig(num_frames=16, crop_size=224, min_short_side=256,
                                max_short_side=256, eval_short_side=256)
    assert (base.num_clips, base.num_crops, base.eval_crop) == (1, 1, 224)  # custom default
    views = {}
    for name in ("authors", "paper", "10x3"):
        cfg = pipeline.with_protocol(base, name)
        views[name] = (cfg.num_clips, cfg.num_crops, cfg.eval_crop)
        label = pipeline.protocol(cfg)["label"]
        assert label.startswith(f"{name}: 16 frames") and "256x256 (short side 256)" in label
    assert views == {"authors": (1, 1, 256), "paper": (2, 1, 256), "10x3": (10, 3, 256)}
    assert "2 clips x 1 crop of 256x256" in pipeline.protocol(
        pipeline.with_protocol(base, "paper"))["label"]
    custom = pipeline.InputConfig(num_clips=4, num_crops=3, eval_crop_size=36)
    assert pipeline.protocol(custom)["label"] == (
        "custom: 8 frames (stride 1) x 4 clips x 3 crops of 36x36 (short side 40)")
    with pytest.raises(UserError, match="eval_crop_size=48 must be at most eval_short_side=40"):
        pipeline.InputConfig(eval_crop_size=48)
    with pytest.raises(UserError, match="valid values: authors, paper, 10x3, custom"):
        pipeline.InputConfig(eval_protocol="5x5")


def test_10x3_views_are_made_one_clip_at_a_time_and_stay_grouped(motion_dir):
    cfg = pipeline.InputConfig(eval_protocol="10x3", batch_size=7)  # 8 frames, 40x40 frames
    assert (cfg.num_views, cfg.eval_crop) == (30, 40)
    ds = pipeline.eval_dataset(motion_dir, "val", cfg)
    assert ds.element_spec[0].shape[1:] == (8, 40, 40, 3)
    xs, ys, vs = [], [], []
    for x, y, v in ds:
        xs.append(x.numpy())
        ys.extend(y.numpy())
        vs.extend(v.numpy())
    xs, vs, ys = np.concatenate(xs), np.array(vs), np.array(ys)
    assert len(vs) == 16 * 30
    for vid in range(16):
        assert np.sum(vs == vid) == 30 and len(set(ys[vs == vid])) == 1
    # Video 0's 30 views are its 10 clips' 3 crops each, in order.
    record = next(iter(tf.data.TFRecordDataset(pipeline.records.shard_paths(motion_dir, "val"))))
    enc, _, _ = pipeline.parse_clip(record)
    clips = tf.reshape(pipeline.sample_frames(enc, cfg, training=False), [10, 8])
    want = np.concatenate([pipeline.preprocess_eval_clip(c, cfg).numpy() for c in clips])
    np.testing.assert_array_equal(xs[vs == 0], want)


def test_streamed_accuracy_equals_the_one_shot_computation_and_carries_the_protocol(motion_dir):
    rng = np.random.default_rng(0)
    scores = rng.dirichlet(np.ones(7), size=60)
    vids = np.repeat(np.arange(20), 3)
    labels = np.repeat(rng.integers(0, 7, 20), 3)
    acc = evaluation.Accumulator()
    for i in range(0, 60, 8):  # batches that cut videos in two
        acc.update(scores[i:i + 8], labels[i:i + 8], vids[i:i + 8])
    video_scores = scores.reshape(20, 3, 7).sum(1)
    assert acc.result() == pytest.approx({
        "clip_top1": evaluation.topk_accuracy(scores, labels, 1),
        "clip_top5": evaluation.topk_accuracy(scores, labels, 5),
        "video_top1": evaluation.topk_accuracy(video_scores, labels[::3], 1),
        "video_top5": evaluation.topk_accuracy(video_scores, labels[::3], 5),
        "num_views": 60, "num_videos": 20})
    # A template trained on 32x32 crops scores the full 40x40 frames of "authors".
    cfg = pipeline.InputConfig(eval_protocol="authors", batch_size=8)
    model = T.build_template(T.preset("tiny"), 4)
    result = evaluation.evaluate(model, pipeline.eval_dataset(motion_dir, "test", cfg),
                                 protocol=pipeline.protocol(cfg))
    assert result["protocol"]["name"] == "authors" and result["protocol"]["crop_size"] == 40
    assert result["num_views"] == result["num_videos"] == 16
