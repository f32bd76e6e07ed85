"""The fast contribution form against the slow per-position oracle (MDA section 2)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lego_core.contributions import conv_contributions, linear_contributions, tap_sums


def slow_conv_contributions(x, weight, stride, padding, dilation, groups):
    """Oracle: for every (q, p), convolve input channel p with kernel c_{q,p}
    alone, sum over all output positions, clamp at zero; the positive and the
    negative part of a signed input apart, added. [B, Q, P / groups]."""
    q_total, pg = weight.shape[:2]
    qg = q_total // groups
    out = torch.zeros(x.shape[0], q_total, pg, dtype=torch.float64)
    for q in range(q_total):
        g = q // qg
        for j in range(pg):
            p = g * pg + j
            for part_of_x in (x.clamp(min=0), x.clamp(max=0)):
                part = F.conv2d(
                    part_of_x[:, p : p + 1].double(),
                    weight[q : q + 1, j : j + 1].double(),
                    stride=stride,
                    padding=padding,
                    dilation=dilation,
                )
                out[:, q, j] += part.sum((1, 2, 3)).clamp(min=0)
    return out


def mda_conv_contributions(x, weight, stride, padding, dilation):
    """MDA's own formula, one sum over positions of the whole (signed) input."""
    q_total, p_total = weight.shape[:2]
    out = torch.zeros(x.shape[0], q_total, p_total, dtype=torch.float64)
    for q in range(q_total):
        for p in range(p_total):
            part = F.conv2d(
                x[:, p : p + 1].double(),
                weight[q : q + 1, p : p + 1].double(),
                None,
                stride,
                padding,
                dilation,
            )
            out[:, q, p] = part.sum((1, 2, 3)).clamp(min=0)
    return out


@pytest.mark.parametrize(
    "channels,out_channels,kernel,stride,padding,dilation,groups,size",
    [
        (3, 5, 3, 1, 1, 1, 1, 9),
        (4, 6, 3, 2, 1, 1, 1, 11),
        (4, 4, 3, 1, 2, 2, 1, 10),
        (6, 6, 3, 2, 1, 1, 3, 12),  # grouped
        (5, 5, 3, 1, 1, 1, 5, 8),  # depthwise
        (3, 4, (5, 3), (2, 1), (2, 0), (1, 2), 1, 13),  # non-square everything
        (2, 3, 1, 1, 0, 1, 1, 7),  # 1x1
        (3, 2, 4, 3, 0, 1, 1, 14),  # stride larger than the padding, uneven coverage
    ],
)
@pytest.mark.parametrize("rectified", [False, True])
def test_fast_conv_contributions_equal_the_oracle(
    channels, out_channels, kernel, stride, padding, dilation, groups, size, rectified
):
    g = torch.Generator().manual_seed(0)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    pair = lambda v: (v, v) if isinstance(v, int) else v  # noqa: E731
    x = torch.randn(4, channels, size, size + 1, generator=g)
    x = x.relu() if rectified else x
    w = torch.randn(out_channels, channels // groups, kh, kw, generator=g)
    fast = conv_contributions(x, w, pair(stride), pair(padding), pair(dilation), groups).double()
    slow = slow_conv_contributions(x, w, pair(stride), pair(padding), pair(dilation), groups)
    assert fast.shape == slow.shape
    rel = (fast - slow).abs().max() / slow.abs().max()
    assert rel < 1e-4
    assert (slow > 0).any()
    if rectified:  # the clamp is exercised (a signed input's two parts rarely both clamp)
        assert (slow == 0).any()


@pytest.mark.parametrize(
    "kernel, stride, padding, dilation",
    [
        ((3, 3), (2, 2), (1, 1), (1, 1)),
        ((3, 3), (1, 1), (1, 1), (1, 1)),  # windows as the total minus an edge
        ((3, 3), (1, 1), (0, 0), (1, 1)),
        ((5, 3), (1, 1), (4, 0), (2, 1)),  # padding wider than a tap's reach
        ((3, 3), (1, 1), (2, 2), (2, 2)),
        ((7, 7), (2, 2), (3, 3), (1, 1)),
        ((3, 3), (3, 2), (4, 1), (1, 1)),  # strided taps that start in the padding
        ((1, 1), (2, 2), (0, 0), (1, 1)),
        ((2, 4), (1, 3), (1, 2), (3, 1)),
    ],
)
@pytest.mark.parametrize("small_map", [0, 1000])  # window sums; one matrix product
def test_tap_sums_match_unfold(kernel, stride, padding, dilation, small_map, monkeypatch):
    from lego_core import contributions

    monkeypatch.setattr(contributions, "_SMALL_MAP", small_map)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 10, 9, generator=g)
    s = tap_sums(x, kernel, stride, padding, dilation)
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # [B, P*K, L]
    k = kernel[0] * kernel[1]
    assert torch.allclose(s, cols.view(2, 3, k, -1).sum(-1), atol=1e-5)


