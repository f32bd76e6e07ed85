"""Component locating (MDA sections 1 and 3): sample selection, contribution
sums, and per-class masks from the output backwards."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lego_core.channels import backward_masks, is_depthwise
from lego_core.contributions import (
    CLASSES_KEY,
    ContributionAccumulator,
    add_sums,  # noqa: F401 - part of locate's shard API (shard_plan, contribution_sums, ...)
    linear_class_sums,
    single_tap,
    tap_weight,
)
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
        """Per class name: input channels per layer ([kept, total]), params and
        FLOPs of the single-class component. Without `stats` the layer counts are
        the masks' (the relevant channels); `lego_core.evaluate.component_stats`
        measures what the component really keeps, which replaces them (channels
        that cannot be pruned stay in every component)."""
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


# Largest activation memory that one batch of a forward pass may take (the three
# largest values per sample, float32): inputs of 224 px get batches of a few
# images, CIFAR/MNIST-size inputs the full SELECT_BATCH / CONTRIBUTION_BATCH.
BATCH_ACTIVATION_BYTES = 512 << 20
SELECT_BATCH = 256


def forward_batch(model: SourceModel, wanted: int) -> int:
    """`wanted`, or fewer samples when a batch's activations would exceed
    BATCH_ACTIVATION_BYTES."""
    sizes = sorted((math.prod(n.shape) for n in model.graph.nodes if n.shape), reverse=True)
    per_sample = 4 * sum(sizes[:3])
    return max(1, min(int(wanted), BATCH_ACTIVATION_BYTES // max(1, per_sample)))


@torch.no_grad()
def true_class_scores(
    model: SourceModel,
    data,
    labels: torch.Tensor,
    rows: torch.Tensor,
    batch_size: int = SELECT_BATCH,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> torch.Tensor:
    """The softmax probability of the true class for `rows` of `data` (-1 where the
    label is not a model class), in batches of `forward_batch(model, batch_size)`
    counted from rows[0]. Selection shards call this too: a shard starting on a
    multiple of that batch scores every row in the same batch as one pass."""
    net = model.net().to(device)
    batch = forward_batch(model, batch_size)
    scores = torch.full((rows.numel(),), -1.0)
    n = rows.numel()
    for b in range(0, n, batch):
        idx = rows[b : b + batch]
        lab = labels[idx]
        ok = lab >= 0
        if not bool(ok.any()):
            continue
        x = normalize(data.images[idx[ok]].to(device), model.spec)
        probs = torch.softmax(net(x), 1).cpu()
        scores[b : b + batch][ok] = probs.gather(1, lab[ok][:, None]).squeeze(1)
        if progress:
            progress(min(n, b + batch) / n, "selecting samples")
    return scores


@torch.no_grad()
def select_samples(
    model: SourceModel,
    data,
    samples_per_class: int = DEFAULT_SAMPLES_PER_CLASS,
    batch_size: int = SELECT_BATCH,
    progress: Progress | None = None,
    device: str | torch.device = "cpu",
) -> dict[int, torch.Tensor]:
    """MDA section 1: for each model class present in the data, the indices of
    the `samples_per_class` samples with the highest true-class probability."""
    if samples_per_class < 1:
        raise LegoError("samples_per_class must be at least 1")
    _check_data_spec(model, data)
    mapping = class_mapping(model, data)
    labels = mapping[data.labels]
    rows = torch.arange(len(data))
    scores = true_class_scores(model, data, labels, rows, batch_size, device, progress)
    selected = {}
    for c in sorted(set(labels[labels >= 0].tolist())):
        members = torch.nonzero(labels == c).flatten()
        # Stable order: highest probability first, ties by index.
        order = torch.sort(-scores[members], stable=True).indices
        selected[c] = members[order[:samples_per_class]].clone()
    return selected


CONTRIBUTION_BATCH = 128
# Memory of the contribution sums (and their per-batch parts) that one block of
# classes may take, beyond the model and one batch of the forward pass.
DEFAULT_MEMORY_BUDGET = 2 << 30
# Largest piece of a linear layer's (or 1x1 conv's) [Q, P] class sums formed at once
# for its mask: small enough that the ~10 passes over it (form, extremes, scale,
# threshold, count) stay in a core's L2 cache; 64 MiB blocks took 4x longer.
_MASK_BLOCK_BYTES = 2 << 20
# A block's pairs are taken one class at a time when its runs of one class average
# at least this many sums (below that, the Python steps per run cost more than
# the per-pair gathers they save).
_MIN_RUN_ELEMENTS = 1 << 14
# Steps of the per-row threshold search before falling back to division, and the
# smallest block worth the search (its ~20 small ops cost more than dividing a
# smaller one).
_THRESHOLD_STEPS = 4
_MIN_THRESHOLD_ELEMENTS = 1 << 16


def sample_order(selected: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The canonical order of the selected samples (by class, then by
    selection rank) and their class labels."""
    classes = sorted(selected)
    if not classes:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    idx = torch.cat([selected[c] for c in classes])
    lab = torch.cat([torch.full((selected[c].numel(),), c, dtype=torch.long) for c in classes])
    return idx, lab


