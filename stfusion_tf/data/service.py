"""tf.data service: move input preprocessing off the training host.

``start(port, num_workers)`` runs a dispatcher and workers in this process
(``python -m stfusion_tf.main --mode=data_service`` keeps them up), ``join`` runs
workers for a dispatcher elsewhere; a training job then passes
``--data_service=grpc://HOST:PORT`` and its input pipeline is executed by the
workers (``distribute`` in ``parallel_epochs`` mode: every worker reads all shards
in its own shuffled order, as independent input replicas, so a worker that dies
costs only the batches it had in flight: training goes on with the others).
Workers need the same view of ``--data_dir`` (a shared filesystem or an
http(s)/s3 URL).
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf


@dataclasses.dataclass
class Service:
    dispatcher: tf.data.experimental.service.DispatchServer | None
    workers: list
    joined: str = ""  # the dispatcher's address when this process runs workers only

    @property
    def target(self) -> str:
        return self.dispatcher.target if self.dispatcher is not None else self.joined

    def describe(self) -> str:
        if self.dispatcher is None:
            return f"{len(self.workers)} worker(s) serving {self.joined}"
        return (f"dispatcher at {self.target} with {len(self.workers)} workers; train with "
                f"--data_service={self.target}")

    def join(self) -> None:
        (self.dispatcher or self.workers[0]).join()


def _workers(address: str, num_workers: int, host: str) -> list:
    return [tf.data.experimental.service.WorkerServer(tf.data.experimental.service.WorkerConfig(
        dispatcher_address=address, worker_address=f"{host}:%port%"))
        for _ in range(num_workers)]


def start(port: int = 0, num_workers: int = 2, host: str = "localhost",
          work_dir: str | None = None) -> Service:
    """Starts a dispatcher on ``port`` (0: any free port) and ``num_workers`` workers.

    With ``work_dir`` the dispatcher journals its state there (fault-tolerant mode): a
    restarted dispatcher recovers its jobs, and workers re-register with it.
    """
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    dispatcher = tf.data.experimental.service.DispatchServer(
        tf.data.experimental.service.DispatcherConfig(
            port=port, work_dir=work_dir, fault_tolerant_mode=bool(work_dir)))
    return Service(dispatcher, _workers(dispatcher.target.split("://", 1)[1], num_workers, host))


def join(target: str, num_workers: int = 1, host: str = "localhost") -> Service:
    """Starts ``num_workers`` workers for the dispatcher at ``target`` (grpc://host:port)."""
    if not target.startswith("grpc://"):
        raise ValueError(f"data service address must look like grpc://host:port, got {target!r}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1 to join a dispatcher, got {num_workers}")
    return Service(None, _workers(target.split("://", 1)[1], num_workers, host), joined=target)


def serve(port: int, num_workers: int, work_dir: str | None = None,
          join_target: str | None = None) -> Service:
    """``--mode=data_service``: a dispatcher with workers, or workers joining one."""
    from stfusion_tf.errors import UserError
    if not join_target and port < 1:
        raise UserError("--data_service_port must be a port number >= 1")
    try:
        if join_target:
            return join(join_target, num_workers)
        return start(port, num_workers, work_dir=work_dir)
    except ValueError as e:
        raise UserError(str(e)) from None


def distribute(dataset: tf.data.Dataset, target: str) -> tf.data.Dataset:
    """Runs ``dataset``'s pipeline on the service at ``target`` (grpc://host:port)."""
    if not target.startswith("grpc://"):
        raise ValueError(f"data service address must look like grpc://host:port, got {target!r}")
    return dataset.apply(tf.data.experimental.service.distribute(
        processing_mode="parallel_epochs", service=target))
