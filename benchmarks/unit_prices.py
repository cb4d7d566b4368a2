"""What the prior weight term charges for each unit of a backbone template, beside its compute.

Per fusion unit and branch of ``--backbones`` templates at ``--frames`` x ``--crop``^2: the
kernel's weights n_W, the price of keeping the branch under ``--weight_term=prior`` (n_W / (k N)
nats with the code-form regulariser; k = ``--length_scale``, N = ``--dataset_size``) and the
branch's share of the template's MACs per clip.  Prints one JSON line per branch.  Seconds to run.

    .venv/bin/python benchmarks/unit_prices.py --backbones mobilenetv2_tiny,resnet_tiny
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbones", default="mobilenetv2_tiny,resnet_tiny")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--crop", type=int, default=32)
    ap.add_argument("--length_scale", type=float, default=20.0)
    ap.add_argument("--dataset_size", type=int, default=1024)
    a = ap.parse_args()
    from stfusion_tf.analysis import cost
    from stfusion_tf.model import backbones, gates
    from stfusion_tf.model import template as tpl
    from stfusion_tf.model.fusion import FusionUnit
    shape = (a.frames, a.crop, a.crop, 3)
    for name in a.backbones.split(","):
        cfg = backbones.template_preset(name, num_frames=a.frames, crop_size=a.crop)
        model = tpl.build_template(cfg, 4, gates.GateConfig(
            dataset_size=a.dataset_size, length_scale=a.length_scale, weight_term="prior"))
        total = cost.model_macs(model, shape)
        for layer, out in cost._shape_probe(model, shape):
            if not isinstance(layer, FusionUnit):
                continue
            for letter in layer.letters:
                conv = getattr(layer, f"{letter}_conv")
                n = int(np.prod(conv.kernel.shape))
                print(json.dumps({
                    "backbone": name, "unit": layer.key, "branch": letter.upper(), "weights": n,
                    "price_nats": round(n / (a.length_scale * a.dataset_size), 4),
                    "macs_share": round(cost._kernel_macs(conv, out) / total, 4)}))


if __name__ == "__main__":
    main()
