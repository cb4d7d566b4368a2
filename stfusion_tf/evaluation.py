"""Clip- and video-level top-1/top-5 accuracy from a clip classifier.

Clip-level accuracy scores every view (one clip, one crop) alone; video-level
accuracy averages the softmax scores of a video's views.  Both depend on the
evaluation protocol (frames, clips, crops, crop size: ``pipeline.protocol``),
which every result of ``evaluate`` carries.  Scores are accumulated batch by
batch: memory grows with videos x classes, not with views.
"""

from __future__ import annotations

import numpy as np


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    if len(labels) == 0:
        return float("nan")
    k = min(k, scores.shape[1])
    topk = np.argsort(-scores, axis=1)[:, :k]
    return float(np.mean(np.any(topk == labels[:, None], axis=1)))


def _hits(scores: np.ndarray, labels: np.ndarray, k: int) -> int:
    k = min(k, scores.shape[1])
    topk = np.argsort(-scores, axis=1)[:, :k]
    return int(np.sum(np.any(topk == labels[:, None], axis=1)))


class Accumulator:
    """Clip- and video-level accuracy over batches of per-view softmax scores."""

    def __init__(self):
        self.views = self.hits1 = self.hits5 = 0
        self.video_sums: dict[int, np.ndarray] = {}
        self.video_labels: dict[int, int] = {}

    def update(self, scores, labels, video_ids) -> None:
        scores = np.asarray(scores, np.float64)
        labels, video_ids = np.asarray(labels), np.asarray(video_ids)
        self.views += len(labels)
        self.hits1 += _hits(scores, labels, 1)
        self.hits5 += _hits(scores, labels, 5)
        for vid in np.unique(video_ids):
            rows = video_ids == vid
            vid = int(vid)
            if vid not in self.video_sums:
                self.video_sums[vid] = np.zeros(scores.shape[1])
                self.video_labels[vid] = int(labels[rows][0])
            self.video_sums[vid] += scores[rows].sum(axis=0)

    def result(self) -> dict:
        if not self.views:
            raise ValueError("evaluation split is empty")
        ids = sorted(self.video_sums)
        video_scores = np.stack([self.video_sums[i] for i in ids])
        video_labels = np.array([self.video_labels[i] for i in ids])
        return {
            "clip_top1": self.hits1 / self.views,
            "clip_top5": self.hits5 / self.views,
            "video_top1": topk_accuracy(video_scores, video_labels, 1),
            "video_top5": topk_accuracy(video_scores, video_labels, 5),
            "num_views": int(self.views),
            "num_videos": len(ids),
        }


def summarise(clip_scores: np.ndarray, labels: np.ndarray, video_ids: np.ndarray) -> dict:
    """Accuracies from per-view softmax scores; video scores are view averages."""
    acc = Accumulator()
    acc.update(clip_scores, labels, video_ids)
    return acc.result()


def evaluate(model, dataset, total_views: int | None = None, progress_stream=None,
             protocol: dict | None = None) -> dict:
    """Video-level and clip-level accuracy of a Keras model on an eval dataset of
    (clips, labels, video index); ``protocol`` (``pipeline.protocol``) is put in the
    result.  With ``progress_stream`` a progress line (views/s, ETA) is written there."""
    import tensorflow as tf
    from stfusion_tf.progress import Progress

    @tf.function(reduce_retracing=True)
    def fwd(x):
        return tf.nn.softmax(model(x, training=False), axis=-1)

    prog = Progress(total_views or 0, "eval", progress_stream) if progress_stream else None
    acc = Accumulator()
    for clips, y, v in dataset:
        acc.update(fwd(clips).numpy(), y.numpy(), v.numpy())
        if prog:
            prog.update_many(int(y.shape[0]))
    result = acc.result()
    return {"protocol": protocol, **result} if protocol is not None else result
