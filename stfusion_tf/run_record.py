"""The record of a run: what a model directory was trained with.

``--mode=train`` writes ``<model_dir>/run.json`` before it trains: every
resolved config dataclass, the dataset and its location, the values of the
flags that define the run, the package versions and the command line (Model
Garden's ``params.yaml`` / SlowFast's ``cfg.dump()``).  The later modes
(``analyze``, ``export``, ``generalize``, ``fidelity``) read it, so
``--model_dir`` alone is enough to continue a run on its own geometry and data.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
import time

from stfusion_tf import files
from stfusion_tf.errors import UserError

FILE = "run.json"
FORMAT = "stfusion_tf.run.v1"
PACKAGES = ("stfusion_tf", "tensorflow", "keras", "tensorflow-probability", "tensorflow-io",
            "tf-models-official", "numpy", "absl-py")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def write(model_dir: str, flag_values: dict, configs: dict, command=None) -> dict:
    """Writes the record atomically; ``configs`` maps a name to a dataclass as a dict."""
    record = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "command": list(sys.argv if command is None else command),
              "versions": versions(), "flags": dict(flag_values), "configs": dict(configs)}
    files.write_json(os.path.join(model_dir, FILE), record)
    return record


def read(model_dir: str) -> dict | None:
    """The record of ``model_dir``, or None for a run that has none (trained by an
    older version, or not trained yet)."""
    path = os.path.join(model_dir, FILE)
    if not os.path.exists(path):
        return None
    try:
        record = files.read_json(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the run record {path}: {e}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise UserError(f"{path} is not a run record of this version (format {FORMAT})")
    return record
