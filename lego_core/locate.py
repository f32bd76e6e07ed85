"""Component locating (MDA sections 1 and 3): sample selection, contribution
sums, and per-class masks from the output backwards."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lego_core.channels import backward_masks
from lego_core.contributions import ContributionAccumulator, add_sums
from lego_core.data import normalize
from lego_core.errors import DatasetError, LegoError
from lego_core.files import atomic_write
from lego_core.model import SourceModel

Progress = Callable[[float, str], None]

# The reference code uses linear alpha 0.4 and beta 0.3; on LeNet/MNIST those
# drop components 1-2 points below their source (docs/architecture.md), so the
# linear defaults here are looser. Pass REFERENCE_ALPHA / REFERENCE_BETA for the
# reference values.
REFERENCE_ALPHA = {"conv": 0.3, "linear": 0.4}
REFERENCE_BETA = {"conv": 0.2, "linear": 0.3}
DEFAULT_ALPHA = {"conv": 0.3, "linear": 0.2}
DEFAULT_BETA = {"conv": 0.2, "linear": 0.1}
DEFAULT_SAMPLES_PER_CLASS = 50
_EPS = 1e-12
FORMAT_VERSION = 1


def _per_kind(value, default: dict[str, float], what: str) -> dict[str, float]:
    if value is None:
        return dict(default)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        out = {"conv": float(value), "linear": float(value)}
    elif isinstance(value, dict):
        unknown = set(value) - {"conv", "linear"}
        if unknown:
            raise LegoError(f"{what} keys must be 'conv' and/or 'linear', got {sorted(unknown)}")
        out = {**default, **{k: float(v) for k, v in value.items()}}
    else:
        raise LegoError(f"{what} must be a number or {{'conv': x, 'linear': y}}")
    for k, v in out.items():
        if not 0.0 <= v < 1.0:
            raise LegoError(f"{what} for {k} layers must be in [0, 1), got {v}")
    return out


@dataclass
class Components:
    """The located components of one model: for every class, the input mask
    of every conv/linear layer (True = that input channel/feature is part of
    the class's component)."""

    class_names: list[str]
    layers: list[str]
    masks: dict[int, dict[str, torch.Tensor]]
    selected: dict[int, torch.Tensor]
    parameters: dict
    dataset: dict = field(default_factory=dict)
    stats: dict[int, dict] = field(default_factory=dict)

    @property
    def located_classes(self) -> list[int]:
        return sorted(self.masks)

    def summary(self) -> dict[str, dict]:
        """Per class name: input channels kept per layer, params and FLOPs of
        the single-class component."""
        out = {}
        for c in self.located_classes:
            layers = {layer: [int(m.sum()), int(m.numel())] for layer, m in self.masks[c].items()}
            out[self.class_names[c]] = {
                "layers": layers,
                "samples": int(self.selected[c].numel()),
                **self.stats.get(c, {}),
            }
        return out

    def to_state(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "class_names": list(self.class_names),
            "layers": list(self.layers),
            "masks": {str(c): {k: v.clone() for k, v in m.items()} for c, m in self.masks.items()},
            "selected": {str(c): v.clone() for c, v in self.selected.items()},
            "parameters": self.parameters,
            "dataset": self.dataset,
            "stats": {str(c): s for c, s in self.stats.items()},
        }

    def save(self, path: str | Path) -> None:
        """Writes atomically: a temp file in the same directory, then rename."""
        atomic_write(path, lambda f: torch.save(self.to_state(), f))

    @classmethod
    def load(cls, path: str | Path) -> Components:
        try:
            s = torch.load(path, map_location="cpu", weights_only=True)
            if s.get("format_version") != FORMAT_VERSION:
                raise LegoError(f"components file {path} has an unknown format version")
            return cls(
                class_names=list(s["class_names"]),
                layers=list(s["layers"]),
                masks={int(c): dict(m) for c, m in s["masks"].items()},
                selected={int(c): v for c, v in s["selected"].items()},
                parameters=dict(s["parameters"]),
                dataset=dict(s["dataset"]),
                stats={int(c): dict(v) for c, v in s["stats"].items()},
            )
        except LegoError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise LegoError(f"not a components file: {path}: {exc}") from None


# ---------------------------------------------------------------------------


def class_mapping(model: SourceModel, data) -> torch.Tensor:
    """Maps each dataset label to the model's class index (-1: not a model class)."""
    mapping = torch.full((len(data.class_names),), -1, dtype=torch.long)
    for i, name in enumerate(data.class_names):
        if name in model.class_names:
            mapping[i] = model.class_names.index(name)
    if int((mapping >= 0).sum()) == 0:
        raise DatasetError(
            "the dataset shares no class name with the model "
            f"(dataset: {data.class_names[:10]}, model: {model.class_names[:10]})"
        )
    return mapping


def _check_data_spec(model: SourceModel, data) -> None:
    if tuple(data.images.shape[1:]) != model.spec.shape:
        raise DatasetError(
            f"dataset images are {tuple(data.images.shape[1:])}, "
            f"the model expects {model.spec.shape}"
        )


@torch.no_grad()
def select_samples(
    model: SourceModel,
    data,
    samples_per_class: int = DEFAULT_SAMPLES_PER_CLASS,
    batch_size: int = 256,
    progress: Progress | None = None,
    device: str | torch.device = "cpu",
) -> dict[int, torch.Tensor]:
    """MDA section 1: for each model class present in the data, the indices of
    the `samples_per_class` samples with the highest true-class probability."""
    if samples_per_class < 1:
        raise LegoError("samples_per_class must be at least 1")
    _check_data_spec(model, data)
    mapping = class_mapping(model, data)
    net = model.net().to(device)
    labels = mapping[data.labels]
    scores = torch.full((len(data),), -1.0)
    n = len(data)
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(n, start + batch_size))
        lab = labels[idx]
        ok = lab >= 0
        if not bool(ok.any()):
            continue
        x = normalize(data.images[idx[ok]].to(device), model.spec)
        probs = torch.softmax(net(x), 1).cpu()
        scores[idx[ok]] = probs.gather(1, lab[ok][:, None]).squeeze(1)
        if progress:
            progress(min(n, start + batch_size) / n, "selecting samples")
    selected = {}
    for c in sorted(set(labels[labels >= 0].tolist())):
        members = torch.nonzero(labels == c).flatten()
        # Stable order: highest probability first, ties by index.
        order = torch.sort(-scores[members], stable=True).indices
        selected[c] = members[order[:samples_per_class]].clone()
    return selected


