"""The authors' warm-up recipe: weight decay, phase dropout, optimizer/schedule restart, resume."""

import keras
import numpy as np
import pytest

from stfusion_tf import callbacks as cb
from stfusion_tf import training
from stfusion_tf.data import pipeline
from stfusion_tf.errors import UserError
from stfusion_tf.model import template as T


def _template(dropout=0.0):
    return T.build_template(T.preset("tiny", dropout=dropout), 4,
                            T.GateConfig(dataset_size=100, length_scale=10.0))


def _lrs(opt, steps):
    """The optimizer's learning rate after each of ``steps`` steps."""
    out = []
    for s in steps:
        opt.iterations.assign(s)
        out.append(float(opt.learning_rate))
    opt.iterations.assign(0)
    return out


def _decay_step(model, opt):
    """One optimizer step with zero gradients: only weight decay moves a variable."""
    opt.build(model.trainable_variables)
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    opt.apply_gradients([(np.zeros(v.shape, "float32"), v) for v in model.trainable_variables])
    return {v.path: (before[v.path], v.numpy()) for v in model.trainable_variables}


@pytest.mark.parametrize("gate_optimizer", ["shared", "adam"])
def test_weight_decay_reaches_kernels_biases_and_batchnorm_never_gate_logits(gate_optimizer):
    model = _template()
    cfg = training.TrainConfig(learning_rate=0.5, weight_decay=0.1, gate_optimizer=gate_optimizer,
                               gate_learning_rate=0.01)
    moved = _decay_step(model, training.build_optimizer(cfg, 10))
    kinds = {"kernel": 0, "gamma": 0, "beta": 0, "bias": 0, "p_logit": 0}
    for path, (old, new) in moved.items():
        kind = path.rsplit("/", 1)[-1]
        kinds[kind] += 1
        if kind == "p_logit":
            np.testing.assert_array_equal(new, old)
        else:  # decoupled: w <- w - lr * wd * w
            np.testing.assert_allclose(new, old * (1 - 0.5 * 0.1), rtol=1e-6, atol=1e-7)
    assert kinds["p_logit"] == 2 * 11 + 1 and kinds["kernel"] > 20 and kinds["gamma"] > 20
    assert kinds["bias"] == 1  # the classifier's


def test_each_phase_gets_its_own_weight_decay_and_schedule():
    cfg = training.TrainConfig(epochs=10, warmup_epochs=4, learning_rate=0.1, lr_steps=(7, 9),
                               restart_at_switch=True, warmup_learning_rate=0.3,
                               warmup_lr_steps=(2,), warmup_weight_decay=0.01, weight_decay=0.0)
    warm, var = training.phases(cfg)
    assert (warm.start, warm.end, var.start, var.end) == (0, 4, 4, 10)
    model = _template()
    opt = training.build_optimizer(cfg, 5, warm)
    opt.build(model.trainable_variables)
    # Steps are the phase's own: the warm-up's drop at epoch 2 is step 10 of its optimizer.
    assert _lrs(opt, (0, 9, 10)) == pytest.approx([0.3, 0.3, 0.03])
    assert all(not np.array_equal(o, n) for p, (o, n) in _decay_step(model, opt).items()
               if p.endswith("kernel"))
    opt = training.build_optimizer(cfg, 5, var)
    opt.build(model.trainable_variables)
    # v-DropPath phase: lr 0.1, x0.1 at run epochs 7 and 9 = its steps 15 and 25; no decay.
    assert _lrs(opt, (0, 14, 15, 25)) == pytest.approx([0.1, 0.1, 0.01, 0.001])
    assert all(np.array_equal(o, n) for o, n in _decay_step(model, opt).values())


def test_recipe_settings_are_checked():
    with pytest.raises(UserError, match="warmup_lr_steps needs restart_at_switch"):
        training.TrainConfig(warmup_lr_steps=(1,))
    with pytest.raises(UserError, match="needs 0 < warmup_epochs < epochs"):
        training.TrainConfig(epochs=4, warmup_epochs=0, restart_at_switch=True)
    with pytest.raises(UserError, match="lr_steps are the v-DropPath phase's"):
        training.TrainConfig(epochs=10, warmup_epochs=4, lr_steps=(3, 8), restart_at_switch=True)
    with pytest.raises(UserError, match="inside the warm-up"):
        training.TrainConfig(epochs=10, warmup_epochs=4, warmup_lr_steps=(5,),
                             restart_at_switch=True)
    # A network trained without v-DropPath takes the v-DropPath phase's schedule from its
    # start and the warm-up's weight decay.
    cfg = training.TrainConfig(epochs=140, warmup_epochs=50, lr_steps=(90, 110, 130),
                               restart_at_switch=True, warmup_weight_decay=5e-3)
    alone = training.standalone(cfg, 90)
    assert alone.lr_steps == (40, 60, 80) and alone.weight_decay == 5e-3
    assert alone.warmup_epochs == alone.epochs == 90 and not alone.restart_at_switch


