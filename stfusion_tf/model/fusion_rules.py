"""Fusion strategies for a backbone: uniform, the paper's hand rules, or read from a template.

A strategy spec (``--backbone_strategies``) is one of

* ``S``, ``ST``, ``S+ST``: the same unit everywhere;
* ``paper``: the paper's hand-designed "Opt" for the dataset family (digest §5,
  supplement §3): ``ss`` (Something-Something, motion-heavy), ``k400`` (Kinetics),
  ``ucf`` (UCF101).  DenseNet121 uses the paper's best sampled strategy of
  Fig. 4 (mapped by relative depth onto a smaller DenseNet);
* ``opt``: transferred from a trained template's analysis: its Opt strategy where
  the backbone has the template's positions (DenseNet, as the paper did, or a
  template of that very backbone) and can hold it; otherwise, per backbone
  position, the template's positions at the same spatial scale (``scale_of``:
  DenseNet block b and transition b, ResNet stage b+1, MobileNetV2 rows by their
  stride) and each branch kept where its expected use there (layer-level
  marginals, Eq. 7: P(S)+P(S+ST) for S, P(ST)+P(S+ST) for T) is at least 1/2
  (``from_marginals_by_branch``);
* ``opt_depth``: the rule before it, for comparison: the template's marginals
  averaged over the span of relative depth a position covers and the most
  probable of S, ST, S+ST taken (``from_marginals``);
* ``searched``: the Opt of a v-DropPath template *of that backbone* (resolved by
  ``--mode=generalize``, which trains and analyses it; ``resolve`` takes its
  analysis directory);
* a comma-separated list of units, one per stage (or row) or one per position;
* the path of a FusionStrategy JSON with the backbone's positions.
"""

from __future__ import annotations

import json
import math
import os
from typing import Sequence

import numpy as np

from stfusion_tf.errors import UserError
from stfusion_tf.model import backbones as bb
from stfusion_tf.model import template as tpl
from stfusion_tf.model.strategy import S, S_ST, ST, UNITS, FusionStrategy

FAMILIES = ("ss", "k400", "ucf")
#: Dataset -> family of the paper's hand rules.
DATASET_FAMILY = {"ssv1": "ss", "ssv2": "ss", "synthetic_motion": "ss", "kinetics400": "k400",
                  "folder": "k400", "ucf101": "ucf", "synthetic_appearance": "ucf",
                  "synthetic_fine_motion": "ss"}
_LETTER = {"S": S, "T": ST, "F": S_ST}


def family(dataset: str, choice: str = "auto") -> str:
    """The hand rules' family: ``choice``, or with ``auto`` the dataset's."""
    return DATASET_FAMILY[dataset] if choice == "auto" else choice

#: Best sampled strategies of the paper's Fig. 4 (DenseNet121 template), block by block.
PAPER_BEST = {
    "ssv1": "FFFFFT|S|FFFTFFFFFFFT|F|FFFFFFFFFFTFFTTFFTFTTTTF|F|TTTTFTFFFFFTFTTF",
    "ssv2": "FFFFFT|F|FFFFFTFFFTFF|F|FFFFFFFFFFFTFTFFTTFTFFFT|F|FFTTTFTTFFTFTTFT",
    "ucf101": "FFFFFF|F|FFFFFFFFFFFF|F|FFFFFFFFFFFFFFFFFFFFFFFF|F|FFFFFFFFFFFFFFFF",
    "kinetics400": "SFFFFF|F|FFFFSFSSFSSS|F|FTFFFFFSFFFFFFFFFFTFSSSS|F|FTFTTTTFFTFFFTFF",
}
_FAMILY_BEST = {"ss": "ssv1", "k400": "kinetics400", "ucf": "ucf101"}
#: MobileNetV2 rows (c = 16, 24, 32, 64, 96, 160, 320).
_MOBILENET = {"ss": "FFFTTFF", "k400": "FFSFSTF", "ucf": "FFFFFFF"}
#: Stage-3 pattern of ResNeXt101 (23 blocks) in the authors' code.
_RXT101_C4 = {"ss": "T" + "F" * 9 + "T" * 13, "k400": "S" * 5 + "F" * 10 + "S" * 4 + "T" * 4}


def relative_map(n_target: int, n_source: int) -> list[range]:
    """Source indices covering each target index by relative depth."""
    out = []
    for i in range(n_target):
        lo = math.floor(i * n_source / n_target)
        hi = max(lo + 1, math.ceil((i + 1) * n_source / n_target))
        out.append(range(lo, min(hi, n_source)))
    return out


def map_units(units: Sequence[str], n_target: int) -> list[str]:
    """Resamples a unit sequence to another depth (the unit at each relative depth)."""
    return [units[math.floor((i + 0.5) * len(units) / n_target)] for i in range(n_target)]


