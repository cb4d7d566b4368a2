"""How a network computes: numeric precision, XLA and memory-efficient dense layers
(``--precision``, ``--jit_compile``, ``--memory_efficient``).

* ``precision``: a Keras dtype policy.  ``mixed_bfloat16`` / ``mixed_float16``
  keep every variable in float32 and compute convolutions, BatchNorm outputs and
  activations in 16 bits; the gates' drop logits, relaxed samples and
  regulariser, the pooled head features, the logits and the loss stay float32.
  ``mixed_float16`` trains with dynamic loss scaling (Keras' ``LossScaleOptimizer``).
  The policy is set globally before a model is built or loaded: every mode
  (train, analyze, export, generalize, fidelity) computes in it (a TFLite export
  is float32: ``export.float32_network``).  Weights do not
  depend on it: a template trained in one precision loads in any other.
* ``jit_compile``: passed to ``model.compile`` (``auto``: Keras' choice, XLA when
  a GPU is present and no tf.distribute strategy is active) and used the same way
  by evaluation and strategy scoring.
* ``memory_efficient``: the template's dense layers recompute their
  concatenation, BN-ReLU and bottleneck in the backward pass (``model/memory.py``).
  Only training calls change; ResNet / MobileNetV2 backbones have no dense
  layers and ignore it.
* Graph optimisation (``lean_graph_optimisation``, on hosts without an
  accelerator): Grappler runs its passes once, not twice, and without its memory
  optimizer.  On the full template the second iteration changed nothing and the
  memory optimizer only rescheduled; together they were ~3.5 s of the ~9 s
  between the trace and the first step, for the same step time and peak memory
  (docs/benchmarks.md).  With a GPU or TPU TensorFlow's defaults stay (its
  memory optimizer's swapping matters there; not measured here).
"""

from __future__ import annotations

import contextlib
import dataclasses

from stfusion_tf.errors import UserError

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
JIT_COMPILE = ("auto", "true", "false")


@dataclasses.dataclass(frozen=True)
class ComputeConfig:
    precision: str = "float32"
    jit_compile: str = "auto"
    memory_efficient: bool = False

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise UserError(f"precision={self.precision!r}; valid values: {', '.join(PRECISIONS)}")
        if self.jit_compile not in JIT_COMPILE:
            raise UserError(f"jit_compile={self.jit_compile!r}; valid values: "
                            f"{', '.join(JIT_COMPILE)}")

    @property
    def keras_jit_compile(self):
        """The ``jit_compile`` argument of ``model.compile``: "auto", True or False."""
        return {"auto": "auto", "true": True, "false": False}[self.jit_compile]

    def apply(self) -> None:
        """Sets the global Keras dtype policy (models built or loaded afterwards use it)
        and, on a CPU-only host, the lean graph optimisation."""
        set_precision(self.precision)
        lean_graph_optimisation()


def set_precision(precision: str) -> None:
    import keras
    if precision not in PRECISIONS:
        raise UserError(f"precision={precision!r}; valid values: {', '.join(PRECISIONS)}")
    keras.mixed_precision.set_global_policy(precision)


@contextlib.contextmanager
def precision_scope(precision: str):
    """Builds and runs models under ``precision`` inside the block, then restores the policy."""
    import keras
    previous = keras.mixed_precision.global_policy().name
    set_precision(precision)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def resolve_jit(jit_compile) -> bool:
    """``jit_compile`` ("auto"/"true"/"false" or a bool) for a ``tf.function`` of our own:
    "auto" is XLA when a GPU or TPU is present and no tf.distribute strategy is active,
    as Keras resolves it for ``model.compile``."""
    import tensorflow as tf
    if isinstance(jit_compile, bool):
        return jit_compile
    if jit_compile != "auto":
        return jit_compile == "true"
    return _has_accelerator() and not tf.distribute.has_strategy()


def _has_accelerator() -> bool:
    """Whether TensorFlow sees a device other than the CPU (a GPU or TPU)."""
    import tensorflow as tf
    return any(d.device_type != "CPU" for d in tf.config.list_physical_devices())


def lean_graph_optimisation(force: bool = False) -> bool:
    """One Grappler iteration and no memory optimizer for the tf.functions this thread
    calls afterwards (``model.fit``'s step, evaluation, scoring), on a host without a
    GPU or TPU (or with ``force``); returns whether it is set.

    ``tf.config.optimizer.set_experimental_options`` has no switch for either, so this
    sets the eager context's function-call options (what a ``tf.function`` call hands
    Grappler); a later ``tf.config.optimizer`` or threading setting resets them to
    TensorFlow's defaults (slower start, same results)."""
    from tensorflow.core.protobuf import rewriter_config_pb2
    from tensorflow.python.eager import context
    if _has_accelerator() and not force:
        return False
    ctx = context.context()
    config = ctx.function_call_options.config_proto_serialized
    proto = type(ctx.config)()
    proto.ParseFromString(config)
    rewrite = proto.graph_options.rewrite_options
    rewrite.meta_optimizer_iterations = rewriter_config_pb2.RewriterConfig.ONE
    rewrite.memory_optimization = rewriter_config_pb2.RewriterConfig.NO_MEM_OPT
    ctx.function_call_options = context.FunctionCallOptions(
        executor_type=ctx.function_call_options.executor_type, config_proto=proto)
    return True


def set_memory_efficient(model, enabled: bool) -> bool:
    """Turns memory-efficient dense layers on or off for ``model`` (before it is compiled);
    returns whether the model has them (a Template or DenseNet backbone)."""
    if not hasattr(model, "memory_efficient"):
        return False
    model.memory_efficient = bool(enabled)
    return True
