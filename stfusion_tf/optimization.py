"""The optimisation recipe of a run: ``TrainConfig``, its phases, the optimizer
of each phase and the compiled loss.

**Phases.**  Without ``restart_at_switch`` one optimizer and one learning-rate
schedule span the run, the gates switching on after ``warmup_epochs``.  With
it (the authors' two launches): the warm-up is one phase (its own learning
rate, steps and weight decay) and the v-DropPath phase another, started with a
fresh optimizer (momentum and step count at zero) and its own schedule.  All
epoch numbers count from the start of the run.  A checkpoint holds the
optimizer of the phase it was written in; a run resumed inside a phase gets
that phase's optimizer back, one resumed from the checkpoint that ends the
warm-up restarts, so the restart happens exactly once either way.

**Weight decay** is Keras' decoupled form, w <- w - lr * wd * w per step, on
every trainable variable (kernels, biases, BatchNorm scale and shift: the
authors' single PyTorch parameter group) except the gates' drop logits.
PyTorch's ``SGD(weight_decay=l)`` adds l * w to the gradient before momentum m,
which in steady state shrinks weights l / (1 - m) per unit learning rate: the
authors' 5e-4 with momentum 0.9 is wd = 5e-3 here.
"""

from __future__ import annotations

import dataclasses
import weakref

import keras
import tensorflow as tf

from stfusion_tf import losses
from stfusion_tf.errors import UserError

OPTIMIZERS = ("sgd", "adam")
#: How the gates' drop logits are optimised: with the weights (the authors' one SGD
#: parameter group) or by an optimizer of their own.
GATE_OPTIMIZERS = ("shared", "adam", "sgd")
GATE_VARIABLES = ".*/p_logit"
#: Variable names weight decay never touches: the gates' drop logits.
NO_DECAY = ("p_logit",)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The optimisation recipe of one run; ``epochs`` counts the warm-up too.

    ``label_smoothing``: e of the loss' smoothed targets (0: off, the paper).
    ``ema``: keep an exponential moving average of the weights (Keras' optimizer
    ``use_ema``, momentum ``ema_momentum``) and end training with the averaged
    weights, which the final evaluation, the saved model and the analysis then
    use.  The gates' drop logits are not averaged (see ``build_optimizer``).
    """

    epochs: int = 6
    warmup_epochs: int = 2
    learning_rate: float = 0.01
    lr_steps: tuple[int, ...] = ()
    lr_factor: float = 0.1
    momentum: float = 0.9
    optimizer: str = "sgd"
    steps_per_epoch: int | None = None
    keep_checkpoints: int = 3
    seed: int = 0
    gate_optimizer: str = "shared"
    gate_learning_rate: float | None = None
    #: Decoupled weight decay of the v-DropPath phase (of the whole run without a restart).
    weight_decay: float = 0.0
    #: Restart optimizer and schedule when the gates switch on (module docstring).
    restart_at_switch: bool = False
    #: The warm-up phase's learning rate (None: ``learning_rate``), steps and weight decay;
    #: only with ``restart_at_switch``.
    warmup_learning_rate: float | None = None
    warmup_lr_steps: tuple[int, ...] = ()
    warmup_weight_decay: float = 0.0
    label_smoothing: float = 0.0
    ema: bool = False
    ema_momentum: float = 0.999

    def __post_init__(self):
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UserError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 < self.ema_momentum < 1.0:
            raise UserError(f"ema_momentum must be in (0, 1), got {self.ema_momentum}")
        object.__setattr__(self, "lr_steps", tuple(int(s) for s in self.lr_steps))
        object.__setattr__(self, "warmup_lr_steps", tuple(int(s) for s in self.warmup_lr_steps))
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"optimizer={self.optimizer!r}; valid values: {', '.join(OPTIMIZERS)}")
        if self.epochs < 1:
            raise UserError(f"epochs must be >= 1, got {self.epochs}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise UserError(f"warmup_epochs={self.warmup_epochs} exceeds epochs={self.epochs}")
        if self.learning_rate <= 0:
            raise UserError(f"learning_rate must be > 0, got {self.learning_rate}")
        if list(self.lr_steps) != sorted(self.lr_steps):
            raise UserError(f"lr_steps must increase, got {list(self.lr_steps)}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise UserError(f"steps_per_epoch must be >= 1, got {self.steps_per_epoch}")
        if self.gate_optimizer not in GATE_OPTIMIZERS:
            raise UserError(f"gate_optimizer={self.gate_optimizer!r}; valid values: "
                            f"{', '.join(GATE_OPTIMIZERS)}")
        if self.gate_optimizer != "shared" and not (self.gate_learning_rate or 0) > 0:
            raise UserError(f"gate_optimizer={self.gate_optimizer} needs gate_learning_rate > 0")
        if min(self.weight_decay, self.warmup_weight_decay) < 0:
            raise UserError("weight_decay and warmup_weight_decay must be >= 0")
        self._check_phases()

    def _check_phases(self):
        warmup_set = [n for n, v, default in (
            ("warmup_learning_rate", self.warmup_learning_rate, None),
            ("warmup_lr_steps", self.warmup_lr_steps, ()),
            ("warmup_weight_decay", self.warmup_weight_decay, 0.0)) if v != default]
        if not self.restart_at_switch:
            if warmup_set:
                raise UserError(f"{warmup_set[0]} needs restart_at_switch (without it one "
                                "optimizer and schedule span the run)")
            return
        if not 0 < self.warmup_epochs < self.epochs:
            raise UserError("restart_at_switch needs 0 < warmup_epochs < epochs, got "
                            f"warmup_epochs={self.warmup_epochs}, epochs={self.epochs}")
        if self.warmup_learning_rate is not None and self.warmup_learning_rate <= 0:
            raise UserError(f"warmup_learning_rate must be > 0, got {self.warmup_learning_rate}")
        steps = list(self.warmup_lr_steps)
        if steps != sorted(steps) or any(not 0 < e < self.warmup_epochs for e in steps):
            raise UserError(f"warmup_lr_steps must increase inside the warm-up (0 < epoch < "
                            f"warmup_epochs={self.warmup_epochs}), got {steps}")
        if any(e <= self.warmup_epochs for e in self.lr_steps):
            raise UserError(f"with restart_at_switch, lr_steps are the v-DropPath phase's (epochs "
                            f"from the start of the run, > warmup_epochs={self.warmup_epochs}), "
                            f"got {list(self.lr_steps)}")


@dataclasses.dataclass(frozen=True)
class Phase:
    """Epochs [start, end) trained by one optimizer on one schedule (steps: run epochs)."""

    name: str
    start: int
    end: int
    learning_rate: float
    lr_steps: tuple[int, ...]
    weight_decay: float


def phases(cfg: TrainConfig) -> tuple[Phase, ...]:
    """The run's phases: one, or warm-up and v-DropPath with ``restart_at_switch``."""
    if not cfg.restart_at_switch:
        return (Phase("run", 0, cfg.epochs, cfg.learning_rate, cfg.lr_steps, cfg.weight_decay),)
    return (Phase("warmup", 0, cfg.warmup_epochs, cfg.warmup_learning_rate or cfg.learning_rate,
                  cfg.warmup_lr_steps, cfg.warmup_weight_decay),
            Phase("variational", cfg.warmup_epochs, cfg.epochs, cfg.learning_rate, cfg.lr_steps,
                  cfg.weight_decay))


