"""Clip- and video-level top-1/top-5 accuracy from a clip classifier; per-class
accuracy and the confusion matrix (video level) with their chart."""

from __future__ import annotations

import numpy as np


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    if len(labels) == 0:
        return float("nan")
    k = min(k, scores.shape[1])
    topk = np.argsort(-scores, axis=1)[:, :k]
    return float(np.mean(np.any(topk == labels[:, None], axis=1)))


def video_scores(clip_scores: np.ndarray, labels: np.ndarray, video_ids: np.ndarray):
    """(summed view scores [V, C], labels [V]) per video: a video's score is its views' mean."""
    clip_scores = np.asarray(clip_scores, np.float64)
    labels = np.asarray(labels)
    uniq, inverse = np.unique(np.asarray(video_ids), return_inverse=True)
    scores = np.zeros((len(uniq), clip_scores.shape[1]))
    np.add.at(scores, inverse, clip_scores)
    video_labels = np.zeros(len(uniq), labels.dtype)
    video_labels[inverse] = labels
    return scores, video_labels


def summarise(clip_scores: np.ndarray, labels: np.ndarray, video_ids: np.ndarray) -> dict:
    """Accuracies from per-view softmax scores; video scores are view averages."""
    clip_scores = np.asarray(clip_scores, np.float64)
    labels = np.asarray(labels)
    per_video, video_labels = video_scores(clip_scores, labels, video_ids)
    return {
        "clip_top1": topk_accuracy(clip_scores, labels, 1),
        "clip_top5": topk_accuracy(clip_scores, labels, 5),
        "video_top1": topk_accuracy(per_video, video_labels, 1),
        "video_top5": topk_accuracy(per_video, video_labels, 5),
        "num_views": int(len(labels)),
        "num_videos": int(len(video_labels)),
    }


def class_report(clip_scores, labels, video_ids, label_map) -> dict:
    """Per-class accuracy and the confusion matrix at video level (rows: true class,
    columns: predicted class, counts of videos), as ``topk_accuracy`` picks top-1."""
    scores, truth = video_scores(clip_scores, labels, video_ids)
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


def evaluate(model, dataset, total_views: int | None = None, progress_stream=None,
             label_map=None) -> dict:
    """Video-level and clip-level accuracy of a Keras model on an eval dataset; with
    ``label_map`` also the per-class report (``class_report``) under ``"classes"``."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def fwd(x):
        return model(x, training=False)

    arrays = predict_views(fwd, dataset, total_views, progress_stream)
    out = summarise(*arrays)
    if label_map is not None:
        out["classes"] = class_report(*arrays, label_map)
    return out
