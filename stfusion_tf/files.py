"""Artefacts that appear complete or not at all, and the JSON / JSONL result files.

Every writer of the package goes through ``atomic_path``: the artefact (a file,
or a folder such as a SavedModel) is written under a temporary name next to its
place and renamed over it only when complete.  A crash, a full disk or an
exception mid-write leaves the previous complete artefact (or nothing) and no
temporary; a killed process's temporary is removed by the next write of the
same artefact on that host.  Result files that grow row by row (rankings, fidelity and
generalisation runs) are JSONL: one finished row per line, appended and
flushed, so an interrupted run resumes and a torn last line is detected.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time

_STALE_SECONDS = 600


def _temporary(path: str) -> str:
    """``a/b.keras`` -> ``a/b.tmp-<host>-<pid>.keras`` (Keras checks the extension);
    ``a/1`` -> ``a/1.tmp-<host>-<pid>``.  Per process, so two processes writing one
    artefact (workers of a job, maybe on a shared file system) never rename each
    other's temporary away."""
    root, ext = os.path.splitext(path)
    return f"{_temporary_prefix(root)}{os.getpid()}{ext}"


def _temporary_prefix(root: str) -> str:
    return f"{root}.tmp-{socket.gethostname()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, not ours to signal
        return True
    return True


def _remove_stale_temporaries(path: str) -> None:
    """Temporaries of ``path`` left by killed processes of this host (``kill -9`` runs no
    cleanup): a model's temporary is as large as the model, and each kill left one more.
    Best effort: only those of dead pids untouched for ``_STALE_SECONDS`` (a writer in
    another pid namespace with the same host name looks dead, but its temporary is fresh)."""
    root, ext = os.path.splitext(path)
    prefix = os.path.basename(_temporary_prefix(root))
    parent = os.path.dirname(os.path.abspath(path))
    for name in os.listdir(parent):
        if not name.startswith(prefix) or not name.endswith(ext):
            continue
        pid = name[len(prefix):len(name) - len(ext)]
        full = os.path.join(parent, name)
        try:
            if (pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid))
                    and time.time() - os.path.getmtime(full) > _STALE_SECONDS):
                _remove(full)
        except OSError:  # removed by another writer meanwhile, or not ours to remove
            pass


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


@contextlib.contextmanager
def atomic_path(path: str):
    """Yields a temporary path; on success it replaces ``path`` (file or folder).

    A folder is swapped in two renames (old aside, new in place), so at every
    moment either the old or the new complete folder is at ``path`` or beside it.
    """
    tmp = _temporary(path)
    _remove(tmp)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    _remove_stale_temporaries(path)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if os.path.isdir(tmp) and os.path.exists(path):
        old = path + ".old"
        _remove(old)
        os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)


def write_text(path: str, data: str | bytes) -> None:
    """Writes text or bytes atomically (flushed to disk before the rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=True))


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def save_keras(model, path: str) -> None:
    """``model.save`` through ``atomic_path``: a killed run never leaves a torn ``.keras``."""
    with atomic_path(path) as tmp:
        model.save(tmp)


def read_jsonl(path: str) -> tuple[list[dict], int]:
    """Rows of an append-only JSONL results file and the number of torn lines.

    A run killed mid-write leaves a cut last line; it is skipped (and counted) so
    the caller re-does that row, as is any other line that does not parse (garbled
    bytes).  A missing file reads as empty.
    """
    rows, torn = [], 0
    if not os.path.exists(path):
        return rows, torn
    with open(path, errors="replace") as f:  # garbled bytes make a bad line, not a crash
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict):
                rows.append(row)
            else:
                torn += 1
    return rows, torn


def rewrite_jsonl(path: str, rows) -> None:
    """Replaces a JSONL file with ``rows`` (e.g. to drop a torn line or stale rows)."""
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


class JsonlAppender:
    """Appends finished rows to a JSONL file, each flushed as soon as it is written."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._f = open(self.path, "a")
        return self

    def append(self, row: dict) -> None:
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def __exit__(self, *exc):
        self._f.close()
        return False
