"""One run per directory: an advisory lock that dies with its holder.

``hold(directory)`` takes an exclusive ``flock`` on ``<directory>/run.lock`` and
writes who holds it (pid, host, mode, start time) into the file.  A second run on
the same directory finds the lock taken and stops with a message naming the
holder.  The kernel drops the lock when the holding process ends, however it ends
(``kill -9``, a crash, a lost machine's NFS lease), so a crashed run never leaves
the directory locked: the next run simply takes the lock over.  The file itself
stays; its content names the last holder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time

from stfusion_tf.errors import UserError

FILE = "run.lock"


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process"
    return (f"pid {info.get('pid')} on {info.get('host')}, {info.get('what')}, since "
            f"{info.get('since')}")


@contextlib.contextmanager
def hold(directory: str, what: str, flag: str = "--model_dir"):
    """Holds ``directory``'s lock for the ``with`` block; ``what`` names the run in the
    holder line.  Raises ``UserError`` when another live process holds it."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise UserError(f"{flag}={directory} is a file, not a directory")
    os.makedirs(directory, exist_ok=True)
    fd = os.open(os.path.join(directory, FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{flag}={directory} is in use by another run ({_holder(fd)}); "
                            f"wait for it to end or give another {flag}") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def is_chief(distribution: str, tf_config: str | None) -> bool:
    """Whether this process is the chief of its job (the one that writes the model
    directory), from ``--distribution`` and ``TF_CONFIG``, before TensorFlow loads."""
    if distribution != "multi_worker" or not tf_config:
        return True
    try:
        cfg = json.loads(tf_config)
    except ValueError:
        raise UserError("TF_CONFIG is not valid JSON") from None
    task, cluster = cfg.get("task", {}), cfg.get("cluster", {})
    kind, index = task.get("type"), int(task.get("index", 0))
    if kind in (None, "chief"):
        return True
    return kind == "worker" and index == 0 and "chief" not in cluster


def for_model_dir(mode: str, model_dir: str, distribution: str, tf_config: str | None):
    """The model-directory lock of one run of ``mode``: held by the chief of a multi-worker
    job only; modes that only read a run do not create its directory; none for
    ``prepare`` and ``verify``."""
    if mode in ("prepare", "verify") or not is_chief(distribution, tf_config):
        return contextlib.nullcontext()
    if mode not in ("train", "all") and not os.path.isdir(model_dir):
        return contextlib.nullcontext()
    return hold(model_dir, f"--mode={mode}")


def for_data_dir(data_dir: str, mode: str):
    """The data-directory lock of ``prepare`` and ``verify`` (none for a URL)."""
    if "://" in data_dir:
        return contextlib.nullcontext()
    return hold(data_dir, f"--mode={mode}", flag="--data_dir")