def _stages(positions: Sequence[str]) -> list[list[int]]:
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(positions):
        groups.setdefault(bb.stage_of(p), []).append(i)
    return list(groups.values())


def _stage_pairs(source_positions, target_positions):
    """(source indices, target indices) per stage when both have the same stages in
    order (template -> DenseNet of another depth), else one pair for the whole net."""
    src_names = list(dict.fromkeys(bb.stage_of(p) for p in source_positions))
    tgt_names = list(dict.fromkeys(bb.stage_of(p) for p in target_positions))
    if src_names == tgt_names:
        return list(zip(_stages(source_positions), _stages(target_positions)))
    return [(list(range(len(source_positions))), list(range(len(target_positions))))]


def from_marginals(table: np.ndarray, target_positions: Sequence[str],
                   source_positions: Sequence[str] | None = None) -> FusionStrategy:
    """Most probable unit per target position from marginal rows [P, >=3] (S, ST, S+ST),
    mapped by relative depth (within each stage when the stages correspond)."""
    table = np.asarray(table, np.float64)[:, :3]
    source_positions = source_positions or [f"P{i}" for i in range(len(table))]
    units = [None] * len(target_positions)
    for src, tgt in _stage_pairs(source_positions, target_positions):
        for t, cover in zip(tgt, relative_map(len(tgt), len(src))):
            rows = table[[src[c] for c in cover]]
            units[t] = (S, ST, S_ST)[int(np.argmax(rows.mean(0)))]
    return FusionStrategy(tuple(target_positions), tuple(units))


def scale_of(position: str) -> int | None:
    """The spatial scale a position works at, counted from the template's first block
    (1: stride 4 from the input, 2: stride 8, ...): DenseNet ``B<b>.L<i>`` and ``T<b>`` ->
    b; ResNet ``C<s>.B<j>`` -> s - 1; MobileNetV2 ``M<r>.B<j>`` -> its row's stride (rows
    1-2 -> 1, 3 -> 2, 4-5 -> 3, 6-7 -> 4).  None for other names."""
    head = position.split(".")[0]
    kind, digits = head[:1], head[1:]
    if not digits.isdigit():
        return None
    n = int(digits)
    if kind in ("B", "T"):
        return n
    if kind == "C":
        return n - 1
    if kind == "M":
        return {1: 1, 2: 1, 3: 2, 4: 3, 5: 3, 6: 4, 7: 4}.get(n)
    return None


def _scale_spans(source_positions, target_positions) -> list[list[int]] | None:
    """Per target position, the source indices at its spatial scale; None unless every
    target scale has some (then the caller falls back to relative depth)."""
    src = [scale_of(p) for p in source_positions]
    spans = []
    for p in target_positions:
        k = scale_of(p)
        span = [i for i, s in enumerate(src) if k is not None and s == k]
        if not span:
            return None
        spans.append(span)
    return spans


def from_marginals_by_branch(table: np.ndarray, target_positions: Sequence[str],
                             source_positions: Sequence[str]) -> FusionStrategy:
    """``opt``'s transfer: per target position, each branch kept where its expected use over
    the template's positions at the same spatial scale is >= 1/2 (else the more used one).

    Why per branch and per scale: the most probable of three units (``from_marginals``)
    drops a branch the template still uses at a scale as soon as another unit is more
    probable (S 0.40, S+ST 0.35, ST 0.25 gives S though T is used 60% of the time), and
    relative depth aligns a 4-stage ResNet with a DenseNet by position count, not by what
    the layers see; the spatial scale is what the two networks share."""
    table = np.asarray(table, np.float64)[:, :3]
    spans = _scale_spans(source_positions, target_positions)
    if spans is None:
        n = len(source_positions)
        spans = [list(r) for r in relative_map(len(target_positions), n)]
    units = []
    for span in spans:
        rows = table[span].mean(0)
        use_s, use_t = rows[0] + rows[2], rows[1] + rows[2]
        keep_s, keep_t = use_s >= 0.5, use_t >= 0.5
        if not (keep_s or keep_t):
            keep_s, keep_t = use_s >= use_t, use_t > use_s
        units.append(S_ST if keep_s and keep_t else (S if keep_s else ST))
    return FusionStrategy(tuple(target_positions), tuple(units))


def map_strategy(source: FusionStrategy, target_positions: Sequence[str]) -> FusionStrategy:
    """A strategy resampled onto other positions by relative depth (per stage if they match)."""
    units = [None] * len(target_positions)
    for src, tgt in _stage_pairs(source.positions, target_positions):
        mapped = map_units([source.units[i] for i in src], len(tgt))
        for t, u in zip(tgt, mapped):
            units[t] = u
    return FusionStrategy(tuple(target_positions), tuple(units))


