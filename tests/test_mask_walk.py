"""The mask phase walks the graph once for all classes (`backward_masks` with one
row per class, `mda_layer_rule` over blocks of classes): its masks must be exactly
those of MDA's rule applied one class at a time, as section 3 reads, on graphs with
residual adds, concatenations, channel shuffles, squeeze-excite gates, grouped and
depthwise convs, flattens, and linear layers on signed inputs."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torchvision.models as tvm
from test_locate_memory import Mixed

from lego_core import CIFAR10_SPEC, ImageFolderData, source_from_module
from lego_core.channels import is_depthwise
from lego_core.locate import (
    DEFAULT_ALPHA,
    DEFAULT_BETA,
    contribution_sums,
    is_conv_like,
    layer_sums,
    masks_from_sums,
    sample_order,
    select_samples,
)

locate_module = importlib.import_module("lego_core.locate")  # (lego_core.locate: the function)
CLASSES = [f"c{i}" for i in range(7)]
EPS = 1e-12  # locate's guard against a zero span


def minmax_above(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Row-wise min-max of x (a constant row: 1 where positive), > threshold."""
    lo, hi = x.min(1, keepdim=True).values, x.max(1, keepdim=True).values
    span = hi - lo
    scaled = torch.where(span > 0, (x - lo) / (span + EPS), (x > 0).to(x.dtype))
    return scaled > threshold


def one_class_rule(r: torch.Tensor, out_mask: torch.Tensor, alpha, beta, groups):
    """MDA section 3 for one class and layer from its whole [Q, P / groups] sums."""
    q, pg = r.shape
    if not bool(out_mask.any()):
        return torch.zeros(groups * pg, dtype=torch.bool)
    r_hat = minmax_above(r, alpha) & out_mask[:, None]
    t = r_hat.view(groups, q // groups, pg).sum(1).flatten().to(torch.float64)
    return minmax_above(t[None], beta)[0]


def one_class_walk(graph, c: int, rule) -> dict[str, torch.Tensor]:
    """Relevance of class c from its one-hot output back to every located layer's
    input, one [channels] mask per value (docs/architecture.md)."""
    masks = {graph.output_name: torch.zeros(graph.num_outputs, dtype=torch.bool)}
    masks[graph.output_name][c] = True
    demands = {}

    def give(value, m):
        node = graph.node(value)
        if node.shape is None:
            return
        if m.numel() != node.channels:  # broadcast operand
            m = m.any().expand(node.channels)
        masks[value] = masks[value] | m if value in masks else m.clone()

    for node in reversed(graph.nodes):
        m = masks.get(node.name)
        if m is None or node.kind in ("input", "scalar"):
            continue
        refs = [r for r in node.refs() if graph.node(r).shape is not None]
        if node.kind in ("conv", "linear"):
            demands[node.layer] = m.clone() if is_depthwise(node, graph) else rule(node, m)
            give(node.args[0].name, demands[node.layer])
        elif node.kind in ("bn", "pass", "getitem", "permute"):
            give(refs[0], m)
        elif node.kind == "tie":
            give(refs[0], m)
            give(refs[1], m)
        elif node.kind == "cat":
            parts = [graph.node(p.name) for p in node.args[0]]
            for p, part in zip(parts, m.split([p.channels for p in parts]), strict=True):
                give(p.name, part)
        elif node.kind == "flatten":
            give(refs[0], m.view(graph.node(refs[0]).channels, -1).any(1))
        else:  # opaque
            for r in refs:
                give(r, torch.ones(graph.node(r).channels, dtype=torch.bool))
    return demands


def one_class_at_a_time(model, sums, classes):
    graph = model.graph
    out = {}
    for c in classes:

        def rule(node, m, c=c):
            kind = "conv" if is_conv_like(graph, node) else "linear"
            groups = node.conv_options()[3] if node.kind == "conv" else 1
            r = layer_sums(model, sums, c, node.layer)
            return one_class_rule(r, m, DEFAULT_ALPHA[kind], DEFAULT_BETA[kind], groups)

        out[c] = one_class_walk(graph, c, rule)
    return out


def small_densenet():
    return tvm.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=7)


GRAPHS = {
    "mixed": lambda: Mixed(len(CLASSES)),  # grouped, depthwise, residual, gate, flatten
    "densenet": small_densenet,  # concatenation
    "shufflenet": lambda: tvm.shufflenet_v2_x0_5(num_classes=7),  # split, shuffle
    "mobilenet_v3_small": lambda: tvm.mobilenet_v3_small(num_classes=7),  # squeeze-excite
}


