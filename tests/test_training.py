"""Training the template: the gates' own optimizer (and its checkpoint), the gate trace."""

import json

import keras
import numpy as np
import pytest

from stfusion_tf import callbacks, training
from stfusion_tf.data import pipeline
from stfusion_tf.model import template as T

INPUT = pipeline.InputConfig(batch_size=4)


def _template(n=48, k=10.0):
    return T.build_template(T.preset("tiny"), 4, T.GateConfig(dataset_size=n, length_scale=k,
                                                               weight_term="prior"))


@pytest.fixture(scope="module")
def trained(motion_dir, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("run"))
    cfg = training.TrainConfig(epochs=2, warmup_epochs=1, learning_rate=1e-3, optimizer="adam",
                               steps_per_epoch=3, gate_optimizer="adam", gate_learning_rate=0.05)
    model = _template()
    summary = training.train(model, run, motion_dir, INPUT, cfg, eval_split=None, verbose=0,
                             log=lambda *a: None, trace_every=2)
    return {"run": run, "model": model, "cfg": cfg, "summary": summary}


def test_summary_records_the_train_accuracy_at_the_end_of_the_warm_up(trained):
    s = trained["summary"]
    assert s["warmup_end"] == {"epoch": 1, "train_accuracy": s["history"]["accuracy"][0]}


def test_gate_logits_have_their_own_optimizer_and_learning_rate(trained):
    opt = trained["model"].optimizer
    assert isinstance(opt, keras.optimizers.MultiOptimizer)
    weights, gates = callbacks.inner_optimizers(opt)
    assert float(weights.learning_rate) == pytest.approx(1e-3)
    assert float(gates.learning_rate) == pytest.approx(0.05)
    # Adam moves each logit by about its learning rate per step: 3 variational steps.
    rates = np.array(trained["summary"]["drop_rates"])
    moved = np.abs(np.log(rates / (1 - rates)) - np.log(0.1 / 0.9))
    assert 0.02 < moved.max() <= 3 * 0.05 + 1e-4
    # Warm-up steps did not touch the gates' optimizer.
    assert int(gates.iterations.numpy()) == 6 and int(weights.iterations.numpy()) == 6


def test_checkpoint_restores_every_inner_optimizer(trained, motion_dir):
    model = trained["model"]
    fresh = _template()
    training.compile_model(fresh, trained["cfg"], 3, training.phases(trained["cfg"])[0])
    ckpt = callbacks.AtomicCheckpoint(f"{trained['run']}/checkpoints", 3).attach(fresh)
    assert ckpt.restore() == 2
    for a, b in zip(callbacks.inner_optimizers(model.optimizer),
                    callbacks.inner_optimizers(fresh.optimizer)):
        assert [np.asarray(v).tolist() for v in a.variables] == \
            [np.asarray(v).tolist() for v in b.variables]


def test_gate_trace_records_drop_rates_and_the_two_gradient_sources(trained, motion_dir):
    rows = [json.loads(line) for line in open(f"{trained['run']}/{training.TRACE_FILE}")]
    rates = [r for r in rows if r["kind"] == "drop_rates"]
    grads = [r for r in rows if r["kind"] == "gradients"]
    positions = trained["model"].positions
    assert rates[0]["step"] == 0 and rates[0]["p_T"] == pytest.approx([0.1] * len(positions))
    assert [r["step"] for r in rates] == sorted(r["step"] for r in rates)
    assert len(grads) == 1 and grads[0]["epoch"] == 1  # only the variational epoch
    assert len(grads[0]["grad_data"]) == len(grads[0]["grad_regularizer"]) == 2 * len(positions) + 1
    # The regulariser's part is the analytic derivative of the prior form w.r.t. the logit.
    model = trained["model"]
    gates = T.TemplateGates(model)
    p = gates.s[0].drop_rate.numpy()
    n_w = float(np.prod(gates.s[0].layer.kernel.shape))
    k, n = 10.0, 48
    d_dp = -n_w / (k * n) + np.log(p / (1 - p)) / n
    trace = callbacks.GateTrace("/tmp/unused", "/tmp/unused.jsonl", positions,
                                batches=pipeline.train_dataset(motion_dir, "train", INPUT),
                                grad_batches=1)
    trace.set_model(model)
    before = [v.numpy().copy() for v in model.non_trainable_variables]
    data, reg = trace.gradient_sources()
    assert reg[0] == pytest.approx(d_dp * p * (1 - p), rel=1e-4)
    assert np.all(np.isfinite(data)) and np.any(data != 0)
    # The extra forward passes leave BatchNorm statistics (and gate state) as they were.
    for a, b in zip(before, model.non_trainable_variables):
        np.testing.assert_array_equal(a, b.numpy())


def test_gate_optimizer_needs_a_learning_rate():
    with pytest.raises(ValueError, match="gate_learning_rate"):
        training.TrainConfig(gate_optimizer="adam")
    with pytest.raises(ValueError, match="valid values: shared, adam, sgd"):
        training.TrainConfig(gate_optimizer="lion", gate_learning_rate=0.1)
