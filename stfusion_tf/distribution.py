"""tf.distribute for training: building the distribution, each process's role,
and the multi-worker loop that Keras 3's ``fit`` lacks.

"Distribution" always names a ``tf.distribute.Strategy`` here; "strategy" is a
fusion strategy (``model/strategy.py``).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from stfusion_tf import losses
from stfusion_tf.errors import UserError

DISTRIBUTIONS = ("default", "mirrored", "multi_worker", "tpu")


def make_distribution(name: str, tpu: str = "") -> tf.distribute.Strategy:
    """``default`` (one device), ``mirrored`` (all local devices), ``multi_worker``
    (``TF_CONFIG``) or ``tpu`` (``tpu``: the TPU's address)."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise UserError(f"distribution={name!r}; valid values: {', '.join(DISTRIBUTIONS)}")


def worker_role(distribution) -> tuple[bool, int]:
    """(is_chief, task_id) of this process; single-host distributions are always chief."""
    resolver = getattr(distribution.extended, "_cluster_resolver", None) or getattr(
        distribution, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    task_id = getattr(resolver, "task_id", None) or 0
    if not task_type or task_type == "chief":
        return True, 0
    has_chief = "chief" in (resolver.cluster_spec().as_dict() if resolver else {})
    return (task_type == "worker" and task_id == 0 and not has_chief), int(task_id)


def is_multi_worker(distribution) -> bool:
    return isinstance(distribution, tf.distribute.MultiWorkerMirroredStrategy)


class WorkerLostError(RuntimeError):
    """Another worker of a multi-worker job stopped answering (killed, preempted)."""


#: What the collectives raise when a peer is gone.
_PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                tf.errors.AbortedError)


def fit_multi_worker(model, distribution, dataset, epochs: int, initial_epoch: int, steps: int,
                     global_batch: int, callbacks, verbose: int) -> dict:
    """``model.fit`` for MultiWorkerMirroredStrategy, which Keras 3's fit does not
    support (keras-team/keras#20585: "Attempt to convert a value (PerReplica...)").

    Same loss (the compiled loss, ``losses.make_loss``, averaged over the global
    batch, + the gates' regulariser, once), same callbacks, same logs; gradients
    are all-reduced by the distribution.  Like ``fit`` it ends with the
    optimizer's ``finalize_variable_values`` (EMA weights, when on).  A worker that
    dies stops the others with ``WorkerLostError``: re-launching the job resumes
    every worker from the last complete checkpoint.
    """
    try:
        return _fit_loop(model, distribution, dataset, epochs, initial_epoch, steps,
                         global_batch, callbacks, verbose)
    except _PEER_ERRORS as e:
        cause = next((line for line in str(e).splitlines() if "aborted by" in line),
                     str(e).strip().splitlines()[0])
        raise WorkerLostError(
            f"a worker of the job was lost ({cause.split('}')[-1].strip()[:160]}); re-launch "
            "the same command on every worker: training resumes from the last complete "
            "checkpoint") from None


def _fit_loop(model, distribution, dataset, epochs, initial_epoch, steps, global_batch,
              callbacks, verbose) -> dict:
    with distribution.scope():
        metrics, train_step = _multi_worker_step(model, distribution, global_batch)
    iterator = iter(distribution.experimental_distribute_dataset(dataset))
    cbs = keras.callbacks.CallbackList(callbacks, add_history=True, add_progbar=verbose != 0,
                                       model=model, verbose=verbose, epochs=epochs, steps=steps)
    cbs.on_train_begin()
    logs = {}
    for epoch in range(initial_epoch, epochs):
        for m in metrics:
            m.reset_state()
        cbs.on_epoch_begin(epoch)
        for batch in range(steps):
            cbs.on_train_batch_begin(batch)
            train_step(iterator)
            logs = {m.name: float(m.result()) for m in metrics}
            cbs.on_train_batch_end(batch, logs)
        cbs.on_epoch_end(epoch, logs)
    if epochs > initial_epoch:
        model.optimizer.finalize_variable_values(model.trainable_variables)
    cbs.on_train_end(logs)
    return model.history.history


def _multi_worker_step(model, distribution, global_batch: int):
    """The metrics and the traced step of ``fit_multi_worker``."""
    replicas = distribution.num_replicas_in_sync
    ce_loss = losses.per_example(model.loss)
    m_loss = keras.metrics.Mean(name="loss")
    m_ce, m_acc = losses.make_metrics(losses.is_soft(model.loss))

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            ce = tf.nn.compute_average_loss(ce_loss(y, logits), global_batch_size=global_batch)
            reg = tf.add_n(model.losses) if model.losses else tf.constant(0.0)
            loss = ce + reg / replicas
            # A LossScaleOptimizer (mixed_float16) scales here and unscales in apply.
            scaled = model.optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, model.trainable_variables)
        model.optimizer.apply_gradients(zip(grads, model.trainable_variables))
        m_ce.update_state(y, logits)
        m_acc.update_state(y, logits)
        return loss

    @tf.function
    def train_step(iterator):
        x, y = next(iterator)
        per_replica = distribution.run(replica_step, args=(x, y))
        loss = distribution.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
        m_loss.update_state(loss)
        return loss

    return [m_loss, m_ce, m_acc], train_step
