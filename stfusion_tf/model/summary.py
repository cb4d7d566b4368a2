"""``--mode=summary``: parameter counts of a template preset and of backbones, built
(not trained) at the input geometry of a config, so full-size configs are shape-checked
on any machine."""

from __future__ import annotations

import numpy as np

from stfusion_tf.model import backbones
from stfusion_tf.model import template as tpl
from stfusion_tf.model.strategy import FusionStrategy


def parameter_summary(template_cfg: tpl.TemplateConfig, num_classes: int,
                      gate_cfg: tpl.GateConfig, backbone_names=(), **backbone_overrides) -> dict:
    """The template's input, positions and parameter counts (all, trainable, conv/FC
    kernels); per backbone, its positions and trainable parameters with S, ST or S+ST
    units everywhere."""
    model = tpl.build_template(template_cfg, num_classes, gate_cfg)
    kernels = int(sum(np.prod(v.shape) for v in model.weights if v.path.endswith("kernel")))
    out = {"input": list(backbones.input_geometry(model)), "num_classes": num_classes,
           "positions": len(model.positions), **backbones.count_params(model),
           "params_conv_fc_kernels": kernels, "backbones": []}
    for name in backbone_names:
        cfg = backbones.preset(name, **backbone_overrides)
        pos = backbones.positions(cfg)
        row = {"backbone": name, "input": [cfg.num_frames, cfg.crop_size, cfg.crop_size, 3],
               "positions": len(pos)}
        for unit in ("S", "ST", "S+ST"):
            net = backbones.build_backbone(cfg, FusionStrategy.uniform(pos, unit), num_classes)
            row[f"params_{unit}"] = backbones.count_params(net)["params_trainable"]
        out["backbones"].append(row)
    return out
