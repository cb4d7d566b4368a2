"""tf.data service: move input preprocessing off the training host.

``start(port, num_workers)`` runs a dispatcher and workers in this process
(``python -m stfusion_tf.main --mode=data_service`` keeps them up); a training
job then passes ``--data_service=grpc://HOST:PORT`` and its input pipeline is
executed by the workers (``distribute`` in ``parallel_epochs`` mode: every
worker reads all shards in its own shuffled order, as independent input
replicas).  Workers need the same view of ``--data_dir`` (a shared filesystem
or an http(s)/s3 URL).
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf


@dataclasses.dataclass
class Service:
    dispatcher: tf.data.experimental.service.DispatchServer
    workers: list

    @property
    def target(self) -> str:
        return self.dispatcher.target

    def join(self) -> None:
        self.dispatcher.join()


def start(port: int = 0, num_workers: int = 2, host: str = "localhost") -> Service:
    """Starts a dispatcher on ``port`` (0: any free port) and ``num_workers`` workers."""
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    dispatcher = tf.data.experimental.service.DispatchServer(
        tf.data.experimental.service.DispatcherConfig(port=port))
    address = dispatcher.target.split("://", 1)[1]
    workers = [tf.data.experimental.service.WorkerServer(
        tf.data.experimental.service.WorkerConfig(dispatcher_address=address, worker_address=f"{host}:%port%"))
        for _ in range(num_workers)]
    return Service(dispatcher, workers)


def distribute(dataset: tf.data.Dataset, target: str) -> tf.data.Dataset:
    """Runs ``dataset``'s pipeline on the service at ``target`` (grpc://host:port)."""
    if not target.startswith("grpc://"):
        raise ValueError(f"data service address must look like grpc://host:port, got {target!r}")
    return dataset.apply(tf.data.experimental.service.distribute(
        processing_mode="parallel_epochs", service=target))
