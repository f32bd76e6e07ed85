"""The decision stage of an assembled model: which part does an image belong to?

Each component was disassembled from a model that never saw the other parts'
classes, so its logits alone cannot tell "a dog" from "a cat this 0-4 model is
sure about". Following Kim et al. (NeurIPS 2022), the assembled prediction
factors into task-id prediction times within-task prediction:

    P(class k | x) = P(part of k | x) * P(k | x, part of k)

- Within a part, the component's own softmax decides (so within-part accuracy
  is exactly the component's accuracy on its task).
- Between parts, a Gaussian discriminant (class-conditional Gaussians with one
  shared covariance, as in Lee et al., NeurIPS 2018, and MaD) on what the
  components compute anyway: the inputs of their linear layers (pooled and
  hidden features) and their logits, concatenated across all components.

The discriminant is fitted in closed form on samples of every part's own
locating dataset, each image run through *every* component (a component's
features of another part's images are the evidence that tells the parts
apart). No weight is trained by gradient; the fit is class means, a pooled
covariance shrunk towards its mean variance (Oracle Approximating Shrinkage,
Chen et al. 2010), and one linear solve.

Where the calibration pool is large enough, the discriminant also reads
second-order features: the products of the top principal components
(whitened) of the standardised features. A shared-covariance Gaussian on
[z, q q^T] has quadratic decision boundaries in z, which a linear rule on
small networks' features lacks (CIFAR-10 halves, all + all: 70.3 -> 73.6 at
5,000 samples a class, measured by `make reproduce`'s ablation); with few
samples the extra features only add estimation noise, so their number follows
the pool size (`quadratic_rank`). At run time the stage is a few small matrix
products on features that already exist.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lego_core.graph import LegoGraph

# A linear layer's input wider than this is not read (e.g. the flattened conv
# maps in front of a large classifier), and one component contributes at most
# MAX_COMPONENT_FEATURES features: the fit's covariance grows with their square.
MAX_TAP_FEATURES = 4096
MAX_COMPONENT_FEATURES = 1536
# Second-order features: products of the top principal components, their count
# (k (k + 1) / 2 for rank k) kept below samples / SAMPLES_PER_QUADRATIC_FEATURE.
MAX_QUADRATIC_RANK = 64
QUADRATIC_RANK_STEP = 16
SAMPLES_PER_QUADRATIC_FEATURE = 16
# The stage's FLOPs stay within this share of the components' it reads.
DECISION_FLOPS_SHARE = 0.05
DECISION_RULES = ("joint", "factorised")

# How a tapped value becomes features: "flat", a linear layer's input as it is;
# "pool", a conv layer's input map reduced to its per-channel mean and maximum
# over positions (the statistics that feature-based out-of-distribution
# detectors read at several depths).
TAP_MODES = ("flat", "pool")


def feature_taps(graph: LegoGraph) -> list[tuple[str, str]]:
    """What a component exposes to the decision stage, as (value name, mode):
    the inputs of its linear layers, last first, then the input maps of its
    conv layers from the last backwards (not the image), while the component's
    feature count stays within MAX_COMPONENT_FEATURES."""
    taps: list[tuple[str, str]] = []
    seen: set[str] = set()
    budget = MAX_COMPONENT_FEATURES
    for kind, mode in (("linear", "flat"), ("conv", "pool")):
        for node in reversed(graph.nodes):
            if node.kind != kind:
                continue
            name = node.args[0].name
            shape = graph.node(name).shape or ()
            if name in seen or name == graph.input_name or not shape:
                continue
            width = shape[-1] if mode == "flat" else 2 * shape[0]
            if mode == "flat" and width > MAX_TAP_FEATURES:
                continue
            if width > budget:
                if mode == "pool":
                    break
                continue
            taps.append((name, mode))
            seen.add(name)
            budget -= width
    return taps


def flat_features(values: list[torch.Tensor], modes: list[str] | tuple[str, ...]) -> torch.Tensor:
    """Tapped values -> [B, D] (see TAP_MODES). A "flat" value with more than two
    dimensions (a linear layer over the last axis of a feature map) is averaged
    over its middle axes."""
    out = []
    for v, mode in zip(values, modes, strict=True):
        if mode == "pool":
            out += [v.mean((2, 3)), v.amax((2, 3))]
        elif v.dim() > 2:
            out.append(v.flatten(1, -2).mean(1))
        else:
            out.append(v)
    return torch.cat(out, 1)


def _oas_shrinkage(cov: torch.Tensor, n: int) -> float:
    """Oracle Approximating Shrinkage intensity towards (tr S / d) I."""
    d = cov.shape[0]
    tr = float(cov.trace())
    tr2 = float((cov * cov).sum())
    num = (1 - 2 / d) * tr2 + tr * tr
    den = (n + 1 - 2 / d) * (tr2 - tr * tr / d)
    return 1.0 if den <= 0 else min(1.0, max(0.0, num / den))


# Samples per block when the fit accumulates its statistics: the pool can hold
# 100,000 samples of thousands of features, whose float64 copies (and pairwise
# products) would take tens of GiB at once.
FIT_BLOCK = 4096


def _blocks(n: int):
    return (slice(i, min(n, i + FIT_BLOCK)) for i in range(0, n, FIT_BLOCK))


def _class_moments(features, labels: torch.Tensor, num_classes: int, n: int):
    """Mean, unbiased std, class means and within-class scatter sum
    (f - mu_y)^T (f - mu_y) of the features `features(block)` gives for row
    blocks (float64), in two passes, one block in memory at a time."""
    total, class_sums = None, None
    counts = torch.bincount(labels, minlength=num_classes).double()
    for rows in _blocks(n):
        f = features(rows)
        if total is None:
            total = torch.zeros(f.shape[1], dtype=torch.float64)
            class_sums = torch.zeros(num_classes, f.shape[1], dtype=torch.float64)
        total += f.sum(0)
        class_sums.index_add_(0, labels[rows], f)
    mean, mu = total / n, class_sums / counts.clamp(min=1)[:, None]
    squares = torch.zeros_like(mean)
    scatter = torch.zeros(mean.numel(), mean.numel(), dtype=torch.float64)
    for rows in _blocks(n):
        f = features(rows)
        squares += ((f - mean) ** 2).sum(0)
        centred = f - mu[labels[rows]]
        scatter += centred.T @ centred
    return mean, (squares / max(1, n - 1)).sqrt(), mu, scatter


def fit_gaussian_discriminant(
    z: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    shrinkage: float | None = None,
    features=None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Closed-form linear discriminant: scores = z @ W.T + b are the log class
    posteriors (up to a constant) of Gaussians with class means and one shared,
    shrunk covariance, equal priors. Features are standardised inside the fit
    (folded into W and b); constant features get zero weight. `features(rows)`,
    if given, computes the float64 features of a block of rows of z (memory
    stays at one block); by default they are z's own.
    Returns (W [C, D], b [C], info)."""
    n = z.shape[0]
    features = features or (lambda rows: z[rows].double())
    mean, std, mu, scatter = _class_moments(features, labels, num_classes, n)
    live = std > 1e-8 * float(std.max().clamp(min=1e-30))
    s = std[live]
    mu_s = (mu[:, live] - mean[live]) / s
    d = int(live.sum())
    cov = scatter[live][:, live] / (s[:, None] * s[None, :]) / max(1, n - num_classes)
    rho = _oas_shrinkage(cov, n) if shrinkage is None else float(shrinkage)
    target = float(cov.trace()) / d
    cov = (1 - rho) * cov + rho * target * torch.eye(d, dtype=cov.dtype)
    weight_live = torch.linalg.solve(cov, mu_s.T).T  # [C, d]
    bias = -0.5 * (weight_live * mu_s).sum(1)
    weight_live = weight_live / s
    bias = bias - weight_live @ mean[live]
    weight = torch.zeros(num_classes, mean.numel(), dtype=torch.float64)
    weight[:, live] = weight_live
    info = {"features": int(mean.numel()), "live_features": d, "shrinkage": round(rho, 4)}
    return weight.float(), bias.float(), info