def test_dropout_acts_only_while_the_gates_are_off():
    model = _template(dropout=0.5)
    layer = model.get_layer("head_dropout")
    schedule = cb.GateSchedule(warmup_epochs=1)
    schedule.set_model(model)
    x = np.ones((64, 32), "float32")
    schedule.on_epoch_begin(0)  # warm-up: gates off, dropout on
    assert not int(T.TemplateGates(model).s[0].enabled.numpy())
    assert np.mean(layer(x, training=True).numpy() == 0) > 0.3
    schedule.on_epoch_begin(1)  # v-DropPath: gates on, dropout off
    assert int(T.TemplateGates(model).s[0].enabled.numpy())
    np.testing.assert_array_equal(layer(x, training=True).numpy(), x)
    np.testing.assert_array_equal(layer(x, training=False).numpy(), x)


class _Stop(Exception):
    pass


class _Recorder(keras.callbacks.Callback):
    """Learning rate of every step, and the optimizer's state when a fit starts."""

    def __init__(self, stop_after=None):
        super().__init__()
        self.lrs, self.starts, self.stop_after = [], [], stop_after

    def on_train_begin(self, logs=None):
        opt = cb.inner_optimizers(self.model.optimizer)[0]
        momentum = sum(float(np.abs(v.numpy()).sum()) for v in opt.momentums)
        self.starts.append((int(opt.iterations.numpy()), momentum))

    def on_train_batch_begin(self, batch, logs=None):
        self.lrs.append(round(cb.learning_rate(self.model.optimizer), 6))

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.stop_after:
            raise _Stop()


#: epochs 0-1 warm-up (lr 0.2, x0.1 from epoch 1), 2-3 v-DropPath (lr 0.1, x0.1 from epoch 3).
RECIPE = training.TrainConfig(epochs=4, warmup_epochs=2, steps_per_epoch=2, learning_rate=0.1,
                              lr_steps=(3,), restart_at_switch=True, warmup_learning_rate=0.2,
                              warmup_lr_steps=(1,), warmup_weight_decay=0.01)
EXPECTED_LRS = [0.2, 0.2, 0.02, 0.02, 0.1, 0.1, 0.01, 0.01]


@pytest.mark.parametrize("stop_after", [2, 3])
def test_restart_happens_once_and_a_resumed_run_continues_its_phase(motion_dir, tmp_path,
                                                                    stop_after):
    """Interrupted at the end of the warm-up (2: the checkpoint, written before the switch,
    holds the warm-up's optimizer) and inside the v-DropPath phase (3), then resumed."""
    icfg = pipeline.InputConfig(batch_size=4)
    logs, first, second = [], _Recorder(stop_after), _Recorder()
    with pytest.raises(_Stop):
        training.train(_template(dropout=0.5), str(tmp_path), motion_dir, icfg, RECIPE,
                       eval_split=None, verbose=0, log=logs.append, callbacks=[first])
    summary = training.train(_template(dropout=0.5), str(tmp_path), motion_dir, icfg, RECIPE,
                             eval_split=None, verbose=0, log=logs.append, callbacks=[second])
    assert first.lrs + second.lrs == EXPECTED_LRS
    assert sum("optimizer and learning-rate schedule restarted" in m for m in logs) == 1
    assert summary["steps"] == 8 and [p["name"] for p in summary["phases"]] == [
        "warmup", "variational"]
    iterations, momentum = second.starts[0]
    if stop_after == 2:  # the checkpoint ends the warm-up: a fresh optimizer, the restart
        assert iterations == 0 and momentum == 0
    else:  # resumed inside the phase: its optimizer comes back with its state
        assert iterations == 2 and momentum > 0
    assert cb.checkpoint_epoch(str(tmp_path / "checkpoints")) == 4


def _apply_fn(opt, v):
    import tensorflow as tf
    return tf.function(lambda g: opt.apply([g], [v]))


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_is_keras_sgd_in_one_op_per_variable(nesterov):
    """The project's SGD (one ResourceApplyKerasMomentum per variable) updates exactly as
    Keras' SGD, weight decay included."""
    import tensorflow as tf
    from stfusion_tf.optimization import SGD
    weights = []
    for cls in (keras.optimizers.SGD, SGD):
        v = keras.Variable(np.arange(6, dtype="float32").reshape(2, 3))
        opt = cls(0.1, momentum=0.9, nesterov=nesterov, weight_decay=0.01)
        opt.build([v])
        step = _apply_fn(opt, v)
        for i in range(4):
            step(tf.constant(np.full((2, 3), i - 1.5, "float32")))
        weights.append(np.asarray(v))
    np.testing.assert_allclose(weights[0], weights[1], rtol=1e-6)
    opt = SGD(0.1, momentum=0.9)
    vs = [keras.Variable(np.ones(3, "float32")) for _ in range(5)]
    opt.build(vs)
    graph = tf.function(lambda: opt.apply([tf.ones(3)] * 5, vs)).get_concrete_function().graph
    types = [op.type for op in graph.get_operations()]
    assert types.count("ResourceApplyKerasMomentum") == 5 and types.count("Cast") <= 2
    # A callable learning rate (a Python float each step) works too.
    v = keras.Variable(np.ones(3, "float32"))
    opt = SGD(lambda: 0.5, momentum=0.9)
    opt.build([v])
    _apply_fn(opt, v)(tf.ones(3))
    np.testing.assert_allclose(v, 0.5 * np.ones(3))
