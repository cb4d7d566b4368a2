"""Clip- and video-level top-1/top-5 accuracy from a clip classifier."""

from __future__ import annotations

import numpy as np


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    if len(labels) == 0:
        return float("nan")
    k = min(k, scores.shape[1])
    topk = np.argsort(-scores, axis=1)[:, :k]
    return float(np.mean(np.any(topk == labels[:, None], axis=1)))


def summarise(clip_scores: np.ndarray, labels: np.ndarray, video_ids: np.ndarray) -> dict:
    """Accuracies from per-view softmax scores; video scores are view averages."""
    clip_scores = np.asarray(clip_scores, np.float64)
    labels = np.asarray(labels)
    video_ids = np.asarray(video_ids)
    uniq, inverse = np.unique(video_ids, return_inverse=True)
    video_scores = np.zeros((len(uniq), clip_scores.shape[1]))
    np.add.at(video_scores, inverse, clip_scores)
    video_labels = np.zeros(len(uniq), labels.dtype)
    video_labels[inverse] = labels
    return {
        "clip_top1": topk_accuracy(clip_scores, labels, 1),
        "clip_top5": topk_accuracy(clip_scores, labels, 5),
        "video_top1": topk_accuracy(video_scores, video_labels, 1),
        "video_top5": topk_accuracy(video_scores, video_labels, 5),
        "num_views": int(len(labels)),
        "num_videos": int(len(uniq)),
    }


def predict_views(predict_fn, dataset, total_views: int | None = None, progress_stream=None):
    """Runs ``predict_fn(clips) -> logits`` over an eval dataset of (clips, labels, vid).

    With ``progress_stream`` a progress line (views/s, ETA) is written there.
    """
    import tensorflow as tf
    from stfusion_tf.progress import Progress
    prog = Progress(total_views or 0, "eval", progress_stream) if progress_stream else None
    scores, labels, vids = [], [], []
    for clips, y, v in dataset:
        scores.append(tf.nn.softmax(predict_fn(clips), axis=-1).numpy())
        labels.append(y.numpy())
        vids.append(v.numpy())
        if prog:
            prog.update_many(len(labels[-1]))
    if not scores:
        raise ValueError("evaluation split is empty")
    return np.concatenate(scores), np.concatenate(labels), np.concatenate(vids)


def evaluate(model, dataset, total_views: int | None = None, progress_stream=None) -> dict:
    """Video-level and clip-level accuracy of a Keras model on an eval dataset."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def fwd(x):
        return model(x, training=False)

    return summarise(*predict_views(fwd, dataset, total_views, progress_stream))