def _decode(code: str) -> list[str]:
    return [_LETTER[c] for c in code.replace("|", "")]


def paper_rule(cfg, family: str) -> FusionStrategy:
    """The paper's hand-designed Opt for ``family`` on backbone ``cfg`` (a
    ``BackboneConfig`` or a DenseNet's ``TemplateConfig``)."""
    if family not in FAMILIES:
        raise UserError(f"family={family!r}; valid values: {', '.join(FAMILIES)}")
    pos = tpl.network_positions(cfg)
    if getattr(cfg, "arch", "densenet") == "densenet":
        full = tpl.template_positions(tpl.PRESETS["densenet121"])
        best = FusionStrategy(full, tuple(_decode(PAPER_BEST[_FAMILY_BEST[family]])))
        return map_strategy(best, pos)
    if cfg.arch == "mobilenetv2":
        rows = _decode(_MOBILENET[family])
        return FusionStrategy(pos, tuple(rows[int(p[1:].split(".")[0]) - 1] for p in pos))
    units = []
    for i, n in enumerate(cfg.depths):
        if family == "ucf":
            units += [S_ST] * n
        elif i == 2 and (family == "k400" or n == len(_RXT101_C4["ss"])):
            units += map_units(_decode(_RXT101_C4[family]), n)
        elif family == "ss":
            units += [ST if i == 2 else S_ST] * n
        else:  # k400: S+ST early, the stage-3 pattern, ST at the top
            units += [ST if i == len(cfg.depths) - 1 else S_ST] * n
    return FusionStrategy(pos, tuple(units))


def from_template(analysis_dir: str, cfg, rule: str = "branch") -> FusionStrategy:
    """``opt``: a template's Opt (same positions) or its marginals transferred by ``rule``:
    ``"branch"`` (``from_marginals_by_branch``) or ``"depth"`` (``from_marginals``)."""
    pos = tpl.network_positions(cfg)
    opt_path = os.path.join(analysis_dir, "opt_strategy.json")
    marg_path = os.path.join(analysis_dir, "marginals.json")
    if os.path.exists(opt_path):
        opt = FusionStrategy.load(opt_path)
        if opt.buildable(pos, tpl.none_positions(cfg)):
            return opt
    if not os.path.exists(marg_path):
        raise UserError(f"{marg_path} missing: run --mode=analyze on the template first")
    with open(marg_path) as f:
        rows = json.load(f)
    table = [[r["S"], r["ST"], r["S+ST"]] for r in rows]
    source = [r["position"] for r in rows]
    if rule == "depth":
        return from_marginals(table, pos, source)
    return from_marginals_by_branch(table, pos, source)


def resolve(spec: str, cfg, family: str = "ss",
            analysis_dir: str | None = None) -> FusionStrategy:
    """A FusionStrategy for backbone ``cfg`` (a ``BackboneConfig``, or a DenseNet's
    ``TemplateConfig``) from a spec string (see module docstring)."""
    pos = tpl.network_positions(cfg)
    if spec in (S, ST, S_ST):
        return FusionStrategy.uniform(pos, spec)
    if spec == "paper":
        return paper_rule(cfg, family)
    if spec in ("opt", "opt_depth", "searched"):
        if not analysis_dir:
            raise UserError(f"spec {spec!r} needs a template's analysis directory")
        return from_template(analysis_dir, cfg, "depth" if spec == "opt_depth" else "branch")
    if os.path.exists(spec):
        st = FusionStrategy.load(spec)
        try:
            st.check_buildable(pos, tpl.network_name(cfg), tpl.none_positions(cfg))
        except UserError as e:
            raise UserError(f"{spec}: {e}") from None
        return st
    units = [u.strip() for u in spec.split(",")]
    bad = [u for u in units if u not in UNITS]
    if bad:
        raise UserError(f"strategy spec {spec!r}: valid specs are S, ST, S+ST, paper, opt, "
                         "opt_depth, searched, a "
                         "FusionStrategy JSON path or a comma-separated unit list (units S, ST, "
                         "S+ST, none: a residual block's shortcut alone)")
    stages = list(dict.fromkeys(bb.stage_of(p) for p in pos))
    if len(units) == len(pos):
        st = FusionStrategy(pos, tuple(units))
    elif len(units) == len(stages):
        per_stage = dict(zip(stages, units))
        st = FusionStrategy(pos, tuple(per_stage[bb.stage_of(p)] for p in pos))
    else:
        st = None
    if st is not None:
        st.check_buildable(pos, tpl.network_name(cfg), tpl.none_positions(cfg))
        return st
    raise UserError(f"strategy spec {spec!r} has {len(units)} units; give one per stage "
                     f"({len(stages)}: {', '.join(stages)}) or one per position ({len(pos)})")