def standalone(cfg: TrainConfig, epochs: int) -> TrainConfig:
    """The recipe of a network trained without v-DropPath (a backbone, a fixed strategy)
    for ``epochs``: the v-DropPath phase's learning rate and steps counted from its
    start (from the run's start without a restart), the weight decay of plain training
    (the warm-up's with a restart), classifier dropout on throughout, one phase."""
    offset = cfg.warmup_epochs if cfg.restart_at_switch else 0
    wd = cfg.warmup_weight_decay if cfg.restart_at_switch else cfg.weight_decay
    return dataclasses.replace(
        cfg, epochs=epochs, warmup_epochs=epochs, restart_at_switch=False,
        lr_steps=tuple(e - offset for e in cfg.lr_steps if 0 < e - offset < epochs),
        weight_decay=wd, warmup_learning_rate=None, warmup_lr_steps=(), warmup_weight_decay=0.0)


def _schedule(cfg: TrainConfig, phase: Phase, base: float, steps_per_epoch: int):
    """``base``, multiplied by ``lr_factor`` from the first step of each of the phase's
    ``lr_steps`` (epochs of the run; the phase's optimizer counts steps from its start)."""
    if not phase.lr_steps:
        return base
    values = [base * cfg.lr_factor ** i for i in range(len(phase.lr_steps) + 1)]
    # PiecewiseConstantDecay switches after a boundary; Keras passes the number of
    # steps already taken, so step k of epoch e (k = e * steps_per_epoch) needs e*spe - 1.
    return keras.optimizers.schedules.PiecewiseConstantDecay(
        [int((e - phase.start) * steps_per_epoch) - 1 for e in phase.lr_steps], values)


