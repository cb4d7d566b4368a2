"""``--mode=summary``: size and cost of a template preset, its uniform strategies, the
backbones, and of every strategy a run's analysis sampled.

Costs are MACs (multiply-accumulates of convolutions and classifier, one clip;
FLOPs are about 2x) and trainable parameters, as ``analysis/cost.py`` counts them.
"""

from __future__ import annotations

import os

import numpy as np

from stfusion_tf import files
from stfusion_tf.analysis import cost, ranking
from stfusion_tf.model import backbones
from stfusion_tf.model import template as tpl
from stfusion_tf.model.strategy import FusionStrategy

UNIFORM = ("S", "ST", "S+ST")


def _gmacs(macs: int) -> float:
    return round(macs / 1e9, 6)


def template_summary(preset: str, config, gate, num_classes: int) -> dict:
    """Parameter counts and MACs of the gated template (any preset: the DenseNet template
    or a backbone) and of the gate-free networks of its uniform strategies."""
    model = tpl.build_template(config, num_classes, gate)
    kernels = int(sum(np.prod(v.shape) for v in model.weights if v.path.endswith("kernel")))
    costs = cost.costs_of(model)
    strategies = {}
    for unit in UNIFORM:
        c = costs.of(FusionStrategy.uniform(costs.positions, unit))
        strategies[unit] = {"gmacs": _gmacs(c.macs), "params": c.params}
    return {"preset": preset, "network": tpl.network_name(config),
            "input": list(backbones.input_geometry(model)),
            "num_classes": num_classes,
            "positions": len(model.positions), **backbones.count_params(model),
            "params_conv_fc_kernels": kernels, "template_gmacs": _gmacs(cost.model_macs(model)),
            "strategies": strategies}


def backbone_summary(name: str, cfg: backbones.BackboneConfig, num_classes: int) -> dict:
    """Parameters and MACs of backbone ``name`` with each uniform unit."""
    pos = backbones.positions(cfg)
    row = {"backbone": name, "input": [cfg.num_frames, cfg.crop_size, cfg.crop_size, 3],
           "positions": len(pos)}
    for unit in UNIFORM:
        net = backbones.build_backbone(cfg, FusionStrategy.uniform(pos, unit), num_classes)
        row[f"params_{unit}"] = backbones.count_params(net)["params_trainable"]
        row[f"gmacs_{unit}"] = _gmacs(cost.model_macs(net, row["input"]))
    return row


def summarize(preset: str, config, gate, num_classes: int, backbone_cfgs: dict,
              model_dir: str) -> dict:
    """``--mode=summary``: the template, each backbone of ``backbone_cfgs`` (name ->
    BackboneConfig) and, when ``model_dir`` has an analysis, its sampled strategies."""
    out = template_summary(preset, config, gate, num_classes)
    out["backbones"] = [backbone_summary(name, cfg, num_classes)
                        for name, cfg in backbone_cfgs.items()]
    sampled = sampled_strategies(os.path.join(model_dir, "analysis"))
    if sampled is not None:
        out["sampled_strategies"] = {"model_dir": model_dir, "strategies": sampled}
    return out


def sampled_strategies(analysis_dir: str) -> list[dict] | None:
    """MACs, parameters and selection accuracy of every unique strategy in a run's
    ``ranking.jsonl``, most accurate first; None when there is none."""
    rows, _ = files.read_jsonl(os.path.join(analysis_dir, "ranking.jsonl"))
    rows = [r for r in rows if "duplicate_of" not in r]
    if not rows:
        return None
    rows.sort(key=ranking.order)
    return [{"index": r["index"], "code": r["code"], "video_top1": r["video_top1"],
             "gmacs": _gmacs(r["macs"]) if "macs" in r else None, "params": r.get("params")}
            for r in rows]