def test_signed_inputs_are_summed_by_part_and_rectified_ones_as_mda_does():
    """A channel whose positive and negative halves cancel over positions moves every
    output position, and counts; on a rectified input the rule is MDA's own."""
    x = torch.ones(1, 1, 4, 4)
    x[..., 2:] = -1  # sums to zero over positions
    w = torch.tensor([[[[1.0]]], [[[-2.0]]]])  # two outputs, 1x1
    assert mda_conv_contributions(x, w, (1, 1), (0, 0), (1, 1)).abs().sum() == 0
    got = conv_contributions(x, w, (1, 1), (0, 0), (1, 1), 1)
    assert got.flatten().tolist() == [8.0, 16.0]  # 8 positions at +1; 8 at -1 through -2
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 7, 7, generator=g).relu()
    w = torch.randn(5, 4, 3, 3, generator=g)
    mda = mda_conv_contributions(x, w, (1, 1), (1, 1), (1, 1))
    assert torch.allclose(conv_contributions(x, w, (1, 1), (1, 1), (1, 1), 1).double(), mda)


def test_fast_linear_contributions_equal_the_oracle():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(5, 7, generator=g), torch.randn(4, 7, generator=g)
    slow = torch.stack(
        [torch.stack([(w[q] * x[b]).clamp(min=0) for q in range(4)]) for b in range(5)]
    )
    assert torch.allclose(linear_contributions(x, w), slow, atol=1e-6)


@pytest.mark.parametrize("relu", [True, False])
def test_linear_sums_of_signed_parts_equal_per_sample_sums(relu):
    """sum_b max(w a_b, 0) = w+ * sum_b a_b+ + w- * sum_b a_b-, with or without a ReLU."""
    from lego_core.contributions import ContributionAccumulator, linear_class_sums
    from lego_core.graph import Node, Param, Ref

    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(6, 5, generator=g), torch.randn(3, 5, generator=g)
    x = x.relu() if relu else x
    labels = torch.tensor([4, 7, 4, 7, 7, 4])
    node = Node("fc", "linear", None, (Ref("x"), Param("fc.weight")), layer="fc")
    acc = ContributionAccumulator([7, 4])
    acc.set_batch(labels)
    acc.add(node, x, w)
    sums = acc.result()
    assert sums["#classes"].tolist() == [4, 7]
    assert sums["fc#pos"].shape == (2, 5)  # [classes, inputs], never [classes, Q, P]
    per_sample = linear_contributions(x, w).double()
    for row, c in enumerate([4, 7]):
        expected = per_sample[labels == c].sum(0)
        assert torch.allclose(linear_class_sums(sums, "fc", row, w), expected, atol=1e-6)


