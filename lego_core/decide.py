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
Chen et al. 2010), and one linear solve. At run time the stage is one [C x D]
matrix product on features that already exist.
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


def fit_gaussian_discriminant(
    z: torch.Tensor, labels: torch.Tensor, num_classes: int, shrinkage: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Closed-form linear discriminant: scores = z @ W.T + b are the log class
    posteriors (up to a constant) of Gaussians with class means and one shared,
    shrunk covariance, equal priors. Features are standardised inside the fit
    (folded into W and b); constant features get zero weight.
    Returns (W [C, D], b [C], info)."""
    z = z.double()
    mean, std = z.mean(0), z.std(0)
    live = std > 1e-8 * float(std.max().clamp(min=1e-30))
    zs = (z[:, live] - mean[live]) / std[live]
    mu = torch.stack([zs[labels == k].mean(0) for k in range(num_classes)])
    centred = zs - mu[labels]
    n, d = zs.shape
    cov = centred.T @ centred / max(1, n - num_classes)
    rho = _oas_shrinkage(cov, n) if shrinkage is None else float(shrinkage)
    target = float(cov.trace()) / d
    cov = (1 - rho) * cov + rho * target * torch.eye(d, dtype=cov.dtype)
    weight_live = torch.linalg.solve(cov, mu.T).T  # [C, d]
    bias = -0.5 * (weight_live * mu).sum(1)
    weight_live = weight_live / std[live]
    bias = bias - weight_live @ mean[live]
    weight = torch.zeros(num_classes, z.shape[1], dtype=z.dtype)
    weight[:, live] = weight_live
    info = {"features": int(z.shape[1]), "live_features": int(d), "shrinkage": round(rho, 4)}
    return weight.float(), bias.float(), info


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
        weight: torch.Tensor,
        bias: torch.Tensor,
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
        self.register_buffer("weight", weight.float().clone())
        self.register_buffer("bias", bias.float().clone())
        self.register_buffer("unscale", unscale.float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, feats = self.body.features(x)
        scores = F.linear(torch.cat([feats, logits], 1), self.weight, self.bias)
        return combine(scores, logits * self.unscale, self.sizes, self.rule)


__all__ = [
    "DECISION_RULES",
    "DecisionNet",
    "combine",
    "feature_taps",
    "fit_gaussian_discriminant",
    "flat_features",
    "part_index",
]