def located_layers(graph) -> list:
    """The layers whose contributions decide masks: every conv and linear layer
    except depthwise convs, which pass their output mask through unchanged."""
    return [n for n in graph.layers() if not is_depthwise(n, graph)]


def class_bytes(model: SourceModel) -> int:
    """Bytes that one class adds to the contribution sums: float64 [Q, P/groups]
    per conv layer read through several kernel taps, two float64 [P] per linear
    layer or conv read through one (`single_tap`), plus the float32 per-batch part
    of the largest such conv layer and its float64 copy (16 bytes an entry)."""
    conv, signed = [], []
    for n in located_layers(model.graph):
        weight = model.graph.tensors[n.weight_key()]
        if _signed_weight(model, n) is not None:
            signed.append(weight.shape[1] * _groups(n))  # the layer's inputs
        else:
            conv.append(weight[:, :, 0, 0].numel())
    return 8 * sum(conv) + 16 * sum(signed) + 16 * max(conv, default=0)


def _signed_weight(model: SourceModel, node) -> torch.Tensor | None:
    """The [Q, P / groups] weight of a layer whose sums are kept as sums of signed
    parts (`single_tap`), else None."""
    weight = model.graph.tensors[node.weight_key()]
    in_hw = model.graph.node(node.args[0].name).shape[1:]
    tap = single_tap(node, weight, in_hw)
    return None if tap is None else tap_weight(weight, tap)