def test_channels_last_linear_sums_take_a_signed_inputs_parts_apart():
    """A linear layer over the last axis of a [B, H, W, C] map is a 1x1 conv: per
    sample, max(w * sum over positions of x+, 0) + max(w * sum of x-, 0)."""
    from lego_core.contributions import ContributionAccumulator, linear_class_sums
    from lego_core.graph import Node, Param, Ref

    g = torch.Generator().manual_seed(6)
    x, w = torch.randn(5, 3, 3, 4, generator=g), torch.randn(2, 4, generator=g)
    labels = torch.tensor([1, 1, 6, 6, 6])
    node = Node("mlp", "linear", None, (Ref("x"), Param("mlp.weight")), layer="mlp")
    acc = ContributionAccumulator([1, 6])
    acc.set_batch(labels)
    acc.add(node, x, w)
    sums = acc.result()
    parts = [x.clamp(min=0).sum((1, 2)), x.clamp(max=0).sum((1, 2))]  # [B, C] each
    per_sample = sum((w[None] * part[:, None, :]).clamp(min=0) for part in parts).double()
    for row, c in enumerate([1, 6]):
        expected = per_sample[labels == c].sum(0)
        assert torch.allclose(linear_class_sums(sums, "mlp", row, w), expected, atol=1e-5)
    # MDA's single sum over positions would differ here: the parts do cancel
    whole = (w[None] * x.sum((1, 2))[:, None, :]).clamp(min=0).double()
    assert not torch.allclose(whole[labels == 1].sum(0), per_sample[labels == 1].sum(0))


def test_add_sums_merges_classes_and_adds_shared_ones():
    from lego_core.contributions import add_sums

    a = {"#classes": torch.tensor([1, 3]), "l": torch.tensor([[1.0], [3.0]])}
    b = {"#classes": torch.tensor([0, 3]), "l": torch.tensor([[5.0], [7.0]])}
    both = add_sums(a, b)
    assert both["#classes"].tolist() == [0, 1, 3]
    assert both["l"].flatten().tolist() == [5.0, 1.0, 10.0]


@pytest.mark.parametrize("groups", [1, 2, 6])
@pytest.mark.parametrize("block", [1 << 18, 8])  # one block; one input channel per block
def test_class_sums_equal_per_sample_contributions_summed_by_class(groups, block, monkeypatch):
    from lego_core import contributions
    from lego_core.contributions import conv_class_sums

    monkeypatch.setattr(contributions, "_BLOCK_ELEMENTS", block)

    g = torch.Generator().manual_seed(4)
    x = torch.randn(7, 6, 9, 9, generator=g)
    w = torch.randn(6, 6 // groups, 3, 3, generator=g)
    labels = torch.tensor([0, 0, 2, 1, 2, 2, 0])  # not in class order
    per_sample = conv_contributions(x, w, (2, 2), (1, 1), (1, 1), groups)
    expected = torch.stack([per_sample[labels == c].sum(0) for c in range(3)])
    got = conv_class_sums(x, w, (2, 2), (1, 1), (1, 1), groups, labels, 3)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kernel, stride, padding, size, tap",
    [
        (1, 1, 0, 5, 0),  # 1x1: its one tap
        (3, 1, 1, 1, 4),  # 3x3 on a 1x1 map: the centre; the others read padding
        (3, 1, 1, 2, None),  # on 2x2 every tap reads something
        (3, 2, 1, 2, None),  # stride 2 on 2x2: four taps read the input
        (3, 1, 0, 3, None),  # no padding: all nine
    ],
)
def test_single_tap_only_where_one_tap_reads_the_input(kernel, stride, padding, size, tap):
    from torch import nn

    from lego_core.contributions import single_tap
    from lego_core.graph import capture

    conv = nn.Conv2d(3, 4, kernel, stride=stride, padding=padding)
    graph = capture(nn.Sequential(conv, nn.Flatten()).eval(), torch.zeros(2, 3, size, size))
    node = next(iter(graph.layers()))
    assert single_tap(node, graph.tensors[node.weight_key()], (size, size)) == tap