def stage_flops(features: int, classes: int, rank: int) -> int:
    """FLOPs a sample of a stage over `features` inputs with `rank` components
    (a multiply-add counts two): the linear scores, then standardising,
    projecting, the k x k products and their weights."""
    quadratic = 3 * features + 2 * features * rank + rank * rank + 2 * classes * rank * rank
    return 2 * classes * features + (quadratic if rank else 0)


def quadratic_rank(
    samples: int, features: int, classes: int, flops_budget: float | None = None
) -> int:
    """The number of principal components whose pairwise products the stage
    reads: the largest multiple of QUADRATIC_RANK_STEP (at most
    MAX_QUADRATIC_RANK and the feature count) whose k (k + 1) / 2 products stay
    within samples / SAMPLES_PER_QUADRATIC_FEATURE and whose stage stays within
    `flops_budget`; 0 for small pools (the linear stage)."""
    rank = 0
    for k in range(QUADRATIC_RANK_STEP, MAX_QUADRATIC_RANK + 1, QUADRATIC_RANK_STEP):
        enough = k <= features and k * (k + 1) // 2 <= samples // SAMPLES_PER_QUADRATIC_FEATURE
        cheap = flops_budget is None or stage_flops(features, classes, k) <= flops_budget
        if enough and cheap:
            rank = k
    return rank


