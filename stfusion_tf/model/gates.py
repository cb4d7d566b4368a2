"""Variational DropPath: a learned-rate drop gate on a convolution's input.

The gate follows the authors' ``Conv3d_with_CD``: one trainable drop logit per
gated layer, p = sigmoid(p_logit), initial p = 0.1.  In training the gate draws
a relaxed drop variable d ~ RelaxedBernoulli(temperature, p) (TFP) per sample
(noise shape [B,1,1,1,1] for a conv, so the whole branch is dropped for some
clips and kept for others) and multiplies the input by (1 - d).  Because the
wrapped conv has no bias and follows BN+ReLU, gating its input equals gating the
branch output.

The gate also adds the variational regulariser of the wrapped layer's kernel W
(``add_loss``), in one of two forms (``regularizer=``):

* ``"code"`` (default, the authors' code):
  (k/N)(1-p)||W||^2 + (1/N)(p log p + (1-p) log(1-p))
* ``"paper"`` (Eq. 5): k^2 (1-p)/(2N) ||W||^2 + (1/N) p log p

with k the length-scale prior and N the training-set size.  For the per-feature
(``noise="feature"``) gate of the classifier the entropy term is counted once per
feature, as in the authors' ``Linear_with_CD``.

``weight_term`` says which ||W||^2 enters the weight term.  ``"norm"`` (paper,
code): the kernel's squared norm as trained.  Every gated convolution feeds a
BatchNorm, so the network's function does not depend on that norm: the term
shrinks kernels for free, and its pull on p follows whatever scale training
happened to leave (measured: 14x weaker by the end of the demo's variational
phase than at its start).  ``"prior"``: ||W||^2 at its expected value under the
weight prior N(0, I/k^2), n_W / k^2 for a kernel of n_W weights.  The posterior
may put a scale-free kernel at any norm; this puts it at the prior's own, so the
code form's weight term becomes a price of 1/k nats per kept parameter
((1-p) n_W / (k N); the paper form's: 1/2), constant over training and the same
whatever scale warm-up left behind: the L0 / minimum-description-length
reading of the same prior.  A 3x1x1 (T) branch has three times the weights of
a 1x1x1 (S) branch, so temporal modelling costs three times as much and must be
paid for by the data; kernels get no decay from this form.
``"compute"``: the prior's price, but shared out by compute instead of parameters:
each gate is charged the template's total n_W / k^2 times its kernel's share of
the gated MACs per clip (``analysis.cost.assign_compute_prices``, run by
``Template`` at its training geometry).  The total pressure is the prior's; a
branch at high resolution (many MACs for few weights) costs more, a low-resolution
one less.  This project's extension, not the paper's objective: for a search
whose network should be cheap to run rather than small to store.

The relaxed sample is TFP's ``RelaxedBernoulli`` (``StableRelaxedBernoulli``:
the same distribution with a sample whose gradient stays finite at any logit).

In a template's training call the path gates are drawn together (``draw_bank``,
opened by ``Template.call``): the same per-gate variables, distribution and
regulariser, computed on vectors, so the training graph holds one draw and one
regulariser instead of one sub-graph per gate (full template: 23,066 -> 15,229 ops).

State lives in non-trainable variables, so switching mode or mask never
rebuilds or retraces a compiled function:

* ``enabled`` (0/1): 0 = warm-up, the gate is the identity in training and has
  no regulariser; 1 = variational training.
* ``inference_mode``: what the gate does outside training (``mask`` also
  holds in training, with no regulariser: a fixed sub-network):
  ``expected`` (x * (1-p), the mean of the training gate; x when rescaling),
  ``mask`` (x * mask, a fixed 0/1 strategy mask), ``sample`` (a hard Bernoulli
  draw per call and sample), ``identity``.  In warm-up (``enabled`` = 0)
  ``expected`` and ``sample`` act as the identity; ``mask`` always applies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from tensorflow_probability.python.internal import dtype_util, samplers

from stfusion_tf.errors import UserError

INFERENCE_MODES = ("expected", "mask", "sample", "identity")
REGULARIZERS = ("code", "paper")
WEIGHT_TERMS = ("norm", "prior", "compute")
NOISE_SHAPES = ("path", "feature")
_EPS = 1e-7
_TINY = float(np.finfo(np.float32).tiny)


class StableRelaxedBernoulli(tfp.distributions.RelaxedBernoulli):
    """TFP's ``RelaxedBernoulli`` whose samples have a finite gradient at any logit.

    TFP samples through a Logistic distribution and a Sigmoid bijector, and the
    gradient w.r.t. the logits turns NaN once they pass ~10 in float32
    (tensorflow/probability#1393).  The same Concrete sample written out,
    sigmoid((logits + log u - log(1 - u)) / temperature) with u ~ U(0, 1), stays
    finite; everything else (``log_prob``, parameters, batch shapes) is TFP's.
    """

    def _sample_n(self, n, seed=None, **kwargs):
        logits = self._logits_parameter_no_checks()
        temperature = tf.convert_to_tensor(self._temperature)
        shape = tf.concat([[n], self._batch_shape_tensor(temperature=temperature, logits=logits)], 0)
        tiny = np.finfo(dtype_util.as_numpy_dtype(logits.dtype)).tiny
        u = samplers.uniform(shape, minval=tiny, maxval=1.0, dtype=logits.dtype, seed=seed)
        return self.sample_from_uniform(u)

    def sample_from_uniform(self, u):
        """The relaxed sample for uniform noise ``u`` in (0, 1) (any shape that
        broadcasts with the batch shape): the reparameterisation ``sample`` uses."""
        return tf.sigmoid(concrete_logit(self._logits_parameter_no_checks(), u, self._temperature))


def concrete_logit(logits, u, temperature):
    """(logits + log u - log(1 - u)) / temperature: the relaxed Bernoulli sample is its
    sigmoid, for u ~ U(0, 1) (the one written-out form of the Concrete sample)."""
    return (logits + tf.math.log(u) - tf.math.log1p(-u)) * (1.0 / temperature)


def _relaxed_keep(shape, logit, temperature):
    """1 - d for d ~ RelaxedBernoulli(temperature, logits) drawn from one uniform
    (1 - sigmoid(z) = sigmoid(-z)); ``logit``/``temperature`` broadcast against ``shape``."""
    u = tf.maximum(tf.random.uniform(shape), _TINY)
    return tf.sigmoid(-concrete_logit(logit, u, temperature))


def _training_mix(enabled, mode, mask):
    """(variational, rest): a gate's training factor is keep * variational + rest.

    keep * 1 + 0 (variational), keep * 0 + mask (a fixed strategy, mask mode, which also
    holds in training: fine-tuning or re-calibrating BatchNorm of one sub-network, no
    regulariser), keep * 0 + 1 (warm-up): exact in each case; one broadcast multiply-add
    instead of two [B,1,..] selects, whose gradients were ~30 of a gate's ~140 ops.  The
    regulariser is finite at any logit, so scaling it by 0 is 0.  Scalars or vectors
    (``enabled`` boolean)."""
    fixed = tf.equal(mode, 1)
    variational = tf.cast(tf.logical_and(enabled, tf.logical_not(fixed)), tf.float32)
    return variational, tf.where(fixed, mask, 1.0 - variational)


def _entropy(p, logit, code: bool):
    """The regulariser's entropy term in the logit l, exact and finite at any l:
    log p = l - softplus(l), log(1 - p) = -softplus(l).  ``code``:
    p log p + (1-p) log(1-p) = p l - softplus(l); the paper's: p log p."""
    if code:
        return p * logit - tf.math.softplus(logit)
    return p * (logit - tf.math.softplus(logit))


def _check_choice(name, value, choices):
    if value not in choices:
        raise UserError(f"{name}={value!r}; valid values: {', '.join(choices)}")
    return value


def check_gate_args(init_drop_rate, temperature, regularizer, length_scale, dataset_size,
                    weight_term="norm"):
    """The one check of gate settings (``VariationalDropPath`` and ``GateConfig``)."""
    if not 0.0 < init_drop_rate < 1.0:
        raise UserError(f"init_drop_rate must be in (0, 1), got {init_drop_rate}")
    if temperature <= 0:
        raise UserError(f"temperature must be > 0, got {temperature}")
    if length_scale < 0:
        raise UserError(f"length_scale must be >= 0, got {length_scale}")
    if dataset_size < 1:
        raise UserError(f"dataset_size must be >= 1, got {dataset_size}")
    _check_choice("regularizer", regularizer, REGULARIZERS)
    _check_choice("weight_term", weight_term, WEIGHT_TERMS)
    if weight_term in ("prior", "compute") and length_scale <= 0:
        raise UserError(f"weight_term={weight_term} needs length_scale > 0 (its prior is "
                        "N(0, I/k^2))")


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """Variational DropPath settings shared by every gate of a template."""

    init_drop_rate: float = 0.1
    temperature: float = 0.2
    rescale: bool = False
    regularizer: str = "code"
    length_scale: float = 1.0
    dataset_size: int = 1
    weight_term: str = "norm"

    def __post_init__(self):
        check_gate_args(self.init_drop_rate, self.temperature, self.regularizer,
                        self.length_scale, self.dataset_size, self.weight_term)

    def wrap(self, layer, name: str, noise: str = "path", dtype=None) -> "VariationalDropPath":
        """``layer`` behind a gate with these settings."""
        return VariationalDropPath(layer, noise=noise, name=name, dtype=dtype,
                                   **dataclasses.asdict(self))


@keras.saving.register_keras_serializable(package="stfusion_tf")
class VariationalDropPath(keras.layers.Wrapper):
    """Wraps a kernel layer (Conv3D or Dense) with a learned-rate drop gate.

    Args:
      layer: the gated layer; must own a ``kernel`` once built.
      init_drop_rate: initial drop probability p (authors: 0.1).
      temperature: RelaxedBernoulli temperature (authors: 0.2).
      rescale: divide kept activations by (1 - p) (off, as in the authors' code).
      noise: ``"path"`` (one draw per sample: drop path) or ``"feature"``
        (one draw per sample and input feature: concrete dropout).
      regularizer: ``"code"`` or ``"paper"`` (see module docstring).
      length_scale: k, the length-scale prior.
      dataset_size: N, the number of training examples.
      weight_term: ``"norm"``, ``"prior"`` or ``"compute"`` (see module docstring).
    """

    def __init__(self, layer, init_drop_rate=0.1, temperature=0.2, rescale=False,
                 noise="path", regularizer="code", length_scale=1.0,
                 dataset_size=1, weight_term="norm", **kwargs):
        # No autocast: under a mixed precision policy the drop logits, the relaxed
        # sample and the regulariser (which reads the kernel) stay float32; the
        # wrapped layer still computes in the policy's compute dtype.
        kwargs["autocast"] = False
        super().__init__(layer, **kwargs)
        check_gate_args(init_drop_rate, temperature, regularizer, length_scale, dataset_size,
                        weight_term)
        self.weight_term = weight_term
        #: Under ``"compute"``: the weights this gate is charged for, set by
        #: ``analysis.cost.assign_compute_prices``.  Not saved: a ``Template`` assigns it
        #: again when it is rebuilt; a network of your own, after loading.
        self.charged_weights = None
        self.init_drop_rate = float(init_drop_rate)
        self.temperature = float(temperature)
        self.rescale = bool(rescale)
        self.noise = _check_choice("noise", noise, NOISE_SHAPES)
        self.regularizer = _check_choice("regularizer", regularizer, REGULARIZERS)
        self.length_scale = float(length_scale)
        self.dataset_size = int(dataset_size)

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(input_shape)
        logit = math.log(self.init_drop_rate / (1.0 - self.init_drop_rate))
        self.p_logit = self.add_weight(
            name="p_logit", shape=(), initializer=keras.initializers.Constant(logit),
            trainable=True, dtype="float32", autocast=False)
        self.mask = self.add_weight(
            name="mask", shape=(), initializer="ones", trainable=False, dtype="float32",
            autocast=False)
        self.enabled = self.add_weight(
            name="enabled", shape=(), dtype="int32", initializer="ones", trainable=False)
        self.inference_mode = self.add_weight(
            name="inference_mode", shape=(), dtype="int32", initializer="zeros",
            trainable=False)
        self._num_features = int(input_shape[-1])
        self.built = True

    # -- probabilities -------------------------------------------------------
    @property
    def drop_rate(self):
        """p = sigmoid(p_logit) as a tensor."""
        return tf.sigmoid(tf.convert_to_tensor(self.p_logit))

    def squared_norm(self):
        """||W||^2 of the weight term: the kernel's (``norm``), n_W / k^2 (``prior``) or the
        charged weights / k^2 (``compute``)."""
        if self.weight_term != "norm":
            return tf.constant(self._prior_squared_norm())
        return tf.reduce_sum(tf.square(tf.cast(tf.convert_to_tensor(self.layer.kernel), tf.float32)))

    def _prior_squared_norm(self) -> float:
        if self.weight_term == "compute":
            if self.charged_weights is None:
                raise UserError(
                    f"{self.name}: weight_term=compute needs the gates' MACs; build the model "
                    "with sf.build_template, or call sf.assign_compute_prices(model, "
                    "input_shape) once it is built or loaded")
            n = self.charged_weights
        else:
            n = float(np.prod(self.layer.kernel.shape))
        return n / max(self.length_scale, _EPS) ** 2

    def regularization(self, p=None, logit=None):
        """The variational regulariser of this gate (a scalar tensor); ``p`` / ``logit``:
        the drop rate and its logit if the caller already has them (one read per step)."""
        logit = tf.convert_to_tensor(self.p_logit) if logit is None else logit
        p = tf.sigmoid(logit) if p is None else p
        weight_term = (1.0 - p) * self._weight_cost()
        entropy = _entropy(p, logit, self.regularizer == "code")
        return weight_term + entropy * self._entropy_scale()

    def _weight_cost(self):
        """price * ||W||^2 of the weight term; under the prior ||W||^2 is a number, so this
        is a Python float (one constant), else a float32 tensor."""
        n, k = float(self.dataset_size), self.length_scale
        price = k / n if self.regularizer == "code" else (k * k) / (2.0 * n)
        if self.weight_term != "norm":
            return price * self._prior_squared_norm()
        return price * self.squared_norm()

    def _entropy_scale(self) -> float:
        return (float(self._num_features) if self.noise == "feature" else 1.0) / float(
            self.dataset_size)

    # -- forward --------------------------------------------------------------
    def _noise_shape(self, x):
        if x.shape.rank is None:
            ones = tf.ones([tf.rank(x) - 2], tf.int32)
            last = tf.shape(x)[-1:] if self.noise == "feature" else [1]
            return tf.concat([tf.shape(x)[:1], ones, last], axis=0)
        ones = [1] * (x.shape.rank - 2)
        last = [self._num_features] if self.noise == "feature" else [1]
        if x.shape[0] is not None:
            # Training batches are static (drop_remainder): a static noise shape also
            # makes the gradients' broadcast reductions static (~20 fewer ops per gate).
            return [x.shape[0]] + ones + last
        return tf.concat([tf.shape(x)[:1], ones + last], axis=0)

    def _keep_scale(self, p):
        return 1.0 / (1.0 - p) if self.rescale else 1.0

    def _relaxed(self, shape, logit, p):
        # 1 - d for d ~ RelaxedBernoulli(temperature, logits) drawn from one uniform u
        # (1 - sigmoid(z) = sigmoid(-z)): TFP's sample() adds ~45 shape and seed ops per
        # gate (x 122 gates in the full template).
        keep = _relaxed_keep(shape, logit, self.temperature)
        return keep / (1.0 - p) if self.rescale else keep

    def _hard(self, shape, p):
        keep = tf.cast(tf.random.uniform(shape) >= p, tf.float32)
        return keep * self._keep_scale(p)

    def _expected(self, p):
        return tf.constant(1.0) if self.rescale else 1.0 - p

    def multiplier(self, x, training=None):
        """(factor, regulariser): the gate's output is ``layer(x * factor)``.

        The factor is float32 with the noise shape of ``x`` ([B,1,1,1,1] for a
        path gate); the regulariser is a float32 scalar in training, else None.
        Everything here stays float32 whatever the layer's compute dtype: the
        drop logits, the relaxed sample and the regulariser.
        """
        shape = self._noise_shape(x)
        if training:
            banked = _active_bank().get(id(self))
            if banked is not None:  # drawn by ``draw_bank``, whose caller adds the loss
                return tf.reshape(banked, shape), None
        logit = tf.convert_to_tensor(self.p_logit)
        p = tf.sigmoid(logit)
        mask = tf.convert_to_tensor(self.mask)
        enabled = tf.equal(tf.convert_to_tensor(self.enabled), 1)
        mode = tf.convert_to_tensor(self.inference_mode)
        # Selected arithmetically or with tf.where, not tf.cond: ~120 gates x 3 conds made
        # the full template's first training step twice as slow to build and optimise and
        # its float32 process peak 5.43 GB instead of 4.30 (benchmarks/train_step.py).
        if training:
            variational, rest = _training_mix(enabled, mode, mask)
            factor = self._relaxed(shape, logit, p) * variational + rest
            return factor, self.regularization(p, logit) * variational
        ones = tf.ones(shape)
        chosen = [tf.where(enabled, ones * self._expected(p), ones), mask,
                  tf.where(enabled, self._hard(shape, p), ones), ones]
        factor = chosen[-1]
        for i in range(len(chosen) - 2, -1, -1):
            factor = tf.where(tf.equal(mode, i), chosen[i], factor)
        return factor, None

    def call(self, inputs, training=None, multiplier_only=False, return_factor=False):
        """``layer(inputs * factor)``; with ``multiplier_only`` the factor alone (the
        memory-efficient dense layers apply it inside their recomputed segment); with
        ``return_factor`` the pair (output, factor) (a fusion unit's block keep)."""
        factor, reg = self.multiplier(inputs, training)
        if reg is not None:
            self.add_loss(reg)
        if multiplier_only:
            return factor
        if self._scales_output:
            # layer(x * f) == layer(x) * f for a per-sample scalar f and a bias-free linear
            # layer: scaling the output (and, backwards, its gradient) touches the
            # bottleneck's 128 channels instead of a dense block's up to 1,024.
            y = self.layer(inputs)
            y = y * tf.cast(factor, y.dtype)
        else:
            y = self.layer(inputs * tf.cast(factor, inputs.dtype))
        return (y, factor) if return_factor else y

    @property
    def _scales_output(self) -> bool:
        # Not in float16: the factor's gradient, a sum of dy * y over the loss-scaled conv
        # output, overflows float16 and every step is skipped (tests/test_compute.py).
        layer = self.layer
        return (self.noise == "path" and isinstance(layer, keras.layers.Conv3D)
                and not layer.use_bias and layer.activation in (None, keras.activations.linear)
                and layer.compute_dtype != "float16")

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            init_drop_rate=self.init_drop_rate, temperature=self.temperature,
            rescale=self.rescale, noise=self.noise, regularizer=self.regularizer,
            length_scale=self.length_scale, dataset_size=self.dataset_size,
            weight_term=self.weight_term)
        return config


