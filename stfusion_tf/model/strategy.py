"""FusionStrategy: one fusion unit per position of a network.

A position is a place in a network that holds one fusion unit (a dense layer
``B2.L5`` or a transition ``T1`` of the template; a bottleneck block of a
backbone). The unit says which of the two parallel branches is kept:

=========  ===============  =================================================
unit       kept branches    meaning
=========  ===============  =================================================
``S``      1x1x1 only       2D unit: 1x1x1 then 1x3x3
``ST``     3x1x1 only       factorised 3D unit: 3x1x1 then 1x3x3
``S+ST``   both, summed     fused unit
``none``   neither          both branches dropped: on a residual block the
                            block is its residual path alone; elsewhere
                            (DenseNet layers, MobileNetV2 blocks that change
                            width or stride) it cannot be built
=========  ===============  =================================================

The same type is used by the template (gate masks), the probability-space
analysis (sampled strategies), the backbone builders and the export.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from typing import Sequence

import numpy as np

from stfusion_tf.errors import UserError

S = "S"
ST = "ST"
S_ST = "S+ST"
NONE = "none"
UNITS = (S, ST, S_ST, NONE)
#: Unit -> (keep 1x1x1 branch, keep 3x1x1 branch).
UNIT_TO_KEEP = {S: (1, 0), ST: (0, 1), S_ST: (1, 1), NONE: (0, 0)}
KEEP_TO_UNIT = {v: k for k, v in UNIT_TO_KEEP.items()}
#: Unit codes in the integer form used by the exported sampler.
UNIT_CODES = {S: 0, ST: 1, S_ST: 2, NONE: 3}
#: One-letter codes of the paper's Fig. 4 ("F" = fused = S+ST, "T" = ST).
UNIT_LETTERS = {S: "S", ST: "T", S_ST: "F", NONE: "-"}


def _span(positions: Sequence[str]) -> str:
    """``"8: C2.B1, C3.B1, ..."``: a count and the names, short enough for one line."""
    names = list(positions)
    shown = ", ".join(names if len(names) <= 12 else names[:6] + ["..."] + names[-3:])
    return f"{len(names)}: {shown}"


def _check_unit(unit: str) -> str:
    if unit not in UNIT_TO_KEEP:
        raise ValueError(f"unknown fusion unit {unit!r}; valid units: {', '.join(UNITS)}")
    return unit


@dataclasses.dataclass(frozen=True)
class FusionStrategy:
    """An immutable mapping position -> unit, in network order."""

    positions: tuple[str, ...]
    units: tuple[str, ...]

    def __post_init__(self):
        object.__setattr__(self, "positions", tuple(self.positions))
        object.__setattr__(self, "units", tuple(_check_unit(u) for u in self.units))
        if len(self.positions) != len(self.units):
            raise ValueError(
                f"{len(self.positions)} positions but {len(self.units)} units")
        if len(set(self.positions)) != len(self.positions):
            raise ValueError("duplicate position names")

    # -- constructors -------------------------------------------------------
    @classmethod
    def uniform(cls, positions: Sequence[str], unit: str) -> "FusionStrategy":
        return cls(tuple(positions), (_check_unit(unit),) * len(positions))

    @classmethod
    def from_mask(cls, positions: Sequence[str], mask) -> "FusionStrategy":
        """From a keep mask of shape [P, 2] (columns: 1x1x1 branch, 3x1x1 branch)."""
        mask = np.asarray(mask)
        if mask.shape != (len(positions), 2):
            raise ValueError(f"mask shape {mask.shape} != ({len(positions)}, 2)")
        if not np.all((mask == 0) | (mask == 1)):
            raise ValueError("mask must hold only 0 and 1")
        units = tuple(KEEP_TO_UNIT[(int(a), int(b))] for a, b in mask)
        return cls(tuple(positions), units)

    @classmethod
    def from_dict(cls, d: dict) -> "FusionStrategy":
        if "positions" in d and "units" in d:
            return cls(tuple(d["positions"]), tuple(d["units"]))
        raise ValueError("a FusionStrategy JSON needs 'positions' and 'units' lists")

    @classmethod
    def from_json(cls, text: str) -> "FusionStrategy":
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: str) -> "FusionStrategy":
        try:
            with open(path) as f:
                return cls.from_json(f.read())
        except (OSError, ValueError) as e:
            raise UserError(f"{path} is not a readable FusionStrategy JSON ({e}); if the "
                            "analysis wrote it, re-run --mode=analyze") from None

    # -- conversions --------------------------------------------------------
    def to_mask(self) -> np.ndarray:
        """Keep mask [P, 2] float32 (column 0: 1x1x1 branch, column 1: 3x1x1)."""
        return np.array([UNIT_TO_KEEP[u] for u in self.units], dtype=np.float32).reshape(-1, 2)

    def to_dict(self) -> dict:
        return {"positions": list(self.positions), "units": list(self.units),
                "code": self.code(), "counts": self.counts()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str) -> None:
        """Writes atomically: the file appears only when complete."""
        from stfusion_tf import files
        files.write_text(path, self.to_json())

    def code(self) -> str:
        """Compact code as in the paper's tables, e.g. ``FFFFFT|S|FF...``.

        Positions are grouped by the part of their name before ``.`` (a block
        ``B2`` of the template, a stage ``C3`` of a ResNet); a position without
        ``.`` (a transition) stands alone, so the template reads as in Fig. 4.
        """
        out, group, prefix = [], [], None
        for pos, unit in zip(self.positions, self.units):
            head = pos.split(".")[0] if "." in pos else None
            if group and (head is None or head != prefix):
                out.append("".join(group))
                group = []
            if head is None:
                out.append(UNIT_LETTERS[unit])
            else:
                group.append(UNIT_LETTERS[unit])
            prefix = head
        if group:
            out.append("".join(group))
        return "|".join(out)

    def counts(self) -> dict:
        c = collections.Counter(self.units)
        return {u: c.get(u, 0) for u in UNITS}

    def buildable(self, positions: Sequence[str], none_positions=frozenset()) -> bool:
        """Whether ``check_buildable`` would pass."""
        try:
            self.check_buildable(positions, "network", none_positions)
        except UserError:
            return False
        return True

    def check_buildable(self, positions: Sequence[str], network: str,
                        none_positions=frozenset()) -> None:
        """Raises a ``UserError`` unless a network without gates (``network`` names it
        in the message) can be built from this strategy: the same positions, and
        ``none`` only at ``none_positions`` (residual blocks)."""
        positions = tuple(positions)
        if self.positions != positions:
            raise UserError(f"positions do not match: the strategy has {_span(self.positions)}; "
                            f"the {network} has {_span(positions)}")
        bad = [p for p, u in zip(self.positions, self.units) if u == NONE and p not in none_positions]
        if bad:
            raise UserError(f"the {network} cannot hold the unit 'none' (both branches dropped) "
                            f"at {bad[0]}: no residual path there; valid units: S, ST, S+ST")

    def __getitem__(self, position: str) -> str:
        return self.units[self.positions.index(position)]

    def __len__(self) -> int:
        return len(self.units)

    def key(self) -> str:
        """A hashable identity used to recognise duplicate samples."""
        return "".join(UNIT_LETTERS[u] for u in self.units)