class GaussianStage(nn.Module):
    """Scores [B, C] from features z [B, D]: z @ weight.T + bias, plus, when
    `projection` has columns, the products of q = ((z - center) * inv_scale) @
    projection read by `quadratic_weight` [C, k * k] (its upper triangle holds
    the fitted weights, the rest zeros, so the stage needs no gather)."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        center: torch.Tensor | None = None,
        inv_scale: torch.Tensor | None = None,
        projection: torch.Tensor | None = None,
        quadratic_weight: torch.Tensor | None = None,
    ):
        super().__init__()
        d = weight.shape[1]
        self.register_buffer("weight", weight.float().clone())
        self.register_buffer("bias", bias.float().clone())
        self.register_buffer("center", _or_empty(center, (0,)))
        self.register_buffer("inv_scale", _or_empty(inv_scale, (0,)))
        self.register_buffer("projection", _or_empty(projection, (d, 0)))
        self.register_buffer("quadratic_weight", _or_empty(quadratic_weight, (weight.shape[0], 0)))

    @property
    def rank(self) -> int:
        return self.projection.shape[1]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        scores = F.linear(z, self.weight, self.bias)
        if self.rank:
            q = ((z - self.center) * self.inv_scale) @ self.projection
            products = (q.unsqueeze(2) * q.unsqueeze(1)).flatten(1)
            scores = scores + F.linear(products, self.quadratic_weight)
        return scores

    def size(self) -> tuple[int, int]:
        """(params, FLOPs a sample) of what the stage holds and computes."""
        c, d = self.weight.shape
        return sum(b.numel() for b in self.buffers()), stage_flops(d, c, self.rank)


def _or_empty(t: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.zeros(shape) if t is None else t.float().clone()


def fit_decision_stage(
    z: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    rank: int | None = None,
    flops_budget: float | None = None,
) -> tuple[GaussianStage, dict]:
    """The Gaussian discriminant on z, with `rank` principal components' pairwise
    products as extra features (default: `quadratic_rank` of the pool and the
    budget). The components are those of the standardised features, whitened,
    so every product has unit scale. Closed form: one eigendecomposition and one
    linear solve, on statistics accumulated FIT_BLOCK samples at a time."""
    n, d = z.shape
    center = z.mean(0, dtype=torch.float64)
    squares = sum(((z[rows].double() - center) ** 2).sum(0) for rows in _blocks(n))
    scale = (squares / max(1, n - 1)).sqrt()
    live = scale > 1e-8 * float(scale.max().clamp(min=1e-30))
    inv_scale = torch.where(live, 1 / scale.clamp(min=1e-30), torch.zeros_like(scale))
    if rank is None:
        rank = quadratic_rank(n, int(live.sum()), num_classes, flops_budget)
    if rank == 0:
        weight, bias, info = fit_gaussian_discriminant(z, labels, num_classes)
        info["quadratic_rank"] = 0
        return GaussianStage(weight, bias), info

    def standardised(rows):
        return (z[rows].double() - center) * inv_scale

    # The top principal directions of the standardised features: eigenvectors of
    # their covariance (accumulated a block at a time), whitened.
    gram = torch.zeros(d, d, dtype=torch.float64)
    for rows in _blocks(n):
        zs = standardised(rows)
        gram += zs.T @ zs
    variance, vectors = torch.linalg.eigh(gram / n)
    top = variance.flip(0)[:rank].clamp(min=1e-24)
    projection = vectors.flip(1)[:, :rank] / top.sqrt()
    upper = torch.triu_indices(rank, rank)

    def with_products(rows):
        q = standardised(rows) @ projection
        products = (q.unsqueeze(2) * q.unsqueeze(1))[:, upper[0], upper[1]]
        return torch.cat([z[rows].double(), products], 1)

    weight, bias, info = fit_gaussian_discriminant(z, labels, num_classes, features=with_products)
    quadratic_weight = torch.zeros(num_classes, rank, rank)
    quadratic_weight[:, upper[0], upper[1]] = weight[:, d:]
    stage = GaussianStage(
        weight[:, :d],
        bias,
        center,
        inv_scale,
        projection,
        quadratic_weight.flatten(1),
    )
    info["quadratic_rank"] = rank
    return stage, info


def part_index(sizes: list[int]) -> torch.Tensor:
    """Output position -> part number."""
    return torch.cat([torch.full((n,), k, dtype=torch.long) for k, n in enumerate(sizes)])


def combine(
    scores: torch.Tensor, logits: torch.Tensor, sizes: list[int], rule: str
) -> torch.Tensor:
    """The assembled model's output from the discriminant's scores [B, C] and
    the components' own (unscaled) logits [B, C].

    "factorised": log P(part | x) from the discriminant, plus the component's
    own log-softmax within its part; "joint": the discriminant's scores."""
    if rule == "joint":
        return scores
    log_post = F.log_softmax(scores, 1)
    out = []
    start = 0
    for n in sizes:
        part = torch.logsumexp(log_post[:, start : start + n], 1, keepdim=True)
        out.append(part + F.log_softmax(logits[:, start : start + n], 1))
        start += n
    return torch.cat(out, 1)


class DecisionNet(nn.Module):
    """The assembled body (components with taps) followed by the decision
    stage. `body.features(x)` returns (scaled logits [B, C], features [B, D]);
    `unscale` turns scaled logits back into the components' own logits."""

    def __init__(
        self,
        body: nn.Module,
        stage: GaussianStage,
        unscale: torch.Tensor,
        sizes: list[int],
        rule: str,
    ):
        super().__init__()
        if rule not in DECISION_RULES:
            raise ValueError(f"unknown decision rule {rule!r}")
        self.body = body
        self.sizes = list(sizes)
        self.rule = rule
        self.stage = stage
        self.register_buffer("unscale", unscale.float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, feats = self.body.features(x)
        scores = self.stage(torch.cat([feats, logits], 1))
        return combine(scores, logits * self.unscale, self.sizes, self.rule)


__all__ = [
    "DECISION_FLOPS_SHARE",
    "DECISION_RULES",
    "DecisionNet",
    "GaussianStage",
    "combine",
    "feature_taps",
    "fit_decision_stage",
    "fit_gaussian_discriminant",
    "flat_features",
    "part_index",
    "quadratic_rank",
    "stage_flops",
]
