"""Channel spaces of a LegoGraph: which channels must be pruned together.

Every tensor value's channel axis is described by a *layout*: a list of
segments `(atom, factor)`. An atom is a set of channels produced together (the
outputs of one conv or linear layer, the image channels, the output of an
opaque op); `factor` > 1 appears after a flatten, where each channel becomes
`factor` consecutive features (channel-major, as torch.flatten orders them).
A concatenation's layout is its parts' segments in order. Element-wise ops
between two feature maps (residual adds) tie their operands' atoms into one
(union-find), so a residual stream keeps one set of channels everywhere.

Atoms that touch an opaque op, the image input, the input of a layer norm
(its statistics span every channel) and grouped (not depthwise) convs are
*fixed*: never pruned. That keeps every pruned graph exactly
executable without understanding every op.
"""

from __future__ import annotations

import torch

from lego_core.graph import LegoGraph, Node, Ref

Layout = list[tuple[int, int]]  # (atom id, factor)


class ChannelSpaces:
    def __init__(self, graph: LegoGraph):
        self.graph = graph
        self.sizes: list[int] = []
        self.parent: list[int] = []
        self._fixed: set[int] = set()
        self.layout: dict[str, Layout] = {}
        for node in graph.nodes:
            self._visit(node)

    # -- union-find over atoms
    def new_atom(self, size: int, fixed: bool = False) -> int:
        self.sizes.append(size)
        self.parent.append(len(self.parent))
        if fixed:
            self._fixed.add(len(self.parent) - 1)
        return len(self.parent) - 1

    def root(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.root(a), self.root(b)
        if ra != rb:
            self.parent[rb] = ra
            if rb in self._fixed:
                self._fixed.add(ra)

    def fix(self, layout: Layout) -> None:
        for a, _ in layout:
            self._fixed.add(a)

    def is_fixed(self, a: int) -> bool:
        r = self.root(a)
        return r in self._fixed or any(self.root(f) == r for f in self._fixed)

    # -- building layouts
    def _tensor_refs(self, node: Node) -> list[str]:
        return [r for r in node.refs() if r in self.layout]

    def _visit(self, node: Node) -> None:
        g = self.graph
        kind = node.kind
        if kind == "input":
            self.layout[node.name] = [(self.new_atom(node.channels, fixed=True), 1)]
        elif kind == "scalar":
            return
        elif kind == "conv":
            src = self.layout[node.args[0].name]
            if is_depthwise(node, g):
                self.layout[node.name] = src
            else:
                _, _, _, groups = node.conv_options()
                if groups != 1:
                    self.fix(src)
                self.layout[node.name] = [(self.new_atom(node.channels, fixed=groups != 1), 1)]
        elif kind == "linear":
            self.layout[node.name] = [(self.new_atom(node.channels), 1)]
        elif kind in ("bn", "pass", "getitem", "permute"):
            self.layout[node.name] = self.layout[self._tensor_refs(node)[0]]
        elif kind == "norm":  # statistics over every input channel: kept whole
            src = self.layout[self._tensor_refs(node)[0]]
            self.fix(src)
            self.layout[node.name] = src
        elif kind == "tie":
            a, b = (self.layout[r] for r in self._tensor_refs(node)[:2])
            if self._same_structure(a, b):
                for (x, _), (y, _) in zip(a, b, strict=True):
                    self.union(x, y)
            else:
                self.fix(a)
                self.fix(b)
            self.layout[node.name] = a
        elif kind == "cat":
            self.layout[node.name] = [seg for p in node.args[0] for seg in self.layout[p.name]]
        elif kind == "flatten":
            src_name = self._tensor_refs(node)[0]
            src = g.node(src_name)
            spatial = 1
            for d in src.shape[1:]:
                spatial *= d
            self.layout[node.name] = [(a, f * spatial) for a, f in self.layout[src_name]]
        else:  # opaque
            for r in self._tensor_refs(node):
                self.fix(self.layout[r])
            if node.shape:
                self.layout[node.name] = [(self.new_atom(node.channels, fixed=True), 1)]

    def _same_structure(self, a: Layout, b: Layout) -> bool:
        return len(a) == len(b) and all(
            fa == fb and self.sizes[x] == self.sizes[y]
            for (x, fa), (y, fb) in zip(a, b, strict=True)
        )

    # -- masks <-> atoms
    def demand(self, value: str, mask: torch.Tensor, kept: dict[int, torch.Tensor]) -> None:
        """ORs a channel mask over `value` into the per-atom demand `kept`."""
        offset = 0
        for a, f in self.layout[value]:
            n = self.sizes[a] * f
            part = mask[offset : offset + n].view(self.sizes[a], f).any(1)
            r = self.root(a)
            kept[r] = kept[r] | part if r in kept else part.clone()
            offset += n

    def keep_indices(self, demanded: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Sorted channel indices kept for every atom root. Fixed atoms keep all;
        an atom that nothing demands keeps one channel so shapes stay valid."""
        out: dict[int, torch.Tensor] = {}
        for a in range(len(self.sizes)):
            r = self.root(a)
            if r in out:
                continue
            if self.is_fixed(r):
                out[r] = torch.arange(self.sizes[r])
                continue
            m = demanded.get(r)
            idx = torch.nonzero(m).flatten() if m is not None else torch.zeros(0, dtype=torch.long)
            out[r] = idx if idx.numel() else torch.zeros(1, dtype=torch.long)
        return out

    def value_indices(self, value: str, keep: dict[int, torch.Tensor]) -> torch.Tensor:
        """Indices into `value`'s channel axis that survive pruning, in order."""
        parts, offset = [], 0
        for a, f in self.layout[value]:
            idx = keep[self.root(a)]
            parts.append((idx[:, None] * f + torch.arange(f)[None, :]).flatten() + offset)
            offset += self.sizes[a] * f
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def is_depthwise(node: Node, graph: LegoGraph) -> bool:
    if node.kind != "conv":
        return False
    _, _, _, groups = node.conv_options()
    w = graph.tensors[node.weight_key()]
    in_channels = graph.node(node.args[0].name).channels
    return groups > 1 and groups == in_channels == w.shape[0] and w.shape[1] == 1


def tensor_refs(graph: LegoGraph) -> dict[str, list[str]]:
    """For every node, the tensor values it reads (in argument order)."""
    return {
        node.name: [r for r in node.refs() if graph.node(r).shape is not None]
        for node in graph.nodes
    }


def backward_masks(
    graph: LegoGraph,
    output_masks: torch.Tensor,
    layer_rule,
) -> dict[str, torch.Tensor]:
    """Propagates relevance from the output back through the graph, for several
    output masks at once: `output_masks` is [K, outputs] bool, one row per walk
    (per class), and every mask below is [K, channels].

    `layer_rule(node, out_masks) -> in_masks` decides, for a located layer, which
    of its inputs matter given which of its outputs matter (MDA's rule), for all K
    rows. Every other op routes masks by its channel semantics, row by row. Returns
    the [K, inputs] masks each located layer demands of its input, keyed by layer
    name. One walk for all classes: on models of many small layers the per-op
    Python work of a walk costs more than the masks."""
    refs_of = tensor_refs(graph)
    rows = output_masks.shape[0]
    masks: dict[str, torch.Tensor] = {graph.output_name: output_masks.clone()}
    demands: dict[str, torch.Tensor] = {}

    def give(value: str, m: torch.Tensor) -> None:
        node = graph.node(value)
        if node.shape is None:
            return
        if m.shape[1] != node.channels:  # broadcast operand (e.g. [B, 1, H, W])
            m = m.any(1, keepdim=True).expand(rows, node.channels)
        masks[value] = (
            masks[value] | m if value in masks else m.clone(memory_format=torch.contiguous_format)
        )

    for node in reversed(graph.nodes):
        m = masks.get(node.name)
        if m is None or node.kind in ("input", "scalar"):
            continue
        refs = refs_of[node.name]
        if node.kind in ("conv", "linear"):
            m_in = m.clone() if is_depthwise(node, graph) else layer_rule(node, m)
            demands[node.layer] = m_in
            give(node.args[0].name, m_in)
        elif node.kind in ("bn", "pass", "getitem", "permute"):
            give(refs[0], m)
        elif node.kind == "tie":
            for r in refs[:2]:
                give(r, m)
        elif node.kind == "cat":
            offset = 0
            for p in node.args[0]:
                c = graph.node(p.name).channels
                give(p.name, m[:, offset : offset + c])
                offset += c
        elif node.kind == "flatten":
            src = graph.node(refs[0])
            give(refs[0], m.reshape(rows, src.channels, -1).any(2))
        else:  # opaque: every input channel may matter
            for r in refs:
                give(r, torch.ones(rows, graph.node(r).channels, dtype=torch.bool))
    return demands


def layer_input_value(node: Node) -> str:
    arg = node.args[0]
    assert isinstance(arg, Ref)
    return arg.name