CONTRIBUTION_BATCH = 128


def sample_order(selected: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The canonical order of the selected samples (by class, then by
    selection rank) and their class labels."""
    classes = sorted(selected)
    if not classes:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    idx = torch.cat([selected[c] for c in classes])
    lab = torch.cat([torch.full((selected[c].numel(),), c, dtype=torch.long) for c in classes])
    return idx, lab


def shard_plan(
    selected: dict[int, torch.Tensor], shards: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Splits the selected samples into `shards` parts along whole batches of
    the canonical order, so every sample is computed in the same batch as in
    one pass and the summed shards equal the one-pass sums."""
    idx, lab = sample_order(selected)
    n_batches = max(1, -(-idx.numel() // CONTRIBUTION_BATCH))
    shards = max(1, min(int(shards), n_batches))
    bounds = [round(k * n_batches / shards) * CONTRIBUTION_BATCH for k in range(shards + 1)]
    return [(idx[a:b], lab[a:b]) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


@torch.no_grad()
def contribution_sums(
    model: SourceModel,
    data,
    indices: torch.Tensor,
    labels: torch.Tensor,
    progress: Progress | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """MDA section 2: R_c[l] = sum over class c's samples of the clamped
    relative contributions, for every located layer l. `indices` are dataset
    rows, `labels` their model class indices. Returns {layer: [num_model_classes,
    Q, P / groups] float64}; additive over samples."""
    _check_data_spec(model, data)
    net = model.net().to(device)
    acc = ContributionAccumulator(len(model.class_names))
    weights = {
        n.layer: model.graph.tensors[n.weight_key()].to(device) for n in model.graph.layers()
    }

    def hook(node, x):
        acc.add(node, x, weights[node.layer])

    net.hook = hook
    n = indices.numel()
    for start in range(0, n, CONTRIBUTION_BATCH):
        acc.labels = labels[start : start + CONTRIBUTION_BATCH].to(device)
        batch = data.images[indices[start : start + CONTRIBUTION_BATCH]].to(device)
        net(normalize(batch, model.spec))
        if progress:
            progress(min(n, start + CONTRIBUTION_BATCH) / n, "computing contributions")
    return {layer: r.cpu() for layer, r in acc.sums.items()}


def _minmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    lo = x.min(dim, keepdim=True).values
    hi = x.max(dim, keepdim=True).values
    span = hi - lo
    # A constant row carries no ranking: all relevant if positive, else none.
    return torch.where(span > 0, (x - lo) / (span + _EPS), (x > 0).to(x.dtype))


def mda_layer_rule(
    r_sum: torch.Tensor, out_mask: torch.Tensor, alpha: float, beta: float, groups: int
):
    """MDA section 3 for one layer: which inputs matter, given relevant outputs.

    r_sum: [Q, P / groups] contributions. Row-wise min-max over the inputs each
    output sees, r_hat = r > alpha, t_p = number of relevant outputs for which
    p is relevant, min-max over p, input mask = t > beta (strict, as the
    reference code)."""
    q, pg = r_sum.shape
    r_hat = (_minmax(r_sum, 1) > alpha).to(torch.float64) * out_mask[:, None].to(torch.float64)
    if groups == 1:
        t = r_hat.sum(0)
    else:
        t = r_hat.view(groups, q // groups, pg).sum(1).reshape(groups * pg)
    if not bool(out_mask.any()):
        return torch.zeros_like(t, dtype=torch.bool)
    return _minmax(t[None], 1)[0] > beta


def masks_from_sums(
    model: SourceModel, sums: dict[str, torch.Tensor], classes: list[int], alpha: dict, beta: dict
) -> dict[int, dict[str, torch.Tensor]]:
    graph = model.graph
    out: dict[int, dict[str, torch.Tensor]] = {}
    for c in classes:

        def rule(node, m, c=c):
            kind = "conv" if node.kind == "conv" else "linear"
            groups = node.conv_options()[3] if node.kind == "conv" else 1
            return mda_layer_rule(sums[node.layer][c], m, alpha[kind], beta[kind], groups)

        one_hot = torch.zeros(graph.num_outputs, dtype=torch.bool)
        one_hot[c] = True
        demands = backward_masks(graph, one_hot, rule)
        out[c] = {
            n.layer: demands.get(
                n.layer, torch.zeros(graph.node(n.args[0].name).channels, dtype=torch.bool)
            )
            for n in graph.layers()
        }
    return out


def locate(
    model: SourceModel,
    data,
    samples_per_class: int = DEFAULT_SAMPLES_PER_CLASS,
    alpha: float | dict | None = None,
    beta: float | dict | None = None,
    shards: int = 1,
    progress: Progress | None = None,
    with_stats: bool = True,
    device: str | torch.device = "cpu",
) -> Components:
    """Locates the component of every model class that the dataset has.

    `shards` > 1 computes the contribution sums over that many disjoint parts
    of the selected samples and adds them, as distributed workers would.
    `device` runs the forward passes there (e.g. "cuda"); results are on the CPU."""
    alpha_d = _per_kind(alpha, DEFAULT_ALPHA, "alpha")
    beta_d = _per_kind(beta, DEFAULT_BETA, "beta")
    report = progress or (lambda f, m: None)
    selected = select_samples(
        model, data, samples_per_class, progress=lambda f, m: report(0.5 * f, m), device=device
    )
    sums: dict[str, torch.Tensor] = {}
    plan = shard_plan(selected, shards)
    for k, (idx, lab) in enumerate(plan):
        part = contribution_sums(
            model,
            data,
            idx,
            lab,
            progress=lambda f, m, k=k: report(0.5 + 0.35 * (k + f) / len(plan), m),
            device=device,
        )
        sums = add_sums(sums, part)
    classes = sorted(selected)
    report(0.85, "locating masks")
    masks = masks_from_sums(model, sums, classes, alpha_d, beta_d)
    components = Components(
        class_names=list(model.class_names),
        layers=[n.layer for n in model.graph.layers()],
        masks=masks,
        selected=selected,
        parameters={"samples_per_class": samples_per_class, "alpha": alpha_d, "beta": beta_d},
        dataset={
            "source": str(getattr(data, "source", "")),
            "size": len(data),
            "class_names": list(data.class_names),
        },
    )
    if with_stats:
        from lego_core.disassemble import disassemble
        from lego_core.evaluate import count_flops

        for i, c in enumerate(classes):
            comp = disassemble(model, components, [c])
            components.stats[c] = {"params": comp.graph.param_count(), "flops": count_flops(comp)}
            report(0.85 + 0.15 * (i + 1) / len(classes), "measuring components")
    report(1.0, "done")
    return components
