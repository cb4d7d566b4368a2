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


class Run:
    """A trained run, read through its record (``load_run``): the template, its
    marginals, the ranking of sampled strategies and Opt, and gate-free networks."""

    def __init__(self, model_dir: str, record: dict):
        self.model_dir, self.record = model_dir, record
        self._template = None

    def _analysis(self, name: str) -> str:
        return os.path.join(self.model_dir, "analysis", name)

    @property
    def template(self):
        """The trained template (``template.keras``), loaded once."""
        if self._template is None:
            from stfusion_tf import saved_template
            self._template = saved_template.load_template(self.model_dir)
        return self._template

    @property
    def positions(self) -> tuple[str, ...]:
        return tuple(self.template.positions)

    @property
    def marginals(self) -> list[dict]:
        """Per position: p_S, p_T and the marginals of S, ST, S+ST, none (Eq. 7)."""
        from stfusion_tf import probability_space
        return probability_space.marginals(self.template)

    @property
    def ranking(self) -> list[dict]:
        """Sampled strategies scored by ``--mode=analyze``, best first ([] before it ran)."""
        from stfusion_tf.analysis import ranking
        rows, _ = files.read_jsonl(self._analysis("ranking.jsonl")) \
            if os.path.exists(self._analysis("ranking.jsonl")) else ([], 0)
        return sorted(rows, key=ranking.order)

    @property
    def opt(self):
        """The Opt ``FusionStrategy`` ``--mode=analyze`` chose (None before it ran)."""
        from stfusion_tf.model.strategy import FusionStrategy
        path = self._analysis("opt_strategy.json")
        return FusionStrategy.load(path) if os.path.exists(path) else None

    def network(self, strategy=None):
        """The gate-free network of ``strategy`` (default Opt) with the template's weights."""
        from stfusion_tf.model.template import strategy_network
        strategy = strategy or self.opt
        if strategy is None:
            raise UserError(f"{self.model_dir} has no Opt yet: run --mode=analyze first")
        return strategy_network(self.template, strategy)


def load_run(model_dir: str) -> Run:
    """The run in ``model_dir`` (``--mode=train`` wrote it) as a ``Run``."""
    record = read(model_dir)
    if record is None:
        raise UserError(f"{model_dir} holds no run record ({FILE}); train one with "
                        f"python -m stfusion_tf.main --mode=train --model_dir={model_dir}")
    return Run(model_dir, record)
