"""stfusion_tf: spatiotemporal fusion in 3D CNNs from a probabilistic view.

The notebook API (``import stfusion_tf as sf``; docs/api.md)::

    sf.FusionUnit, sf.BlockKeep           # the fusion unit layer (gated or fixed)
    sf.VariationalDropPath, sf.GateConfig # its gates and their settings
    sf.FusionStrategy                     # one unit per position
    sf.build_template(preset_or_config, num_classes)           # gated: a template
    sf.build_backbone(preset_or_config, strategy, num_classes) # gate-free network
    sf.strategy_network(template, strategy)                    # ... with its weights
    sf.TemplateGates(model), sf.set_phase(model, variational)  # the gates of a model
    sf.marginals(model), sf.sample(model, n), sf.search(model, dataset)
    sf.load_run(model_dir)                # a trained run: template, marginals, ranking, Opt

Names resolve on first use, so ``import stfusion_tf`` does not load TensorFlow.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "FusionUnit": "stfusion_tf.model.fusion",
    "BlockKeep": "stfusion_tf.model.fusion",
    "VariationalDropPath": "stfusion_tf.model.gates",
    "GateConfig": "stfusion_tf.model.gates",
    "FusionStrategy": "stfusion_tf.model.strategy",
    "TemplateConfig": "stfusion_tf.model.template",
    "BackboneConfig": "stfusion_tf.model.backbones",
    "TemplateGates": "stfusion_tf.model.template",
    "strategy_network": "stfusion_tf.model.template",
    "assign_compute_prices": "stfusion_tf.analysis.cost",
    "marginals": "stfusion_tf.probability_space",
    "sample": "stfusion_tf.probability_space",
    "search": "stfusion_tf.probability_space",
    "load_run": "stfusion_tf.run_record",
    "UserError": "stfusion_tf.errors",
}
__all__ = sorted([*_EXPORTS, "build_template", "build_backbone", "set_phase", "presets"])


def _config(preset_or_config):
    if isinstance(preset_or_config, str):
        from stfusion_tf.model import template
        return template.preset(preset_or_config)
    return preset_or_config


def presets() -> tuple[str, ...]:
    """Every preset name ``build_template`` and ``build_backbone`` take."""
    from stfusion_tf.model import template
    return template.preset_names()


def build_template(preset_or_config, num_classes: int, gate=None, **kwargs):
    """A gated template: a preset name (``"tiny"``, ``"resnet_tiny"``, ``"resnet50"`` ...),
    a ``TemplateConfig`` or a ``BackboneConfig``; ``gate``: a ``GateConfig``."""
    from stfusion_tf.model import template
    from stfusion_tf.model.gates import GateConfig
    return template.build_template(_config(preset_or_config), num_classes, gate or GateConfig(),
                                   **kwargs)


def build_backbone(preset_or_config, strategy, num_classes: int, **kwargs):
    """The gate-free network of ``strategy`` (a ``FusionStrategy``, or a spec: ``"S"``,
    ``"ST"``, ``"S+ST"``, ``"paper"``, a per-stage unit list) on a preset or config."""
    from stfusion_tf.model import fusion_rules, template
    config = _config(preset_or_config)
    if isinstance(strategy, str):
        strategy = fusion_rules.resolve(strategy, config)
    return template.build_template(config, num_classes, strategy=strategy,
                                   name=kwargs.pop("name", "network"), **kwargs)


def set_phase(model, variational: bool) -> None:
    """Warm-up (``False``: gates pass everything, no regulariser) or v-DropPath training."""
    from stfusion_tf.model import gates
    gates.set_enabled(gates.gate_layers(model), variational)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'stfusion_tf' has no attribute {name!r}")
