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

    def net(self) -> GraphNet:
        return GraphNet(self.graph).eval()


def prune_graph(
    model: SourceModel, demanded: dict[int, torch.Tensor], output_order: list[int]
) -> LegoGraph:
    """Slices every parameter to the kept channels; `output_order` lists the
    source output channels that the pruned graph returns, in order."""
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
                tensors[node.weight_key()] = w[out_idx][:, in_idx].clone()
            # grouped convs touch only fixed atoms: kept whole
            if node.bias_key():
                tensors[node.bias_key()] = graph.tensors[node.bias_key()][out_idx].clone()
        elif node.kind == "bn":
            idx = spaces.value_indices(node.name, keep)
            for a in node.args[1:5]:
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


def disassemble(model: SourceModel, components: Components, classes) -> Component:
    """The component of `model` for `classes` (names or indices, in the order
    the component's logits will have)."""
    idx = model.class_indices(classes)
    graph = prune_graph(model, class_set_demand(model, components, idx), idx)
    return Component(
        graph=graph,
        spec=model.spec,
        class_names=[model.class_names[c] for c in idx],
        class_indices=idx,
        source=model.name,
        selected={i: components.selected[c] for i, c in enumerate(idx) if c in components.selected},
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