@keras.saving.register_keras_serializable(package="stfusion_tf")
class SGD(keras.optimizers.SGD):
    """Keras' SGD whose momentum update is one ``ResourceApplyKerasMomentum`` op per
    variable (the same formula: m <- m * momentum - lr * g; w <- w + m, or Nesterov's
    w <- w + m * momentum - lr * g) instead of Keras' ~10 ops: on the full template
    ~5,000 fewer ops to trace, optimise and run each step.  Sparse gradients, no
    momentum or another backend take Keras' own update."""

    def update_step(self, gradient, variable, learning_rate):
        if (self.momentum == 0 or isinstance(gradient, tf.IndexedSlices)
                or keras.backend.backend() != "tensorflow"):
            return super().update_step(gradient, variable, learning_rate)
        m = self.momentums[self._get_variable_index(variable)]
        m = m.value if isinstance(m, keras.Variable) else m
        var = variable.value if isinstance(variable, keras.Variable) else variable
        lr, momentum = self._hyper(learning_rate, var.dtype, var.device)
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=var.handle, accum=m.handle, lr=lr, grad=tf.cast(gradient, var.dtype),
            momentum=momentum, use_nesterov=self.nesterov)

    def _hyper(self, learning_rate, dtype, device):
        """(lr, momentum) as ``dtype`` tensors, made once per step, dtype and device in a
        graph (Keras casts, and reads, the learning rate once per variable)."""
        if tf.executing_eagerly() or not (tf.is_tensor(learning_rate)
                                          or isinstance(learning_rate, tf.Variable)):
            return tf.cast(learning_rate, dtype), tf.cast(self.momentum, dtype)
        graph = tf.compat.v1.get_default_graph()
        cache = self.__dict__.get("_step_hyper")
        # Weak keys: the cache holds the latest traced step's few tensors, no older graph.
        if cache is None or cache[0]() is not graph or cache[1]() is not learning_rate:
            cache = (weakref.ref(graph), weakref.ref(learning_rate), {})
            object.__setattr__(self, "_step_hyper", cache)  # not a tracked attribute
        key = (dtype, device)
        if key not in cache[2]:
            with tf.device(device):
                cache[2][key] = (tf.cast(learning_rate, dtype), tf.cast(self.momentum, dtype))
        return cache[2][key]


def _make(name: str, lr, momentum: float, weight_decay: float = 0.0, ema: bool = False,
          ema_momentum: float = 0.99):
    wd = weight_decay or None
    kw = {"weight_decay": wd, "use_ema": ema, "ema_momentum": ema_momentum}
    if name == "sgd":
        opt = SGD(lr, momentum=momentum, **kw)
    else:
        opt = keras.optimizers.Adam(lr, **kw)
    if wd:
        opt.exclude_from_weight_decay(var_names=list(NO_DECAY))
    return opt


def build_optimizer(cfg: TrainConfig, steps_per_epoch: int,
                    phase: Phase | None = None) -> keras.optimizers.Optimizer:
    """The optimizer of ``phase`` (default: the run's first): the weights' optimizer with
    the phase's schedule and weight decay (never on gate logits); with ``gate_optimizer``
    other than ``shared``, the gate logits get their own (Keras' ``MultiOptimizer``, no
    weight decay) on the same step schedule.

    With ``ema`` only the weights' optimizer averages.  An average of the drop
    logits would be a drop rate the run never trained with (it lags the logits
    and carries the value they keep through warm-up, without gradient), yet the
    marginals, the sampling and the export read it; so the logits keep their
    trained values.  Under ``shared`` the logits then get an optimizer of their
    own with the weights' algorithm and hyperparameters and no average: SGD and
    Adam update each variable on its own, so the update is the shared one.
    """
    phase = phase or phases(cfg)[0]
    weights = _make(cfg.optimizer, _schedule(cfg, phase, phase.learning_rate, steps_per_epoch),
                    cfg.momentum, phase.weight_decay, cfg.ema, cfg.ema_momentum)
    if cfg.gate_optimizer == "shared" and not cfg.ema:
        return weights
    if cfg.gate_optimizer == "shared":
        gate = _make(cfg.optimizer, _schedule(cfg, phase, phase.learning_rate, steps_per_epoch),
                     cfg.momentum)
    else:
        gate = _make(cfg.gate_optimizer,
                     _schedule(cfg, phase, cfg.gate_learning_rate, steps_per_epoch), cfg.momentum)
    return keras.optimizers.MultiOptimizer(
        keras.optimizers.OptimizerMap(weights, {GATE_VARIABLES: gate}))


def compile_model(model, cfg: TrainConfig, steps: int, phase: Phase, soft: bool = False,
                  jit_compile="auto") -> None:
    """Compiles ``model`` with ``phase``'s optimizer; ``soft``: the labels are one-hot rows
    (label smoothing, mixup / cutmix); ``jit_compile``: Keras' (``ComputeConfig``).  Under
    a ``mixed_float16`` policy Keras wraps the optimizer (also a ``MultiOptimizer``) in a
    ``LossScaleOptimizer`` (``callbacks.inner_optimizers`` looks inside)."""
    model.compile(optimizer=build_optimizer(cfg, steps, phase),
                  loss=losses.make_loss(soft, cfg.label_smoothing),
                  metrics=losses.make_metrics(soft), jit_compile=jit_compile)
    model.optimizer.build(model.trainable_variables)
