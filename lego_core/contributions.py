"""Relative contributions (MDA section 2), computed in the exact fast form.

For a conv layer, the part of output map q due to input channel p, summed over
all output positions, is by linearity

    s[q, p] = sum_k W[q, p, k] * S[p, k]

where S[p, k] is the sum of the (padded) input channel p over every position
that kernel tap k visits. S costs one strided window sum per tap; the product
is a batched matrix multiply of size B x Q x P x K, instead of the reference
formulation's B x Q x P x H x W partial convolutions. Each sample's s is
clamped at zero (s <- max(s, 0)) before samples are summed per class.

For a linear layer s[q, p] = max(w[q, p] * a[p], 0); when the input is
non-negative (after a ReLU) the sum over samples is max(w, 0) * sum(a).

Per-class sums of one batch are formed in float32 and accumulated across
batches in float64, so that adding shards (whole batches) in any order gives
the same masks as one pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lego_core.graph import Node

# Largest B x Q x P block (elements) materialised at once.
_BLOCK_ELEMENTS = 1 << 24


def tap_sums(x: torch.Tensor, kernel: tuple[int, int], stride, padding, dilation) -> torch.Tensor:
    """S[b, p, i*kw + j] = sum over output positions of the padded input at
    the position that tap (i, j) reads. x: [B, P, H, W] -> [B, P, kh*kw]."""
    kh, kw = kernel
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    b, p, h, w = x.shape
    out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    xp = F.pad(x, (pw, pw, ph, ph)) if (ph or pw) else x
    # Separable: first sum the rows each tap row i visits, then the columns.
    rows = torch.stack(
        [xp[:, :, i * dh : i * dh + (out_h - 1) * sh + 1 : sh, :].sum(2) for i in range(kh)], 2
    )  # [B, P, kh, Wp]
    taps = torch.stack(
        [rows[..., j * dw : j * dw + (out_w - 1) * sw + 1 : sw].sum(-1) for j in range(kw)], 3
    )  # [B, P, kh, kw]
    return taps.reshape(b, p, kh * kw)


def conv_contributions(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups):
    """Per-sample clamped contributions of a conv layer.

    Returns [B, Q, P // groups]: for output q, its own group's inputs."""
    q, pg, kh, kw = weight.shape
    s = tap_sums(x, (kh, kw), stride, padding, dilation)  # [B, P, K]
    b = s.shape[0]
    if groups == 1:
        out = torch.einsum("bpk,qpk->bqp", s, weight.reshape(q, pg, kh * kw))
    else:
        qg = q // groups
        s = s.view(b, groups, pg, kh * kw)
        w = weight.reshape(groups, qg, pg, kh * kw)
        out = torch.einsum("bgpk,gqpk->bgqp", s, w).reshape(b, q, pg)
    return out.clamp_(min=0)


def conv_class_sums(
    x: torch.Tensor, weight, stride, padding, dilation, groups, labels, num_classes: int
) -> torch.Tensor:
    """Clamped contributions summed per class: [num_classes, Q, P / groups].

    Same numbers as summing `conv_contributions` per class, laid out so that
    every large intermediate is contiguous: one batched matmul over the input
    channels ([P, B, K] x [P, K, Q/groups]), an in-place clamp, and a class
    sum of the [P, B, Q/groups] block in float32 (only the small per-class
    result is widened to float64 by the caller)."""
    q, pg, kh, kw = weight.shape
    k = kh * kw
    qg = q // groups
    s = tap_sums(x, (kh, kw), stride, padding, dilation)  # [B, P, K]
    per_input = s.permute(1, 0, 2).contiguous()  # [P, B, K]
    w = weight.reshape(groups, qg, pg, k).permute(0, 2, 3, 1).reshape(groups * pg, k, qg)
    out = torch.bmm(per_input, w).clamp_(min=0)  # [P, B, Q/groups]
    sums = torch.zeros(groups * pg, num_classes, qg, dtype=out.dtype, device=out.device)
    sums.index_add_(1, labels, out)  # [P, C, Q/groups]
    # -> [C, groups, Q/groups, P/groups] -> [C, Q, P/groups]
    sums = sums.view(groups, pg, num_classes, qg).permute(2, 0, 3, 1)
    return sums.reshape(num_classes, q, pg)


def linear_contributions(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-sample clamped contributions of a linear layer: [B, Q, P]."""
    return (weight[None, :, :] * x[:, None, :]).clamp_(min=0)


class ContributionAccumulator:
    """Sums per-class contributions R_c[l] over the samples it is shown.

    `add(node, x, labels)` is the GraphNet hook body; `labels` are the class
    indices of the batch's samples (into `num_classes`)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.sums: dict[str, torch.Tensor] = {}
        self.labels: torch.Tensor | None = None
        self.weights: dict[str, torch.Tensor] = {}

    def add(self, node: Node, x: torch.Tensor, weight: torch.Tensor) -> None:
        labels = self.labels
        acc = self.sums.get(node.layer)
        if node.kind == "linear":
            q, p = weight.shape
            if acc is None:
                acc = self.sums[node.layer] = torch.zeros(
                    self.num_classes, q, p, dtype=torch.float64, device=x.device
                )
            if bool((x >= 0).all()):
                per_class = torch.zeros(self.num_classes, p, dtype=x.dtype, device=x.device)
                per_class.index_add_(0, labels, x)
                acc += (weight.clamp(min=0)[None] * per_class[:, None, :]).double()
                return
            step = max(1, _BLOCK_ELEMENTS // max(1, q * p))
            for i in range(0, x.shape[0], step):
                part = linear_contributions(x[i : i + step], weight)
                per_class = torch.zeros(self.num_classes, q, p, dtype=x.dtype, device=x.device)
                acc += per_class.index_add_(0, labels[i : i + step], part).double()
            return
        stride, padding, dilation, groups = node.conv_options()
        q, pg = weight.shape[:2]
        if acc is None:
            acc = self.sums[node.layer] = torch.zeros(
                self.num_classes, q, pg, dtype=torch.float64, device=x.device
            )
        step = max(1, _BLOCK_ELEMENTS // max(1, q * pg))
        for i in range(0, x.shape[0], step):
            part = conv_class_sums(
                x[i : i + step],
                weight,
                stride,
                padding,
                dilation,
                groups,
                labels[i : i + step],
                self.num_classes,
            )
            acc += part.double()


def add_sums(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contribution sums are additive over samples: shard results add up."""
    out = {k: v.clone() for k, v in a.items()}
    for k, v in b.items():
        out[k] = out[k] + v if k in out else v.clone()
    return out
