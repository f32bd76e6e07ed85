"""Disassembly (MDA section 4): the component for a class set as a real,
smaller network.

The masks of the requested classes are OR-ed per layer and mapped onto the
graph's channel atoms (lego_core.channels); every conv, linear and batch-norm
node then keeps only the surviving channels of its input and output. Channels
tied by a residual add are kept together; the image channels, and channels
that reach an op we do not model, are never removed. The last layer keeps only
the logits of the class set, in the order asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from lego_core.channels import is_depthwise
from lego_core.errors import UnknownClassError
from lego_core.graph import GraphNet, LegoGraph, Node, Param, Ref
from lego_core.locate import Components
from lego_core.model import SourceModel
from lego_core.spec import InputSpec


@dataclass
class Component:
    """A disassembled component: classifies `class_names` (a subset of the
    source's classes, in this order) on normalised inputs of `spec`."""

    graph: LegoGraph
    spec: InputSpec
    class_names: list[str]
    class_indices: list[int]  # into the source model's classes
    source: str = ""
    # Calibration samples (dataset rows per output position) for scaling.
    selected: dict[int, torch.Tensor] = field(default_factory=dict)
    # Per located layer: [input channels the component holds, input channels of the
    # source]. Channels in spaces that cannot be pruned count as held, whatever
    # the masks say (see `lego_core.channels`).
    kept_inputs: dict[str, list[int]] = field(default_factory=dict)

    def net(self) -> GraphNet:
        return GraphNet(self.graph).eval()


def input_means(
    model: SourceModel, data, indices: torch.Tensor, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """The mean input of every linear and ungrouped conv layer over the images
    `indices` of `data`, in the form a constant bias needs: linear [P]; conv
    [P, kh*kw], the mean over images and output positions of the value each
    kernel tap reads (padding reads zeros). The forward passes run on `device`; the
    means are returned on the CPU."""
    return input_means_and_logits(model, data, indices, device)[0]


@torch.no_grad()
def input_means_and_logits(
    model: SourceModel, data, indices: torch.Tensor, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """`input_means`, and the source's logits on the same images ([len(indices),
    classes], on the CPU) from the same forward passes."""
    from lego_core.contributions import tap_sums
    from lego_core.data import normalize
    from lego_core.locate import CONTRIBUTION_BATCH

    sums: dict[str, torch.Tensor] = {}
    weights = {n.layer: model.graph.tensors[n.weight_key()] for n in model.graph.layers()}

    def hook(node, x):
        if node.kind == "linear":
            if x.dim() > 2:  # channels-last map: the mean over positions
                x = x.flatten(1, -2).mean(1)
            total = x.double().sum(0)
        else:
            stride, padding, dilation, groups = node.conv_options()
            if groups != 1:
                return
            kh, kw = weights[node.layer].shape[2:]
            h, w = x.shape[2:]
            out_h = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
            out_w = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
            taps = tap_sums(x, (kh, kw), stride, padding, dilation)  # [B, P, K]
            total = taps.double().sum(0) / (out_h * out_w)
        sums[node.layer] = sums[node.layer] + total if node.layer in sums else total

    net = model.net().to(device)
    net.hook = hook
    logits = []
    for start in range(0, indices.numel(), CONTRIBUTION_BATCH):
        batch = data.images[indices[start : start + CONTRIBUTION_BATCH]].to(device)
        logits.append(net(normalize(batch, model.spec)).cpu())
    n = max(1, indices.numel())
    means = {layer: (total / n).float().cpu() for layer, total in sums.items()}
    logits = torch.cat(logits) if logits else torch.zeros(0, model.graph.num_outputs)
    return means, logits


def prune_graph(
    model: SourceModel,
    demanded: dict[int, torch.Tensor],
    output_order: list[int],
    means: dict[str, torch.Tensor] | None = None,
) -> LegoGraph:
    """Slices every parameter to the kept channels; `output_order` lists the
    source output channels that the pruned graph returns, in order.

    With `means` (from `input_means`), what each removed input contributed on
    average is folded into the bias of the outputs that read it, so the kept
    outputs keep their average operating point (mean compensation)."""
    graph, spaces = model.graph, model.spaces
    keep = spaces.keep_indices(demanded)
    out_layout = spaces.layout[graph.output_name]
    order = torch.tensor(output_order, dtype=torch.long)
    reorder_in_place = (
        len(out_layout) == 1 and out_layout[0][1] == 1 and not spaces.is_fixed(out_layout[0][0])
    )
    if reorder_in_place:
        # The logits atom keeps exactly the class set, in the requested order.
        keep[spaces.root(out_layout[0][0])] = order

    tensors = dict(graph.tensors)
    nodes: list[Node] = []
    for node in graph.nodes:
        if node.kind in ("conv", "linear"):
            out_idx = spaces.value_indices(node.name, keep)
            w = graph.tensors[node.weight_key()]
            if node.kind == "conv" and is_depthwise(node, graph):
                tensors[node.weight_key()] = w[out_idx].clone()
                node = _with_groups(node, int(out_idx.numel()))
            elif node.kind == "linear" or node.conv_options()[3] == 1:
                in_idx = spaces.value_indices(node.args[0].name, keep)
                rows = w.index_select(0, out_idx)  # (new tensors: the source's stay apart)
                tensors[node.weight_key()] = rows.index_select(1, in_idx)
                if node.bias_key():
                    tensors[node.bias_key()] = graph.tensors[node.bias_key()][out_idx].clone()
                if means is not None and node.layer in means:
                    mean = means[node.layer]
                    node = _fold_removed_inputs(node, rows, in_idx, mean, tensors)
                nodes.append(node)
                continue
            # grouped convs touch only fixed atoms: kept whole
            if node.bias_key():
                tensors[node.bias_key()] = graph.tensors[node.bias_key()][out_idx].clone()
        elif node.kind in ("bn", "norm"):
            idx = spaces.value_indices(node.name, keep)
            for a in node.args[1:5] if node.kind == "bn" else node.args[2:4]:
                if isinstance(a, Param):
                    tensors[a.key] = graph.tensors[a.key][idx].clone()
        nodes.append(node)

    output_name = graph.output_name
    if not reorder_in_place:
        # Rare: the logits are tied or produced by an op we keep whole; pick
        # the class set out of the surviving logits with a final gather.
        survivors = spaces.value_indices(output_name, keep).tolist()
        positions = torch.tensor([survivors.index(c) for c in output_order], dtype=torch.long)
        tensors["lego.output_order"] = positions
        select = Node(
            "lego_output_select",
            "opaque",
            torch.ops.aten.index_select.default,
            (Ref(output_name), 1, Param("lego.output_order")),
            shape=(len(output_order),),
        )
        nodes.append(select)
        output_name = select.name
    return LegoGraph(nodes, tensors, graph.input_name, output_name)


def _fold_removed_inputs(
    node: Node, w: torch.Tensor, in_idx: torch.Tensor, mean: torch.Tensor, tensors: dict
) -> Node:
    """Adds sum over removed inputs p of w[q, p] * mean input p to the bias of every
    kept output q (`w`: the kept outputs' weights over all inputs; `tensors` already
    holds the sliced bias). A layer without a bias gets one, a new parameter."""
    removed = torch.ones(w.shape[1], dtype=torch.bool)
    removed[in_idx] = False
    if not bool(removed.any()):
        return node
    mean = mean[removed].to(w.dtype)
    if node.kind == "linear":
        delta = w[:, removed] @ mean
    else:
        delta = (w[:, removed].flatten(2) * mean).sum((1, 2))
    key = node.bias_key()
    if key is not None:
        tensors[key] = tensors[key] + delta
        return node
    key = f"{node.weight_key()}.lego_mean_bias"
    tensors[key] = delta
    args = list(node.args)
    if len(args) < 3:
        args.append(Param(key))
    else:
        args[2] = Param(key)
    return replace(node, args=tuple(args))


def _with_groups(node: Node, groups: int) -> Node:
    args = list(node.args)
    pos = 8 if node.target is torch.ops.aten.convolution.default else 6
    args[pos] = groups
    return replace(node, args=tuple(args))


def class_set_demand(model: SourceModel, components: Components, classes: list[int]) -> dict:
    """OR of the requested classes' masks, as per-atom channel demands."""
    graph, spaces = model.graph, model.spaces
    missing = [model.class_names[c] for c in classes if c not in components.masks]
    if missing:
        raise UnknownClassError(
            f"no located component for class(es) {missing}: the locating dataset did not have them"
        )
    if components.layers != [n.layer for n in graph.layers()]:
        raise UnknownClassError("these components were located on a different model")
    demanded: dict[int, torch.Tensor] = {}
    for node in graph.layers():
        for c in classes:
            spaces.demand(node.args[0].name, components.masks[c][node.layer], demanded)
    logits = torch.zeros(graph.num_outputs, dtype=torch.bool)
    logits[classes] = True
    spaces.demand(graph.output_name, logits, demanded)
    return demanded


def disassemble(
    model: SourceModel,
    components: Components,
    classes,
    data=None,
    device: str | torch.device = "cpu",
    means: dict[str, torch.Tensor] | None = None,
) -> Component:
    """The component of `model` for `classes` (names or indices, in the order
    the component's logits will have).

    `data`: the dataset the components were located on. With it, the removed
    channels' mean contribution over the classes' located samples is folded into
    the biases of the layers that read them (mean compensation); without it,
    removed channels simply vanish, as in the paper. `device`: where the forward
    passes of mean compensation run (the component is on the CPU). `means`: the
    `input_means` of the classes' located samples, already computed (instead of
    `data`; the check scores the same class sets at several thresholds)."""
    idx = model.class_indices(classes)
    if means is None and data is not None:
        rows = [components.selected[c] for c in idx if c in components.selected]
        rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
        if rows.numel() and int(rows.max()) < len(data):
            means = input_means(model, data, rows, device=device)
    demanded = class_set_demand(model, components, idx)
    graph = prune_graph(model, demanded, idx, means)
    return Component(
        graph=graph,
        spec=model.spec,
        class_names=[model.class_names[c] for c in idx],
        class_indices=idx,
        source=model.name,
        selected={i: components.selected[c] for i, c in enumerate(idx) if c in components.selected},
        kept_inputs=kept_inputs(model, demanded),
    )


def kept_inputs(model: SourceModel, demanded: dict[int, torch.Tensor]) -> dict[str, list[int]]:
    """Per located layer, [input channels kept, input channels in the source] for
    the per-atom `demanded` channels, as `prune_graph` keeps them."""
    spaces = model.spaces
    keep = spaces.keep_indices(demanded)
    out = {}
    for node in model.graph.layers():
        value = node.args[0].name
        total = sum(spaces.sizes[a] * f for a, f in spaces.layout[value])
        out[node.layer] = [int(spaces.value_indices(value, keep).numel()), total]
    return out


def fixed_inputs(model: SourceModel) -> tuple[int, int]:
    """Input channels of the located layers (the image excepted) that no component
    can remove, because they feed a layer norm, a grouped conv or an op that is not
    modelled, and all such input channels: (fixed, total)."""
    spaces, graph = model.spaces, model.graph
    fixed = total = 0
    for node in graph.layers():
        value = node.args[0].name
        if value == graph.input_name:
            continue
        for a, f in spaces.layout[value]:
            total += spaces.sizes[a] * f
            fixed += spaces.sizes[a] * f if spaces.is_fixed(a) else 0
    return fixed, total


def fixed_inputs_warning(model: SourceModel, threshold: float = 0.25) -> str | None:
    """A sentence for the user when more than `threshold` of the located layers'
    input channels cannot be pruned (components then stay close to the source)."""
    fixed, total = fixed_inputs(model)
    if not total or fixed / total <= threshold:
        return None
    return (
        f"{fixed} of {total} input channels of this model's layers ({100 * fixed / total:.0f}%) "
        "cannot be pruned: they feed layer norms, grouped convs or operations that the engine "
        "keeps whole (e.g. channel shuffles, attention), so every component keeps them"
    )


def full_component(model: SourceModel, classes) -> Component:
    """The whole model restricted to `classes`' logits (nothing pruned)."""
    idx = model.class_indices(classes)
    demanded = {
        model.spaces.root(a): torch.ones(model.spaces.sizes[a], dtype=torch.bool)
        for a in range(len(model.spaces.sizes))
    }
    graph = prune_graph(model, demanded, idx)
    return Component(graph, model.spec, [model.class_names[c] for c in idx], idx, model.name)