@pytest.fixture(scope="module", params=sorted(GRAPHS))
def located(request):
    torch.manual_seed(0)
    module = GRAPHS[request.param]().eval()
    model = source_from_module(module, CIFAR10_SPEC, CLASSES, request.param)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (42, 3, 32, 32), dtype=torch.uint8, generator=g)
    data = ImageFolderData(images, torch.arange(42) % 7, list(CLASSES), "random")
    idx, lab = sample_order(select_samples(model, data, 6))
    sums = contribution_sums(model, data, idx, lab)
    classes = sums["#classes"].tolist()
    return model, sums, classes, one_class_at_a_time(model, sums, classes)


# The default blocks (every class of a small layer in one block), blocks that mix
# several classes' rows in some layers and one class's in others, and one
# (class, output) pair a block; each with a block's classes taken all at once
# (per-pair gathers) and one class at a time.
@pytest.mark.parametrize("block_bytes", [None, 8 << 10, 1])
@pytest.mark.parametrize("run_elements", [1 << 62, 1])
def test_one_walk_for_all_classes_gives_each_class_its_own_masks(
    located, block_bytes, run_elements, monkeypatch
):
    model, sums, classes, expected = located
    if block_bytes is not None:
        monkeypatch.setattr(locate_module, "_MASK_BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(locate_module, "_MIN_RUN_ELEMENTS", run_elements)
    masks = masks_from_sums(model, sums, classes, DEFAULT_ALPHA, DEFAULT_BETA)
    assert sorted(masks) == classes
    for c in classes:
        for layer, m in masks[c].items():
            want = expected[c].get(layer)
            if want is None:  # a layer no relevance reaches
                assert not bool(m.any()), (c, layer)
            else:
                assert torch.equal(m, want), (c, layer)
    # The classes differ, and a mask neither keeps nor drops everything.
    first, last = masks[classes[0]], masks[classes[-1]]
    assert any(not torch.equal(first[k], last[k]) for k in first)
    assert any(0 < float(m.float().mean()) < 1 for m in first.values())


def _near_threshold_block(alpha: float, rows: int = 64, width: int = 2048) -> torch.Tensor:
    """Rows whose values sit on and a few units in the last place around the point
    where the rule's arithmetic, fl(fl(x - lo) / (span + eps)), crosses alpha, at
    magnitudes from 1e-300 to 1e300, plus rows with lo 0, constant rows and rows of
    zeros: where a threshold compare could disagree with the division. Values are
    non-negative, as clamped-contribution sums are."""
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(rows, width, generator=gen, dtype=torch.float64)
    scales = torch.logspace(-300, 300, rows, dtype=torch.float64)
    for i in range(rows):
        row = x[i] * scales[i]
        if i % 3 == 0:
            row[0] = 0.0  # lo 0, as after a rectified input
        lo, hi = row.min(), row.max()
        t = lo + alpha * (hi - lo + EPS)
        near = t.expand(17).clone()
        for k in range(1, 9):  # t and 8 neighbours each side
            near[k] = torch.nextafter(near[k - 1], torch.tensor(math.inf, dtype=torch.float64))
            near[8 + k] = torch.nextafter(
                near[8 + k - 1] if k > 1 else t, torch.tensor(-math.inf, dtype=torch.float64)
            )
        row[1:18] = near.clamp(min=0)  # contribution sums are never negative
        x[i] = row
    x[5] = 3.25  # constant rows: positive, zero
    x[6] = 0.0
    return x


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.3, 1.0 / 3.0, 0.9])
def test_row_relevance_threshold_equals_the_division_at_the_boundary(alpha):
    """`_row_relevance` compares each value with a per-row threshold instead of
    dividing: it must decide every value as the division does, even a unit in the
    last place either side of the crossing."""
    x = _near_threshold_block(alpha)
    assert x.numel() >= locate_module._MIN_THRESHOLD_ELEMENTS  # the threshold path runs
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    if alpha > 0:  # (at alpha 0 the crossing lies below the normal range: it divides)
        assert locate_module._relevance_threshold(lo, hi - lo + EPS, alpha) is not None
    expected = minmax_above(x, alpha)
    got = locate_module._row_relevance(x.clone(), alpha)
    assert got.dtype == torch.float64
    assert torch.equal(got.bool(), expected)
    assert expected[:, 1:18].any() and not expected[:, 1:18].all()  # the crossing is there


def test_row_relevance_falls_back_to_the_division_on_non_finite_rows():
    x = _near_threshold_block(0.3)
    x[9, 100] = math.nan
    x[10, 200] = math.inf
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    assert locate_module._relevance_threshold(lo, hi - lo + EPS, 0.3) is None
    got = locate_module._row_relevance(x.clone(), 0.3)
    assert torch.equal(got.bool(), minmax_above(x, 0.3))