def classes_per_block(model: SourceModel, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """How many classes' contribution sums fit in `memory_budget` bytes (at least 1)."""
    return max(1, int(memory_budget) // max(1, class_bytes(model)))


def shard_plan(
    selected: dict[int, torch.Tensor],
    shards: int,
    model: SourceModel | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Splits the selected samples into parts of whole classes, in the canonical
    order: `shards` parts, or more when `model` is given and one part's classes
    would not fit `memory_budget` (see `classes_per_block`). A class's sums never
    depend on the other samples of its batch (see `class_batches`), so the parts'
    sums, added, equal the sums of one pass, and each part's masks can be computed
    and its sums dropped before the next part."""
    idx, lab = sample_order(selected)
    classes = sorted(selected)
    if not classes:
        return []
    parts = max(1, int(shards))
    if model is not None:
        parts = max(parts, -(-len(classes) // classes_per_block(model, memory_budget)))
    parts = min(parts, len(classes))
    counts = [selected[c].numel() for c in classes]
    starts = [0, *itertools.accumulate(counts)]
    cuts = [round(k * len(classes) / parts) for k in range(parts + 1)]
    return [
        (idx[starts[a] : starts[b]], lab[starts[a] : starts[b]])
        for a, b in itertools.pairwise(cuts)
        if b > a
    ]


def class_batches(labels: torch.Tensor, batch: int = CONTRIBUTION_BATCH) -> list[tuple[int, int]]:
    """[start, stop) batches over samples in class order: whole classes packed up to
    `batch` samples; a class of more than `batch` samples is cut every `batch`
    samples from its own start. So where a class's samples are cut never depends on
    the other classes, and its sums are the same in any shard or block."""
    out: list[tuple[int, int]] = []
    n = labels.numel()
    if n == 0:
        return out
    change = torch.nonzero(labels[1:] != labels[:-1]).flatten() + 1
    bounds = [0, *change.tolist(), n]
    open_start = None
    for a, b in itertools.pairwise(bounds):
        while b - a > batch:
            if open_start is not None:
                out.append((open_start, a))
                open_start = None
            out.append((a, a + batch))
            a += batch
        if open_start is not None and b - open_start > batch:
            out.append((open_start, a))
            open_start = None
        if open_start is None:
            open_start = a
    out.append((open_start, n))
    return out


@torch.no_grad()
def contribution_sums(
    model: SourceModel,
    data,
    indices: torch.Tensor,
    labels: torch.Tensor,
    progress: Progress | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """MDA section 2: the per-class sums from which R_c[l] (the sum over class c's
    samples of the clamped relative contributions) follows for every located
    layer l. `indices` are dataset rows, `labels` their model class indices, in
    class order (as `shard_plan` gives them). Memory grows with the number of
    classes in `labels`: split with `shard_plan(..., model=model)` to bound it.

    Returns a dict of CPU tensors, additive over samples (`add_sums`) and safe for
    torch.save / torch.load(weights_only=True): "#classes" the model classes of
    the rows; per conv layer [classes, Q, P / groups] float64; per linear layer
    "LAYER#pos" and "LAYER#neg", [classes, P] float64 sums of the input's positive
    and negative parts (see `ContributionAccumulator`)."""
    _check_data_spec(model, data)
    if labels.numel() > 1 and not bool((labels[1:] >= labels[:-1]).all()):
        labels, order = torch.sort(labels, stable=True)
        indices = indices[order]
    net = model.net().to(device)
    acc = ContributionAccumulator(torch.unique(labels))
    layers = {n.layer for n in located_layers(model.graph)}
    weights = {
        n.layer: model.graph.tensors[n.weight_key()].to(device)
        for n in model.graph.layers()
        if n.layer in layers
    }

    def hook(node, x):
        if node.layer in layers:
            acc.add(node, x, weights[node.layer])

    net.hook = hook
    n = indices.numel()
    for start, stop in class_batches(labels, forward_batch(model, CONTRIBUTION_BATCH)):
        acc.set_batch(labels[start:stop].to(device))
        batch = data.images[indices[start:stop]].to(device)
        net(normalize(batch, model.spec))
        if progress:
            progress(stop / n, "computing contributions")
    return acc.result()


def _minmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    lo = x.min(dim, keepdim=True).values
    hi = x.max(dim, keepdim=True).values
    span = hi - lo
    # A constant row carries no ranking: all relevant if positive, else none.
    return torch.where(span > 0, (x - lo) / (span + _EPS), (x > 0).to(x.dtype))


def _relevance_threshold(lo: torch.Tensor, d: torch.Tensor, alpha: float) -> torch.Tensor | None:
    """Per row, the smallest float64 t with fl(fl(t - lo) / d) > alpha, or None when
    the search does not settle in `_THRESHOLD_STEPS` (rows that are not finite; at
    alpha 0, a crossing among the subnormals). Rounding is monotone, so a value x
    passes the rule's arithmetic exactly when x >= t: one compare per value instead
    of a subtraction, a division and a compare. The start lo + alpha * d is within
    a unit in the last place of t on the zoo's layers; each step moves one."""

    def passes(v: torch.Tensor) -> torch.Tensor:
        return (v - lo) / d > alpha

    t = lo + alpha * d
    down_to, up_to = torch.full_like(t, -math.inf), torch.full_like(t, math.inf)
    for _ in range(_THRESHOLD_STEPS):
        below = torch.nextafter(t, down_to)
        up, down = ~passes(t), passes(below)  # (down implies t passes: monotone)
        if not bool((up | down).any()):
            return t
        t = torch.where(up, torch.nextafter(t, up_to), torch.where(down, below, t))
    return None


def _row_relevance(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """`_minmax(x, 1) > alpha`, exactly, overwriting `x` (a float64 scratch block)
    with 1.0 where relevant and 0.0 elsewhere: an in-place compare and float sums
    of the result take a third of the time of a bool compare and integer sums.
    The row extremes, a per-row threshold (`_relevance_threshold`), and the
    constant rows' 0/1 only where there are any. The mask phase runs through here
    block by block."""
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)  # (aminmax over a dim is slower)
    span = hi - lo
    constant = ~(span > 0).flatten()
    any_constant = bool(constant.any())
    if any_constant:
        constant_rows = ((x[constant] > 0).to(x.dtype) > alpha).to(x.dtype)
    threshold = None
    if x.numel() >= _MIN_THRESHOLD_ELEMENTS:
        threshold = _relevance_threshold(lo, span + _EPS, alpha)
    # Small or non-finite blocks: the rule's own arithmetic.
    fallback = threshold is None
    out = x.sub_(lo).div_(span + _EPS).gt_(alpha) if fallback else x.ge_(threshold)
    if any_constant:
        out[constant] = constant_rows
    return out


class _LayerSums:
    """The clamped-contribution sums R_c[q, :] of one layer for output rows q of one
    or several sums rows (classes): dense sums as they are; a layer read through one tap
    (`single_tap`; `weight`: that tap's [Q, P / groups]) has them formed from its
    sums of x+ and x-."""

    def __init__(self, sums, layer: str, weight: torch.Tensor | None, groups: int):
        self.sums, self.layer, self.weight, self.groups = sums, layer, weight, groups
        self.dense = sums.get(layer)
        self.shape = tuple(weight.shape) if self.dense is None else tuple(self.dense.shape[1:])

    def __call__(self, row: int | torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """A new [len(outputs), P / groups] tensor (the mask rule overwrites it): the
        sums row `row`'s, or each output's own sums row (`row` a tensor)."""
        if self.dense is not None:
            return self.dense[row, outputs]
        return linear_class_sums(self.sums, self.layer, row, self.weight, outputs, self.groups)


def mda_layer_rule(
    r_sum: _LayerSums,
    rows: torch.Tensor,
    out_masks: torch.Tensor,
    alpha: float,
    beta: float,
    groups: int,
) -> torch.Tensor:
    """MDA section 3 for one layer and several classes: which inputs matter to each
    class, given its relevant outputs.

    r_sum: the layer's [Q, P / groups] contributions of the sums rows `rows` (one a
    class); out_masks: [len(rows), Q] each class's relevant outputs. Per class:
    row-wise min-max over the inputs each output sees, r_hat = r > alpha, t_p =
    number of relevant outputs for which p is relevant, min-max over p, input mask
    = t > beta (strict, as the reference code). Returns [len(rows), P].

    Only the relevant (class, output) pairs are formed, many classes' at once, in
    blocks of `_MASK_BLOCK_BYTES`; classes are taken so many at a time that their
    counts fit a block too. So the scratch memory stays a few blocks whatever the
    number of classes or the layer's size. Counts are sums of 0.0 and 1.0 in
    float64, exact integers in any order."""
    q, pg = r_sum.shape
    qg = q // groups
    out = torch.zeros(rows.numel(), groups * pg, dtype=torch.bool)
    step = max(1, _MASK_BLOCK_BYTES // (8 * pg))
    per_block = max(1, _MASK_BLOCK_BYTES // (8 * groups * pg))
    for a in range(0, rows.numel(), per_block):
        masks = out_masks[a : a + per_block]
        cls, outputs = torch.nonzero(masks, as_tuple=True)
        counts = torch.zeros(masks.shape[0] * groups, pg, dtype=torch.float64)
        for i in range(0, cls.numel(), step):
            c, o = cls[i : i + step], outputs[i : i + step]
            # Pairs come in class order. Long runs of one class are taken a run at
            # a time (its sums row broadcasts; no per-pair gathers), many short runs
            # all at once (one gather each instead of a Python step per class).
            run_classes, run_lengths = torch.unique_consecutive(c, return_counts=True)
            if run_classes.numel() * _MIN_RUN_ELEMENTS <= c.numel() * pg:
                runs = zip(run_classes.tolist(), torch.split(o, run_lengths.tolist()), strict=True)
                for k, o_run in runs:
                    r_hat = _row_relevance(r_sum(int(rows[a + k]), o_run), alpha)
                    if groups == 1:
                        # A product with ones sums the rows faster than sum(0).
                        counts[k] += (r_hat.new_ones(1, r_hat.shape[0]) @ r_hat)[0]
                    else:
                        target = k * groups + torch.div(o_run, qg, rounding_mode="floor")
                        counts.index_add_(0, target, r_hat)
            else:
                r_hat = _row_relevance(r_sum(rows[a + c], o), alpha)
                target = c * groups + torch.div(o, qg, rounding_mode="floor")
                counts.index_add_(0, target, r_hat)
        t = counts.view(masks.shape[0], groups * pg)
        out[a : a + per_block] = (_minmax(t, 1) > beta) & masks.any(1, keepdim=True)
    return out


def _row(sums: dict[str, torch.Tensor], c: int) -> int:
    rows = sums.get(CLASSES_KEY)
    if rows is None:  # dense sums: row = class
        return c
    row = int(torch.searchsorted(rows, c))
    if row >= rows.numel() or int(rows[row]) != c:
        raise LegoError(f"the contribution sums have no samples of class {c}")
    return row


def is_conv_like(graph, node) -> bool:
    """Conv layers, and linear layers over the channels of a feature map (1x1 convs),
    which take the conv layers' alpha and beta."""
    shape = graph.node(node.args[0].name).shape or ()
    return node.kind == "conv" or len(shape) > 1


def layer_sums(model: SourceModel, sums: dict[str, torch.Tensor], c: int, layer: str):
    """The [Q, P / groups] clamped-contribution sums R_c of one layer for class c
    (a layer read through one tap has them formed from its sums of x+ and x-)."""
    node = next(n for n in model.graph.layers() if n.layer == layer)
    weight = None if layer in sums else _signed_weight(model, node)
    r_sum = _LayerSums(sums, layer, weight, _groups(node))
    return r_sum(_row(sums, c), torch.arange(r_sum.shape[0]))


def _groups(node) -> int:
    return node.conv_options()[3] if node.kind == "conv" else 1


def masks_from_sums(
    model: SourceModel, sums: dict[str, torch.Tensor], classes: list[int], alpha: dict, beta: dict
) -> dict[int, dict[str, torch.Tensor]]:
    """The masks of `classes` from `contribution_sums` (or `add_sums` of several).
    Also takes dense sums {layer: [num_model_classes, Q, P / groups]} (row = class).
    One backward walk carries every class's mask (`backward_masks`)."""
    graph = model.graph
    if not classes:
        return {}
    rows = torch.tensor([_row(sums, c) for c in classes], dtype=torch.long)

    def rule(node, m):
        kind = "conv" if is_conv_like(graph, node) else "linear"
        groups = _groups(node)
        weight = None if node.layer in sums else _signed_weight(model, node)
        r = _LayerSums(sums, node.layer, weight, groups)
        return mda_layer_rule(r, rows, m, alpha[kind], beta[kind], groups)

    one_hot = torch.zeros(len(classes), graph.num_outputs, dtype=torch.bool)
    one_hot[torch.arange(len(classes)), torch.tensor(classes)] = True
    demands = backward_masks(graph, one_hot, rule)
    out: dict[int, dict[str, torch.Tensor]] = {c: {} for c in classes}
    for n in graph.layers():
        m = demands.get(n.layer)
        for i, c in enumerate(classes):
            # A copy per class: a class's masks are saved and changed on their own.
            out[c][n.layer] = (
                m[i].clone()
                if m is not None
                else torch.zeros(graph.node(n.args[0].name).channels, dtype=torch.bool)
            )
    return out


class Locator:
    """Locates one model's components on one dataset, at any thresholds.

    The samples are selected on the first call and kept. The contribution sums are
    kept too when they fit in one part (`shard_plan`: `shards` 1 and within
    `memory_budget`), so another call at other thresholds costs one mask pass;
    otherwise each call computes them again part by part, dropping each part's sums
    before the next. `locate` is one call of a new Locator."""

    def __init__(
        self,
        model: SourceModel,
        data,
        samples_per_class: int = DEFAULT_SAMPLES_PER_CLASS,
        shards: int = 1,
        device: str | torch.device = "cpu",
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ):
        self.model, self.data, self.samples_per_class = model, data, samples_per_class
        self.shards, self.device, self.memory_budget = shards, device, memory_budget
        self.selected: dict[int, torch.Tensor] | None = None
        self._plan: list | None = None
        self._kept_sums: dict[str, torch.Tensor] | None = None

    @classmethod
    def from_sums(
        cls, model: SourceModel, data, selected: dict, sums: dict, samples_per_class: int
    ) -> Locator:
        """A Locator over samples selected and contribution sums computed elsewhere
        (the service's shards): every call is one mask pass over `sums`."""
        locator = cls(model, data, samples_per_class)
        locator.selected, locator._plan = selected, [sample_order(selected)]
        locator._kept_sums = sums
        return locator

    def __call__(
        self,
        alpha: float | dict | None = None,
        beta: float | dict | None = None,
        progress: Progress | None = None,
    ) -> Components:
        model, data, device = self.model, self.data, self.device
        alpha_d = _per_kind(alpha, DEFAULT_ALPHA, "alpha")
        beta_d = _per_kind(beta, DEFAULT_BETA, "beta")
        report = progress or (lambda f, m: None)
        if self.selected is None:
            self.selected = select_samples(
                model,
                data,
                self.samples_per_class,
                progress=lambda f, m: report(0.5 * f, m),
                device=device,
            )
            self._plan = shard_plan(self.selected, self.shards, model, self.memory_budget)
        plan = self._plan
        masks: dict[int, dict[str, torch.Tensor]] = {}
        for k, (idx, lab) in enumerate(plan):
            part = self._kept_sums
            if part is None:
                part = contribution_sums(
                    model,
                    data,
                    idx,
                    lab,
                    progress=lambda f, m, k=k: report(0.5 + 0.5 * (k + 0.9 * f) / len(plan), m),
                    device=device,
                )
                if len(plan) == 1:
                    self._kept_sums = part
            report(0.5 + 0.5 * (k + 0.9) / len(plan), "locating masks")
            masks.update(masks_from_sums(model, part, part[CLASSES_KEY].tolist(), alpha_d, beta_d))
            del part
        report(1.0, "locating masks")
        components = Components(
            class_names=list(model.class_names),
            layers=[n.layer for n in model.graph.layers()],
            masks=dict(sorted(masks.items())),
            selected=self.selected,
            parameters={
                "samples_per_class": self.samples_per_class,
                "alpha": alpha_d,
                "beta": beta_d,
            },
            dataset={
                "source": str(getattr(data, "source", "")),
                "size": len(data),
                "class_names": list(data.class_names),
            },
        )
        report(1.0, "done")
        return components


def locate(
    model: SourceModel,
    data,
    samples_per_class: int = DEFAULT_SAMPLES_PER_CLASS,
    alpha: float | dict | None = None,
    beta: float | dict | None = None,
    shards: int = 1,
    progress: Progress | None = None,
    device: str | torch.device = "cpu",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> Components:
    """Locates the component of every model class that the dataset has.

    The selected samples are processed in parts of whole classes (`shard_plan`):
    at least `shards` parts, as distributed workers would compute them, and more
    when the contribution sums of all classes would exceed `memory_budget` bytes
    (beyond the model and one batch). Each part's masks are computed and its sums
    dropped before the next. `device` runs the forward passes there (e.g.
    "cuda"); results are on the CPU. Per-class statistics (params, FLOPs) are the
    caller's: `lego_core.evaluate.component_stats`. (`Locator` locates again at
    other thresholds without selecting and, where they fit, summing again.)"""
    locator = Locator(model, data, samples_per_class, shards, device, memory_budget)
    return locator(alpha, beta, progress)
