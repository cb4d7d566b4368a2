"""What a fusion strategy costs: multiply-accumulates (MACs) and parameters.

Counted from the architecture, not measured: ``template_costs`` walks a
``TemplateConfig`` (stem, dense layers, transitions, head) and gives the fixed
cost of everything outside the fusion units plus, per position, the cost of
its 1x1x1 (S) and 3x1x1 (T) branch.  A strategy's cost is the fixed part plus
the branches it keeps; it is the cost of its gate-free network
(``template.strategy_network``), one clip of the template's input size.
``network_costs`` gives the same from any built template (ResNet and MobileNetV2
too), where a ``none`` unit on a residual block also removes the rest of that
block's residual path.

Conventions (those of fvcore / ptflops): MACs of convolutions and fully
connected layers only, each output element costing its kernel's full
receptive field (zero-padded taps included); BatchNorm, ReLU, pooling, sums
and concatenations are not counted.  FLOPs are about 2 x MACs.  Parameters are
the trainable ones of the gate-free network: conv kernels (no bias),
BatchNorm gamma and beta, the classifier's kernel and bias.  A ``none`` unit
(both branches dropped) costs nothing at its branches; the rest of its layer
is counted as it is.

``model_macs`` counts the same MACs from a built Keras model's layer shapes
(any backbone), and the tests check both against each other and a hand count.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from stfusion_tf.model.strategy import UNIT_TO_KEEP, FusionStrategy


@dataclasses.dataclass(frozen=True)
class Cost:
    macs: int = 0
    params: int = 0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.macs + other.macs, self.params + other.params)


@dataclasses.dataclass(frozen=True)
class TemplateCosts:
    """The fixed cost of a template layout and the cost of each position's branches."""

    positions: tuple[str, ...]
    fixed: Cost
    s_branch: tuple[Cost, ...]
    t_branch: tuple[Cost, ...]
    #: Per position, the rest of its residual block (removed with a ``none`` unit);
    #: empty: no position is on a residual block (the DenseNet template).
    block: tuple[Cost, ...] = ()

    def of(self, strategy: FusionStrategy) -> Cost:
        """Cost of the gate-free network of ``strategy``."""
        if tuple(strategy.positions) != self.positions:
            raise ValueError("the strategy's positions are not the template's")
        total = self.fixed
        blocks = self.block or (Cost(),) * len(self.positions)
        for unit, s, t, block in zip(strategy.units, self.s_branch, self.t_branch, blocks):
            keep_s, keep_t = UNIT_TO_KEEP[unit]
            total = total + (s if keep_s else Cost()) + (t if keep_t else Cost())
            total = total + (block if keep_s or keep_t else Cost())
        return total

    def row(self, strategy: FusionStrategy) -> dict:
        """``{"macs", "params"}`` of ``strategy``, as stored in ranking rows."""
        c = self.of(strategy)
        return {"macs": int(c.macs), "params": int(c.params)}


def _conv(voxels: int, kernel: int, cin: int, cout: int) -> Cost:
    return Cost(voxels * kernel * cin * cout, kernel * cin * cout)


def _bn(channels: int) -> Cost:
    return Cost(0, 2 * channels)


