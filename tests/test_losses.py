"""Label smoothing and mixup reach the loss; EMA weights are what training ends with."""

import numpy as np
import pytest

from stfusion_tf import evaluation, losses, training
from stfusion_tf.data import pipeline
from stfusion_tf.model import template as T


def _log_softmax(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def test_label_smoothing_and_soft_labels_in_the_compiled_loss():
    model = T.build_template(T.preset("tiny"), 4)
    cfg = training.TrainConfig(label_smoothing=0.2)
    training.compile_model(model, cfg, 10, training.phases(cfg)[0], soft=True)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4)).astype(np.float32)
    y = np.array([[0.7, 0.3, 0, 0], [0, 0, 1, 0], [0, 0.4, 0, 0.6]], np.float32)  # mixup rows
    target = 0.8 * y + 0.2 / 4
    want = np.mean(-(target * _log_softmax(logits)).sum(1))
    assert float(model.loss(y, logits)) == pytest.approx(want, rel=1e-5)
    per = losses.per_example(model.loss)(y, logits).numpy()
    np.testing.assert_allclose(per.mean(), want, rtol=1e-5)
    names = [m.name for m in losses.make_metrics(True)]
    assert names == ["cross_entropy", "accuracy"]
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        training.TrainConfig(label_smoothing=1.0)
    with pytest.raises(ValueError, match="needs soft"):
        losses.make_loss(False, 0.1)


def test_training_with_mixup_smoothing_and_ema(motion_dir, tmp_path):
    model = T.build_template(T.preset("tiny"), 4, T.GateConfig(dataset_size=48, length_scale=10.0))
    icfg = pipeline.InputConfig(batch_size=4, mixup_alpha=0.4, cutmix_alpha=1.0)
    cfg = training.TrainConfig(epochs=2, warmup_epochs=1, steps_per_epoch=3, optimizer="sgd",
                               learning_rate=0.05, label_smoothing=0.1, ema=True,
                               ema_momentum=0.5)
    summary = training.train(model, str(tmp_path), motion_dir, icfg, cfg, eval_split="val",
                             verbose=0, log=lambda *a: None)
    assert np.isfinite(summary["history"]["loss"]).all()
    # The soft-label loss with smoothing is the one training used.
    assert losses.is_soft(model.loss)
    assert model.loss.get_config()["label_smoothing"] == pytest.approx(0.1)
    # EMA lives in the weights' optimizer only: the gate logits have one without an average.
    weights_opt, gate_opt = training.cb.inner_optimizers(model.optimizer)
    assert weights_opt.use_ema and not gate_opt.use_ema
    averaged = {v.path for v in weights_opt._trainable_variables}
    assert averaged and not any(p.endswith("/p_logit") for p in averaged)
    # Training ended with the averages: the model holds them, the last checkpoint (written
    # before) holds the raw weights; the gate logits are the raw ones in both.
    raw = T.build_template(T.preset("tiny"), 4, T.GateConfig(dataset_size=48, length_scale=10.0))
    training.compile_model(raw, cfg, 3, training.phases(cfg)[0], soft=True)
    ckpt = training.cb.AtomicCheckpoint(str(tmp_path / "checkpoints"), 3).attach(raw)
    assert ckpt.restore() == 2
    final = {v.path: v.numpy() for v in model.trainable_variables}
    for var, avg in zip(weights_opt._trainable_variables,
                        weights_opt._model_variables_moving_average):
        np.testing.assert_array_equal(final[var.path], avg.numpy())
    last = {v.path: v.numpy() for v in raw.trainable_variables}
    kernel = next(p for p in final if p.endswith("stem_conv/kernel"))
    assert not np.allclose(final[kernel], last[kernel])
    for p in final:
        if p.endswith("/p_logit"):
            assert final[p] == last[p]
    # The evaluation in the summary is that of the averaged weights.
    again = evaluation.evaluate(model, pipeline.eval_dataset(motion_dir, "val", icfg))
    assert summary["eval"]["val"]["clip_top1"] == again["clip_top1"]
    assert summary["eval"]["val"]["video_top1"] == again["video_top1"]


def test_multi_worker_loop_uses_the_compiled_loss():
    """The custom loop of --distribution=multi_worker computes the loss model.fit compiles
    (here: soft labels with smoothing), on one replica."""
    import tensorflow as tf
    from stfusion_tf import distribution
    from stfusion_tf.model import gates as G
    model = T.build_template(T.preset("tiny"), 4)
    cfg = training.TrainConfig(label_smoothing=0.2, learning_rate=1e-3)
    training.compile_model(model, cfg, 1, training.phases(cfg)[0], soft=True)
    G.set_enabled(G.gate_layers(model), False)  # no regulariser, no noise: a fixed forward
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (4, 8, 32, 32, 3)).astype(np.float32)
    eye = np.eye(4, dtype=np.float32)
    y = 0.6 * eye + 0.4 * eye[[1, 2, 3, 0]]  # mixed labels
    logits = model(x, training=True).numpy()
    want = float(model.loss(y, logits))
    hist = distribution.fit_multi_worker(model, tf.distribute.get_strategy(),
                                         tf.data.Dataset.from_tensors((x, y)).repeat(), 1, 0, 1, 4,
                                         [], 0)
    assert hist["loss"][0] == pytest.approx(want, rel=1e-5)
    # The cross-entropy metric is against the labels as given (no smoothing).
    ce = float(np.mean(-(y * _log_softmax(logits)).sum(1)))
    assert hist["cross_entropy"][0] == pytest.approx(ce, rel=1e-5)