# -- model-level helpers ---------------------------------------------------------

def gate_layers(model) -> list[VariationalDropPath]:
    """All gates of a model, in the order Keras tracks them (build order)."""
    return [l for l in model._flatten_layers(include_self=False, recursive=True)
            if isinstance(l, VariationalDropPath)]


def set_enabled(gates, enabled: bool) -> None:
    """Warm-up (False) or variational training (True); no retrace."""
    for g in gates:
        g.enabled.assign(1 if enabled else 0)


def set_inference_mode(gates, mode: str) -> None:
    idx = INFERENCE_MODES.index(_check_choice("inference_mode", mode, INFERENCE_MODES))
    for g in gates:
        g.inference_mode.assign(idx)


# -- the gate bank: every path gate of a model drawn at once ----------------------

_BANK = threading.local()


def _active_bank() -> dict:
    return getattr(_BANK, "factors", None) or {}


@contextlib.contextmanager
def banked(factors: dict):
    """Within it, a training call of a gate in ``factors`` (``id(gate) -> [B]``) uses its
    column instead of drawing its own (``Template.call`` opens it)."""
    previous = getattr(_BANK, "factors", None)
    _BANK.factors = {**(previous or {}), **factors}
    try:
        yield
    finally:
        _BANK.factors = previous


def bankable(gates) -> list[VariationalDropPath]:
    """The gates ``draw_bank`` can draw: built, one draw per sample (``noise="path"``)."""
    return [g for g in gates if g.built and g.noise == "path"]