def _out(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def _branches(voxels: int, cin: int, cout: int) -> tuple[Cost, Cost]:
    """S (BN + 1x1x1) and T (BN + 3x1x1) branch of a fusion unit."""
    return _bn(cin) + _conv(voxels, 1, cin, cout), _bn(cin) + _conv(voxels, 3, cin, cout)


def template_costs(config, num_classes: int) -> TemplateCosts:
    """Costs of the template of ``config`` (a ``template.TemplateConfig``), per clip."""
    from stfusion_tf.model.template import template_positions
    kt, kh, kw = config.stem_kernel
    ts = 2 if config.temporal_downsample else 1
    ss = config.stem_spatial_stride
    t = _out(config.num_frames, kt, ts, kt // 2)
    h = _out(config.crop_size, kh, ss, kh // 2)
    w = _out(config.crop_size, kw, ss, kw // 2)
    fixed = _conv(t * h * w, kt * kh * kw, 3, config.init_features) + _bn(config.init_features)
    t, h, w = _out(t, 3, ts, 1), _out(h, 3, 2, 1), _out(w, 3, 2, 1)  # stem max-pool
    channels, bw = config.init_features, config.bottleneck_width
    s_costs, t_costs = [], []
    for b, n_layers in enumerate(config.block_config, start=1):
        for _ in range(n_layers):
            s, tt = _branches(t * h * w, channels, bw)
            s_costs.append(s)
            t_costs.append(tt)
            fixed = fixed + _bn(bw) + _conv(t * h * w, 9, bw, config.growth_rate)
            channels += config.growth_rate
        if b < len(config.block_config):
            out = int(channels * config.compression)
            s, tt = _branches(t * h * w, channels, out)
            s_costs.append(s)
            t_costs.append(tt)
            channels = out
            pool_t = 2 if (config.temporal_downsample and b == 1) else 1
            t, h, w = t // pool_t, h // 2, w // 2
    fixed = fixed + _bn(channels) + Cost(channels * num_classes, channels * num_classes + num_classes)
    return TemplateCosts(template_positions(config), fixed, tuple(s_costs), tuple(t_costs))


def _shape_probe(model, input_shape):
    """(layer, output elements per clip) of every top-level layer of ``model`` that
    computes MACs: Conv3D, ``DepthwiseConv3D``, Dense (also behind a gate) and
    ``FusionUnit``."""
    import keras
    from stfusion_tf.model.backbones import input_geometry
    from stfusion_tf.model.fusion import FusionUnit
    from stfusion_tf.model.gates import VariationalDropPath
    from stfusion_tf.model.layers3d import DepthwiseConv3D
    shape = tuple(input_shape or input_geometry(model))
    if None in shape:
        raise ValueError(f"{model.name} takes any frame size: give an input_shape "
                         "(frames, height, width, channels)")
    kinds = (keras.layers.Conv3D, DepthwiseConv3D, keras.layers.Dense, FusionUnit)
    layers = [l for l in model.layers
              if isinstance(l.layer if isinstance(l, VariationalDropPath) else l, kinds)]
    # The networks are fully convolutional in space: shapes come from propagating a clip
    # of this shape through the graph (shape inference only, nothing is computed).
    outputs = [l.output[0] if isinstance(l.output, (list, tuple)) else l.output for l in layers]
    probe = keras.Model(model.inputs, outputs)
    specs = probe.compute_output_spec(keras.KerasTensor((1, *shape)))
    return [(l, int(np.prod(spec.shape[1:]))) for l, spec in zip(layers, specs)]


def _kernel_macs(layer, out: int) -> int:
    """MACs of one kernel layer (no gate, no fusion unit) with ``out`` output elements."""
    import keras
    from stfusion_tf.model.layers3d import DepthwiseConv3D
    if isinstance(layer, keras.layers.Conv3D):
        cin = int(layer.kernel.shape[-2])  # already divided by the groups
        return out * int(np.prod(layer.kernel_size)) * cin
    if isinstance(layer, DepthwiseConv3D):
        return out * layer.kernel_size ** 2
    return out * int(layer.kernel.shape[0])


def model_macs(model, input_shape=None) -> int:
    """MACs of one clip of ``input_shape`` (frames, height, width, channels; default: the
    geometry the network trains on, ``backbones.input_geometry``) through a built Keras
    model, from its layers' output shapes.

    Counts Conv3D (grouped too), ``DepthwiseConv3D`` and Dense layers, also
    inside Variational DropPath wrappers and fusion units; the same conventions as
    ``template_costs``.
    """
    from stfusion_tf.model.fusion import FusionUnit
    total = 0
    for layer, out in _shape_probe(model, input_shape):
        inner = getattr(layer, "layer", layer)
        convs = layer.convs if isinstance(layer, FusionUnit) else [inner]
        total += sum(_kernel_macs(c, out) for c in convs)
    return int(total)


def gate_macs(model, input_shape=None) -> dict:
    """MACs per clip of the kernel behind each Variational DropPath gate of ``model``
    (gate -> MACs), at ``input_shape`` (default: its training geometry)."""
    from stfusion_tf.model.fusion import FusionUnit
    from stfusion_tf.model.gates import VariationalDropPath
    out = {}
    for layer, size in _shape_probe(model, input_shape):
        if isinstance(layer, FusionUnit):
            out.update({g: _kernel_macs(conv, size) for *_, conv, g in layer.branches if g})
        elif isinstance(layer, VariationalDropPath):
            out[layer] = _kernel_macs(layer.layer, size)
    return out


def assign_compute_prices(model, input_shape=None) -> dict:
    """``weight_term="compute"``: charge each such gate of ``model`` the gates' total
    weights times its share of their MACs per clip (the prior's total price, shared out
    by compute).  Returns {gate name: charged weights}; {} without such gates."""
    from stfusion_tf.model.gates import gate_layers
    gates = [g for g in gate_layers(model) if g.weight_term == "compute"]
    if not gates:
        return {}
    macs = gate_macs(model, input_shape)
    missing = [g.name for g in gates if g not in macs]
    if missing:
        raise ValueError(f"weight_term=compute: no MACs found for {', '.join(missing)} (a gate "
                         "outside a FusionUnit must wrap a top-level layer of the model)")
    weights = sum(float(np.prod(g.layer.kernel.shape)) for g in gates)
    total = float(sum(macs[g] for g in gates))
    for g in gates:
        g.charged_weights = weights * macs[g] / total
    return {g.name: g.charged_weights for g in gates}


def _params(layer) -> int:
    """Trainable parameters of a layer in the gate-free network (no drop logits)."""
    return int(sum(np.prod(w.shape) for w in layer.trainable_weights
                   if not w.path.endswith("p_logit")))


def _residual_paths(model) -> dict:
    """Fusion unit name -> names of the other layers on its block's residual path: from
    the ``BlockKeep`` that scales the path back to the block's input (the first tensor
    that also feeds another layer, the shortcut)."""
    from stfusion_tf.model.fusion import BlockKeep, FusionUnit
    out = {}
    for layer in model.layers:
        if not isinstance(layer, BlockKeep):
            continue
        names, unit, node = [], None, layer._inbound_nodes[0].parent_nodes[0]
        while True:
            op = node.operation
            if isinstance(op, FusionUnit):
                unit = op.name
            elif len(op._outbound_nodes) > 1 or not node.parent_nodes:
                break
            else:
                names.append(op.name)
            node = node.parent_nodes[0]
        out[unit] = names
    return out


def network_costs(model) -> TemplateCosts:
    """``TemplateCosts`` of any gated template (DenseNet, ResNet, MobileNetV2) from its
    built layers: per position the S and T branch (their pre-activation BN included)
    and, on a residual block, the rest of the block's residual path, which a ``none``
    unit removes with the branches."""
    from stfusion_tf.model.fusion import FusionUnit
    by_layer = dict(_shape_probe(model, None))
    units = {l.key: l for l in model.layers if isinstance(l, FusionUnit)}
    paths = _residual_paths(model)
    on_path = {n: u for u, names in paths.items() for n in names}
    fixed, blocks = Cost(), {}
    for layer in model.layers:
        if isinstance(layer, FusionUnit):
            continue
        inner = getattr(layer, "layer", layer)
        c = Cost(_kernel_macs(inner, by_layer[layer]) if layer in by_layer else 0, _params(layer))
        if layer.name in on_path:
            blocks[on_path[layer.name]] = blocks.get(on_path[layer.name], Cost()) + c
        else:
            fixed = fixed + c
    s_costs, t_costs, block_costs = [], [], []
    for position in model.positions:
        unit = units[position.lower().replace(".", "_")]
        out = by_layer[unit]
        branch = {letter: Cost(_kernel_macs(conv, out), _params(conv) + (_params(bn) if bn else 0))
                  for letter, bn, _, conv, _ in unit.branches}
        s_costs.append(branch["s"])
        t_costs.append(branch["t"])
        block_costs.append(blocks.get(unit.name, Cost()))
    return TemplateCosts(tuple(model.positions), fixed, tuple(s_costs), tuple(t_costs),
                         tuple(block_costs))


def costs_of(model) -> TemplateCosts | None:
    """Costs of a built template's strategies: analytic for the DenseNet template's
    config, from the layers for any other; None for a model without a config (saved
    by an older version)."""
    from stfusion_tf.model.template import TemplateConfig
    config = getattr(model, "config", None)
    if config is None:
        return None
    if isinstance(config, TemplateConfig):
        return template_costs(config, int(model.output_shape[-1]))
    return network_costs(model)


def fits(row: dict, max_gmacs: float | None, max_params: float | None) -> bool:
    """Whether a ranking row (``macs``, ``params``) is within the budget."""
    if max_gmacs is not None and row["macs"] > max_gmacs * 1e9:
        return False
    return max_params is None or row["params"] <= max_params


def pareto_front(points) -> list[int]:
    """Indices of the (macs, accuracy) points no other point beats: no cheaper-or-equal
    point with higher-or-equal accuracy that is strictly better in one of them.
    Sorted by MACs."""
    pts = [(float(m), float(a)) for m, a in points]
    front = []
    for i, (m, a) in enumerate(pts):
        dominated = any(m2 <= m and a2 >= a and (m2 < m or a2 > a)
                        for j, (m2, a2) in enumerate(pts) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (pts[i][0], -pts[i][1]))


def best_within(rows: list[dict], max_macs: float) -> dict | None:
    """The best row whose MACs are at most ``max_macs``: video top-1, clip top-1, then (a
    cost question) fewer MACs, then the sample index."""
    within = [r for r in rows if r["macs"] <= max_macs]
    if not within:
        return None
    return min(within, key=lambda r: (-r["video_top1"], -r.get("clip_top1", 0.0), r["macs"],
                                      r.get("index", 0)))


def plot(rows: list[dict], uniform: dict, budget_gmacs: float | None = None,
         opt_key: str | None = None, title: str = "") -> bytes:
    """PNG: selection accuracy against GMACs of every sampled strategy, its Pareto
    front, the uniform strategies (``uniform``: name -> row) and the budget."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = np.array([r["macs"] / 1e9 for r in rows])
    acc = np.array([100 * r["video_top1"] for r in rows])
    front = pareto_front(zip(g, acc))
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    ax.scatter(g, acc, s=12, color="#888888", label="sampled strategies")
    ax.step(g[front], acc[front], where="post", color="#d62728", lw=1.2)
    ax.scatter(g[front], acc[front], s=18, color="#d62728", label="Pareto front")
    for (name, row), colour in zip(uniform.items(), ("#1f77b4", "#2ca02c", "#e6b800")):
        ax.scatter([row["macs"] / 1e9], [100 * row["video_top1"]], marker="s", s=45,
                   color=colour, edgecolor="black", label=f"uniform {name}", zorder=3)
    if opt_key is not None:
        opt = next(r for r in rows if r["key"] == opt_key)
        ax.scatter([opt["macs"] / 1e9], [100 * opt["video_top1"]], marker="*", s=140,
                   color="black", label="Opt", zorder=4)
    if budget_gmacs is not None:
        ax.axvline(budget_gmacs, color="black", ls="--", lw=0.8, label="budget")
    ax.set_xlabel("GMACs per clip")
    ax.set_ylabel("video top-1 (%), selection split")
    ax.set_title(title, fontsize=9, loc="left")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
