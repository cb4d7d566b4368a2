"""Per-class accuracy and the confusion matrix on a hand-made prediction set."""

import numpy as np

from stfusion_tf import evaluation


def test_class_report_on_hand_made_predictions():
    labels = ["cat", "dog", "eel"]
    # Six videos, two views each; a video's score is its views' mean.
    # v0 cat -> cat; v1 cat -> dog (views disagree, dog wins on average); v2 dog -> dog;
    # v3 dog -> eel; v4 dog -> eel; v5 eel -> eel.
    views = {0: ([0.9, 0.1, 0.0], [0.8, 0.1, 0.1]), 1: ([0.6, 0.4, 0.0], [0.0, 0.9, 0.1]),
             2: ([0.1, 0.8, 0.1], [0.2, 0.7, 0.1]), 3: ([0.1, 0.2, 0.7], [0.1, 0.3, 0.6]),
             4: ([0.0, 0.4, 0.6], [0.0, 0.3, 0.7]), 5: ([0.0, 0.0, 1.0], [0.1, 0.1, 0.8])}
    truth = {0: 0, 1: 0, 2: 1, 3: 1, 4: 1, 5: 2}
    scores = np.array([s for v in range(6) for s in views[v]])
    vids = np.repeat(np.arange(6), 2)
    y = np.repeat([truth[v] for v in range(6)], 2)
    rep = evaluation.class_report(scores, y, vids, labels)
    assert rep["confusion_matrix"] == [[1, 1, 0], [0, 1, 2], [0, 0, 1]]
    acc = {r["class"]: r["accuracy"] for r in rep["per_class"]}
    assert acc == {"cat": 0.5, "dog": 1 / 3, "eel": 1.0}
    assert [r["videos"] for r in rep["per_class"]] == [2, 3, 1]
    assert {r["class"]: r["confused_with"] for r in rep["per_class"]} == \
        {"cat": "dog", "dog": "eel", "eel": None}
    assert rep["accuracy"] == 3 / 6 == evaluation.summarise(scores, y, vids)["video_top1"]
    assert abs(rep["mean_class_accuracy"] - (0.5 + 1 / 3 + 1.0) / 3) < 1e-12
    assert [r["class"] for r in evaluation.worst_classes(rep, 2)] == ["dog", "cat"]
    # A class without videos has no accuracy and does not enter the mean.
    rep4 = evaluation.class_report(scores, y, vids, labels + ["fox"])
    assert rep4["per_class"][3]["accuracy"] is None and rep4["per_class"][3]["videos"] == 0
    assert rep4["mean_class_accuracy"] == rep["mean_class_accuracy"]
    png = evaluation.plot_confusion(rep)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
