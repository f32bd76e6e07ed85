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
non-negative (after a ReLU) the sum over samples is max(w, 0) * sum(a). A linear
layer over the last axis of a channels-last map is a 1x1 conv: a[p] is then the
sum of input channel p over all positions.

Signed inputs. MDA was defined on networks whose layers read rectified inputs
(after a ReLU), where the sum over positions only adds. A layer that reads a signed
input (a linear bottleneck's residual stream, a depthwise conv's batch-normed
output, a layer norm's output) could see a channel's positive and negative regions
cancel in that sum, and the channel counted as irrelevant however much it moves the
output. So a sample's input x is taken as its two parts, x+ = max(x, 0) and
x- = min(x, 0), each summed over positions and clamped on its own:

    s[q, p] = max(sum_k W[q, p, k] * S+[p, k], 0) + max(sum_k W[q, p, k] * S-[p, k], 0)

On a non-negative input S- = 0 and this is exactly MDA's s; a linear layer (no sum
over positions) is unchanged too, since max(w x, 0) = max(w x+, 0) + max(w x-, 0).
In the conv sums below a sample with negative inputs enters as two samples of its
class; layers read through one tap keep the sums of x+ and x- anyway (`part_sums`).

Per-class sums of one batch are formed in float32 and accumulated across
batches in float64, so that adding shards (whole batches) in any order gives
the same masks as one pass. The tap sums S cost about one pass over the input
(stride 1: a tap's window is the total minus the few rows or columns it misses),
and the per-sample values are produced, clamped and summed per class in blocks
that stay in the CPU cache.
"""

from __future__ import annotations

import functools
import itertools

import torch

from lego_core.graph import Node

# Largest block of per-sample values (elements) materialised at once: 2^20 float32
# = 4 MiB, so that the product, the clamp and the class sums run in the CPU cache.
_BLOCK_ELEMENTS = 1 << 20
# Feature maps of at most this many positions get their tap sums from one product.
_SMALL_MAP = 64


def _window_sums(x: torch.Tensor, dim: int, taps: int, stride, pad, dilation, out) -> torch.Tensor:
    """Sums of `x` along `dim` over the positions each kernel tap visits, for every
    tap (stacked at `dim`). Padding is zeros, so only in-range positions are added,
    and no padded copy is made. With stride 1 a tap that visits most positions is
    the total minus the few it misses: one pass over `x` instead of one per tap."""
    n = x.shape[dim]
    total = None
    per_tap = []
    for i in range(taps):
        start = i * dilation - pad
        stop = start + (out - 1) * stride + 1  # exclusive
        if stride == 1:
            lo, hi = max(start, 0), min(stop, n)
            if hi - lo > n // 2:
                if total is None:
                    total = x.sum(dim)
                part = total
                if lo > 0:
                    part = part - x.narrow(dim, 0, lo).sum(dim)
                if hi < n:
                    part = part - x.narrow(dim, hi, n - hi).sum(dim)
            else:
                part = x.narrow(dim, lo, max(hi - lo, 0)).sum(dim)
        else:
            if start < 0:  # first position inside x
                start += -(start // stride) * stride
            index = [slice(None)] * x.dim()
            index[dim] = slice(start, min(stop, n), stride)
            part = x[tuple(index)].sum(dim)
        per_tap.append(part)
    return torch.stack(per_tap, dim)


def _visits(n: int, taps: int, stride: int, pad: int, dilation: int, out: int) -> torch.Tensor:
    """[n, taps]: how many output positions read input position r through tap i."""
    counts = torch.zeros(n, taps)
    for i in range(taps):
        for o in range(out):
            r = i * dilation - pad + o * stride
            if 0 <= r < n:
                counts[r, i] += 1
    return counts


@functools.lru_cache(maxsize=256)
def _tap_matrix(h, w, kernel, stride, padding, dilation, dtype, device) -> torch.Tensor:
    """[H*W, kh*kw] with S = x.view(B*P, H*W) @ this (tap (i, j) of pixel (r, c))."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    rows, cols = _visits(h, kh, sh, ph, dh, out_h), _visits(w, kw, sw, pw, dw, out_w)
    matrix = torch.einsum("ri,cj->rcij", rows, cols).reshape(h * w, kh * kw)
    return matrix.to(dtype=dtype, device=device)


def tap_sums(x: torch.Tensor, kernel: tuple[int, int], stride, padding, dilation) -> torch.Tensor:
    """S[b, p, i*kw + j] = sum over output positions of the padded input at
    the position that tap (i, j) reads. x: [B, P, H, W] -> [B, P, kh*kw]."""
    kh, kw = kernel
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    b, p, h, w = x.shape
    if h * w <= _SMALL_MAP:  # one matrix product beats many tiny window sums
        key = (tuple(kernel), tuple(stride), tuple(padding), tuple(dilation))
        matrix = _tap_matrix(h, w, *key, x.dtype, x.device)
        return (x.reshape(b * p, h * w) @ matrix).view(b, p, kh * kw)
    out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    # Separable: first the rows each tap row visits, then the columns.
    rows = _window_sums(x, 2, kh, sh, ph, dh, out_h)  # [B, P, kh, W]
    taps = _window_sums(rows, 3, kw, sw, pw, dw, out_w)  # [B, P, kh, kw]
    return taps.reshape(b, p, kh * kw)


def part_sums(x: torch.Tensor, sums):
    """(sums of `x`'s positive part, sums of its negative part) (module docstring,
    "Signed inputs"), or (`sums(x)`, None) when `x` has no negative value. `sums`
    maps [B, ...] inputs to their [B, ...] sums over positions."""
    # (amin is several times faster than (x < 0).any(), which builds a bool tensor)
    if x.numel() == 0 or not bool(x.amin() < 0):
        return sums(x), None
    return sums(x.clamp(min=0)), sums(x.clamp(max=0))


def signed_sums(x: torch.Tensor, sums, labels: torch.Tensor | None = None):
    """`part_sums` as samples: (`sums(x)`, `labels`), or each sample's two parts as
    two samples of its class, with `labels` repeated to match (for layers whose
    contributions are clamped after the weight product)."""
    pos, neg = part_sums(x, sums)
    if neg is None:
        return pos, labels
    both = torch.stack((pos, neg), 1).flatten(0, 1)
    return both, None if labels is None else labels.repeat_interleave(2)


def conv_contributions(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups):
    """Per-sample clamped contributions of a conv layer (a signed input's two parts
    clamped apart and added, module docstring).

    Returns [B, Q, P // groups]: for output q, its own group's inputs."""
    q, pg, kh, kw = weight.shape
    b = x.shape[0]
    s, _ = signed_sums(x, lambda v: tap_sums(v, (kh, kw), stride, padding, dilation))
    if groups == 1:
        out = torch.einsum("bpk,qpk->bqp", s, weight.reshape(q, pg, kh * kw))
    else:
        qg = q // groups
        s = s.view(s.shape[0], groups, pg, kh * kw)
        w = weight.reshape(groups, qg, pg, kh * kw)
        out = torch.einsum("bgpk,gqpk->bgqp", s, w).reshape(s.shape[0], q, pg)
    out = out.clamp_(min=0)
    return out.view(b, 2, q, pg).sum(1) if out.shape[0] != b else out


def conv_class_sums(
    x: torch.Tensor, weight, stride, padding, dilation, groups, labels, num_classes: int
) -> torch.Tensor:
    """Clamped contributions summed per class: [num_classes, Q, P / groups].

    Same numbers as summing `conv_contributions` per class. Samples are ordered by
    class, so each class is a contiguous run of rows; the input channels are taken
    in chunks whose [chunk, B, Q/groups] block of per-sample values fits the cache:
    one batched matmul ([chunk, B, K] x [chunk, K, Q/groups]) into a reused buffer,
    an in-place clamp, and one sum per class run, all in float32 (the caller widens
    the small result)."""
    q, pg, kh, kw = weight.shape
    k = kh * kw
    qg = q // groups
    s, labels = signed_sums(  # [B, P, K]
        x, lambda v: tap_sums(v, (kh, kw), stride, padding, dilation), labels
    )
    b = s.shape[0]
    if b > 1 and not bool((labels[1:] >= labels[:-1]).all()):
        labels, order = torch.sort(labels, stable=True)
        s = s[order]
    per_input = s.permute(1, 0, 2).contiguous()  # [P, B, K], classes in runs
    runs = torch.bincount(labels, minlength=num_classes).tolist()
    starts = [0, *itertools.accumulate(runs)]
    bounds = [(c, starts[c], n) for c, n in enumerate(runs) if n]
    w = weight.reshape(groups, qg, pg, k).permute(0, 2, 3, 1).reshape(groups * pg, k, qg)
    sums = torch.empty(num_classes, groups * pg, qg, dtype=s.dtype, device=s.device)
    for c, n in enumerate(runs):
        if not n:
            sums[c].zero_()  # the other classes are written whole below
    step = max(1, _BLOCK_ELEMENTS // max(1, b * qg))
    buffer = torch.empty(min(step, groups * pg), b, qg, dtype=s.dtype, device=s.device)
    for p0 in range(0, groups * pg, step):
        p1 = min(p0 + step, groups * pg)
        block = torch.bmm(per_input[p0:p1], w[p0:p1], out=buffer[: p1 - p0]).clamp_(min=0)
        for c, start, n in bounds:
            torch.sum(block[:, start : start + n], 1, out=sums[c, p0:p1])
    # [C, P, Q/groups] -> [C, groups, Q/groups, P/groups] -> [C, Q, P/groups]
    sums = sums.view(num_classes, groups, pg, qg).transpose(2, 3)
    return sums.reshape(num_classes, q, pg)


def single_tap(node: Node, weight: torch.Tensor, in_hw) -> int | None:
    """The kernel tap through which a layer reads its input, when it reads it through
    one tap only, so that the contribution of input p to output q is the single
    product w[q, p, tap] * S[p, tap] and relu of it splits into signed parts:
    relu(w S) = w+ S+ + w- S-. Linear layers (0), 1x1 convs (0), and convs whose
    other taps read only padding (a 3x3 conv on a 1x1 map: its centre). None for
    every other layer, whose K products are summed before the clamp.
    `in_hw`: the input's height and width (convs only)."""
    if node.kind == "linear":
        return 0
    kh, kw = weight.shape[2:]
    stride, padding, dilation, _ = node.conv_options()
    dims = zip(in_hw, (kh, kw), stride, padding, dilation, strict=True)
    live = [_live_taps(*(int(v) for v in dim)) for dim in dims]
    if len(live[0]) == 1 and len(live[1]) == 1:
        return live[0][0] * kw + live[1][0]
    return None


@functools.lru_cache(maxsize=1024)
def _live_taps(n: int, taps: int, stride: int, pad: int, dilation: int) -> tuple[int, ...]:
    """The taps (along one dimension of size n) that read at least one input position."""
    out = (n + 2 * pad - dilation * (taps - 1) - 1) // stride + 1
    visits = _visits(n, taps, stride, pad, dilation, out).sum(0)
    return tuple(torch.nonzero(visits).flatten().tolist())


def tap_weight(weight: torch.Tensor, tap: int) -> torch.Tensor:
    """[Q, P / groups]: a conv's weights of kernel tap `tap` (a linear weight as it is)."""
    return weight if weight.dim() == 2 else weight.flatten(2)[:, :, tap]


def linear_contributions(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-sample clamped contributions of a linear layer: [B, Q, P]."""
    return (weight[None, :, :] * x[:, None, :]).clamp_(min=0)


CLASSES_KEY = "#classes"  # the model classes the rows of every sum stand for
POS, NEG = "#pos", "#neg"  # linear layers: per-class sums of x+ and x- per input


class ContributionAccumulator:
    """Sums per-class contributions R_c[l] over the samples it is shown, for the
    model classes `classes` (sorted) only: row i of every sum is class classes[i].

    Conv layers: [k, Q, P / groups] float64. The per-sample clamp comes after the
    sum over kernel taps and positions, so nothing smaller suffices.
    Linear layers and convs read through one tap (1x1 convs; see `single_tap`):
    relu(w * x) = w+ x+ + w- x- elementwise (w+ = max(w, 0), w- = min(w, 0), same
    for x), so the class sum of clamped contributions is w+ * sum(x+) + w- *
    sum(x-): the accumulator keeps only the per-class sums of x+ and x- per input
    ([k, P] each, keys LAYER#pos and LAYER#neg; for a conv, x+ and x- each summed
    over the positions its tap reads),
    and `linear_class_sums` forms a class's [Q, P / groups] when its mask is
    computed. This costs B x P per batch instead of B x Q x P.

    `set_batch(labels)` before each forward pass: the model class of each sample
    (all of them in `classes`). `add(node, x, weight)` is the GraphNet hook body."""

    def __init__(self, classes):
        self.classes = torch.as_tensor(classes, dtype=torch.long).sort().values
        self.sums: dict[str, torch.Tensor] = {}
        self.labels: torch.Tensor | None = None  # rows into `classes`, per sample

    def set_batch(self, labels: torch.Tensor) -> None:
        rows = torch.searchsorted(self.classes.to(labels.device), labels)
        self.labels = rows

    def _accumulate(self, key: str, lo: int, part: torch.Tensor) -> None:
        # float32 per batch, float64 across batches.
        acc = self.sums.get(key)
        if acc is None:
            shape = (self.classes.numel(), *part.shape[1:])
            acc = self.sums[key] = torch.zeros(shape, dtype=torch.float64, device=part.device)
        acc[lo : lo + part.shape[0]] += part.double()  # (a mixed-dtype add_ is slower)

    def add(self, node: Node, x: torch.Tensor, weight: torch.Tensor) -> None:
        labels = self.labels
        tap = single_tap(node, weight, x.shape[2:])
        if tap is not None:
            # The class sums of x+ and x- per input: for a conv read through one tap
            # and a channels-last linear layer, each part summed over the positions
            # apart (module docstring); for a linear layer, per element.
            if node.kind == "conv":  # [B, P]: each input summed over what its one tap reads
                stride, padding, dilation, _ = node.conv_options()
                kernel = tuple(weight.shape[2:])
                pos, neg = part_sums(
                    x, lambda v: tap_sums(v, kernel, stride, padding, dilation)[:, :, tap]
                )
            elif x.dim() > 2:  # channels-last map: a 1x1 conv, summed over positions
                pos, neg = part_sums(x, lambda v: v.flatten(1, -2).sum(1))
            else:
                pos, neg = part_sums(x, lambda v: v)
            k = self.classes.numel()
            for key, part in ((POS, pos), (NEG, neg)):  # neg None: no negative input
                acc = self.sums.get(node.layer + key)
                if acc is None:
                    acc = torch.zeros(k, pos.shape[1], dtype=torch.float64, device=x.device)
                    self.sums[node.layer + key] = acc
                if part is not None:
                    acc.index_add_(0, labels, part.double())
            return
        # The batch's classes are a contiguous range of rows (samples come in
        # class order); the per-batch sums cover that range only.
        lo = int(labels.min())
        local = labels - lo
        n_local = int(local.max()) + 1
        stride, padding, dilation, groups = node.conv_options()
        # conv_class_sums chunks the input channels; samples are split only when
        # one input channel's [B, Q/groups] values alone exceed the block.
        step = max(1, _BLOCK_ELEMENTS // max(1, weight.shape[0] // groups))
        for i in range(0, x.shape[0], step):
            part = conv_class_sums(
                x[i : i + step],
                weight,
                stride,
                padding,
                dilation,
                groups,
                local[i : i + step],
                n_local,
            )
            self._accumulate(node.layer, lo, part)

    def result(self) -> dict[str, torch.Tensor]:
        return {CLASSES_KEY: self.classes.clone(), **{k: v.cpu() for k, v in self.sums.items()}}


def linear_class_sums(
    sums: dict[str, torch.Tensor], layer: str, row, weight, rows=None, groups: int = 1
):
    """The [Q, P / groups] (or [len(rows), P / groups]) clamped-contribution sums of a
    layer read through a single tap (`single_tap`; `weight`: that tap's
    [Q, P / groups], `tap_weight`) for one row of `sums`, from its sums of x+ and
    x-: w+ * sum(x+) + w- * sum(x-). `row` may also be a tensor of one row of `sums`
    per output row in `rows` (pairs: several classes' rows at once). A new tensor."""
    w = weight
    q = w.shape[0]
    if rows is not None:
        w = w.index_select(0, rows)
    w = w.to(torch.float64, copy=w is weight)  # a new tensor: it is clamped in place
    pos, neg = sums[layer + POS][row], sums[layer + NEG][row]  # [P], or [len(rows), P]
    if groups == 1:
        if pos.dim() == 1:
            pos, neg = pos[None, :], neg[None, :]
    else:  # output q reads its own group's inputs
        group = torch.arange(q) if rows is None else rows
        group = torch.div(group, q // groups, rounding_mode="floor")
        if pos.dim() == 1:
            pos, neg = pos.view(groups, -1)[group], neg.view(groups, -1)[group]
        else:
            pair = torch.arange(group.numel())
            pos = pos.view(pos.shape[0], groups, -1)[pair, group]
            neg = neg.view(neg.shape[0], groups, -1)[pair, group]
    if not bool(neg.any()):  # a rectified input: w- * sum(x-) adds only zeros
        return w.clamp_(min=0).mul_(pos)
    # In place, block by block (torch.where over broadcast rows is several times slower).
    out = w.clamp(min=0).mul_(pos)
    return out.add_(w.clamp_(max=0).mul_(neg))


def add_sums(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contribution sums are additive over samples: shard results add up. Rows
    of the same class are added, the other classes' rows are kept (sorted)."""
    if not a:
        return {k: v.clone() for k, v in b.items()}
    if not b:
        return {k: v.clone() for k, v in a.items()}
    if CLASSES_KEY not in a or CLASSES_KEY not in b:  # dense [num_classes, ...] sums
        out = {k: v.clone() for k, v in a.items()}
        for k, v in b.items():
            out[k] = out[k] + v if k in out else v.clone()
        return out
    ca, cb = a[CLASSES_KEY], b[CLASSES_KEY]
    classes = torch.unique(torch.cat([ca, cb]))  # sorted
    ra, rb = torch.searchsorted(classes, ca), torch.searchsorted(classes, cb)
    out = {CLASSES_KEY: classes}
    for k in sorted((set(a) | set(b)) - {CLASSES_KEY}):
        ref = a.get(k, b.get(k))
        acc = torch.zeros((classes.numel(), *ref.shape[1:]), dtype=ref.dtype)
        if k in a:
            acc[ra] += a[k]
        if k in b:
            acc[rb] += b[k]
        out[k] = acc
    return out