def _vector(values):
    """A float32 constant: a scalar when every gate has the same value (fewer ops)."""
    values = np.asarray(values, np.float32)
    return tf.constant(values[0] if np.all(values == values[0]) else values)


def draw_bank(gates, batch) -> tuple[dict, tf.Tensor]:
    """The training factors of ``gates`` (path gates) and the sum of their regularisers.

    The same computation as ``VariationalDropPath.multiplier(training=True)`` for each
    gate, on vectors: one read of each gate's state stacked, one uniform draw [B, G], one
    regulariser sum.  Per gate that leaves a column and a reshape instead of its own
    ~60-op sub-graph and gradient: on the full template (122 gates) ~7,000 fewer ops
    to trace and optimise (first step, and the memory of the graph).
    Returns ({id(gate): factor [B]}, regulariser scalar).
    """
    # Kernels read in float32 as the gates read them (autocast=False); a template's call
    # under a mixed policy would otherwise hand them over in bfloat16/float16.
    with keras.src.backend.AutocastScope(None):
        return _draw_bank(gates, batch)


def _draw_bank(gates, batch):
    def stack(name, dtype):
        return tf.stack([tf.cast(tf.convert_to_tensor(getattr(g, name)), dtype) for g in gates])

    logit = stack("p_logit", tf.float32)
    p = tf.sigmoid(logit)
    variational, rest = _training_mix(tf.equal(stack("enabled", tf.int32), 1),
                                      stack("inference_mode", tf.int32),
                                      stack("mask", tf.float32))
    keep = _relaxed_keep([batch, len(gates)], logit, _vector([g.temperature for g in gates]))
    if any(g.rescale for g in gates):
        keep = keep / (1.0 - p * _vector([float(g.rescale) for g in gates]))
    factor = keep * variational + rest

    costs = [g._weight_cost() for g in gates]
    if all(isinstance(c, float) for c in costs):
        weight = _vector(costs)
    else:
        weight = tf.stack([tf.constant(c, tf.float32) if isinstance(c, float) else c
                           for c in costs])
    code = np.array([g.regularizer == "code" for g in gates])
    entropy = _entropy(p, logit, code.all())
    if code.any() and not code.all():
        entropy = tf.where(tf.constant(code), _entropy(p, logit, True), entropy)
    scale = _vector([g._entropy_scale() for g in gates])
    reg = tf.reduce_sum(variational * ((1.0 - p) * weight + entropy * scale))
    columns = tf.unstack(factor, axis=1)
    return {id(g): c for g, c in zip(gates, columns)}, reg
