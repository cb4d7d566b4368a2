"""Clip- and video-level top-1/top-5 accuracy from a clip classifier; per-class
accuracy and the confusion matrix (video level) with their chart.

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
    return _hits(scores, labels, k) / len(labels)


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
        video_scores, video_labels = self.video_arrays()
        return {
            "clip_top1": self.hits1 / self.views,
            "clip_top5": self.hits5 / self.views,
            "video_top1": topk_accuracy(video_scores, video_labels, 1),
            "video_top5": topk_accuracy(video_scores, video_labels, 5),
            "num_views": int(self.views),
            "num_videos": len(video_labels),
        }

    def video_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(summed view scores [V, C], labels [V]) of the videos seen, by video id."""
        ids = sorted(self.video_sums)
        return (np.stack([self.video_sums[i] for i in ids]),
                np.array([self.video_labels[i] for i in ids], np.int64))

    def classes(self, label_map) -> dict:
        """Per-class accuracy and the confusion matrix at video level (``class_report``)."""
        return _class_report(*self.video_arrays(), label_map)


def summarise(clip_scores: np.ndarray, labels: np.ndarray, video_ids: np.ndarray) -> dict:
    """Accuracies from per-view softmax scores; video scores are view averages."""
    acc = Accumulator()
    acc.update(clip_scores, labels, video_ids)
    return acc.result()


def class_report(clip_scores, labels, video_ids, label_map) -> dict:
    """Per-class accuracy and the confusion matrix at video level (rows: true class,
    columns: predicted class, counts of videos), as ``topk_accuracy`` picks top-1."""
    acc = Accumulator()
    acc.update(clip_scores, labels, video_ids)
    return acc.classes(label_map)


def _class_report(scores: np.ndarray, truth: np.ndarray, label_map) -> dict:
    n = len(label_map)
    pred = np.argsort(-scores, axis=1)[:, 0]
    cm = np.zeros((n, n), np.int64)
    np.add.at(cm, (truth, pred), 1)
    rows = []
    for i, name in enumerate(label_map):
        videos = int(cm[i].sum())
        wrong = cm[i].copy()
        wrong[i] = 0
        rows.append({"index": i, "class": name, "videos": videos, "correct": int(cm[i, i]),
                     "accuracy": float(cm[i, i] / videos) if videos else None,
                     "confused_with": label_map[int(np.argmax(wrong))] if wrong.any() else None})
    seen = [r["accuracy"] for r in rows if r["videos"]]
    return {"level": "video", "num_videos": int(len(truth)), "labels": list(label_map),
            "accuracy": float(np.trace(cm) / max(1, len(truth))),
            "mean_class_accuracy": float(np.mean(seen)) if seen else float("nan"),
            "per_class": rows, "confusion_matrix": cm.tolist()}


def worst_classes(report: dict, k: int = 10) -> list[dict]:
    """The ``k`` classes with the lowest accuracy (classes with videos; ties: more videos first)."""
    rows = [r for r in report["per_class"] if r["videos"]]
    return sorted(rows, key=lambda r: (r["accuracy"], -r["videos"], r["index"]))[:k]


def plot_confusion(report: dict, title: str = "confusion matrix") -> bytes:
    """PNG of the row-normalised confusion matrix (each true class sums to 1)."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cm = np.asarray(report["confusion_matrix"], np.float64)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    n = len(cm)
    side = min(12.0, max(3.5, 0.25 * n + 2))
    fig, ax = plt.subplots(figsize=(side, side), dpi=100)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if n <= 40:
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.set_xticklabels(report["labels"], rotation=90, fontsize=6)
        ax.set_yticklabels(report["labels"], fontsize=6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9, loc="left")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def evaluate(model, dataset, total_views: int | None = None, progress_stream=None,
             protocol: dict | None = None, label_map=None, jit_compile: bool = False) -> dict:
    """Video-level and clip-level accuracy of a Keras model on an eval dataset of
    (clips, labels, video index); ``protocol`` (``pipeline.protocol``) is put in the
    result, and with ``label_map`` the per-class report (``class_report``) under
    ``"classes"``.  With ``progress_stream`` a progress line (views/s, ETA) is written
    there.  ``jit_compile``: XLA for the forward pass (``compute.resolve_jit``).

    The network sees one batch of views at a time (``pipeline.eval_dataset``
    flattens the views of every video into batches) in the current precision
    policy, so its memory does not grow with the number of views per video.
    """
    import tensorflow as tf
    from stfusion_tf.progress import Progress

    @tf.function(reduce_retracing=True, jit_compile=jit_compile)
    def fwd(x):
        return tf.nn.softmax(tf.cast(model(x, training=False), tf.float32), axis=-1)

    prog = Progress(total_views or 0, "eval", progress_stream) if progress_stream else None
    acc = Accumulator()
    for clips, y, v in dataset:
        acc.update(fwd(clips).numpy(), y.numpy(), v.numpy())
        if prog:
            prog.update_many(int(y.shape[0]))
    result = acc.result()
    if label_map is not None:
        result["classes"] = acc.classes(label_map)
    return {"protocol": protocol, **result} if protocol is not None else result
