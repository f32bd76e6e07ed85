"""Parameter scaling (MDA section 5) and assembly (section 6).

Two forms, same outputs:

- "branches" (default): every component runs as its own sub-network on the
  shared input (each converts the image to its own channels, size and
  normalisation), and their scaled logits are concatenated. Its cost is the sum
  of its components' costs.
- "padded": the paper's single network. At every layer the components'
  filters are concatenated on the output side and zero-padded on the input
  side (block-diagonal weights), so one standard architecture computes all of
  them. It needs components of one architecture and one input spec, and costs
  (sum Q)(sum P) per layer instead of sum QP.

Scaling methods put the components' logits on one scale before they compete
in one argmax:

- "none": logits as they are.
- "reference": the public reference code's rule. For each class, the mean
  winning logit over its calibration samples that the component classifies
  correctly; the class's logit is multiplied by 1 / mean.
- "calibrated": "reference", then one additive offset per class, chosen to
  maximise the assembled model's accuracy on the calibration samples of all
  components (exact 1-D sweeps, a few rounds of coordinate ascent).
- "discriminant" (default): "reference", then a closed-form linear
  discriminant on the concatenated logits (class means and a shrunk shared
  covariance of the calibration samples' logits; score_k = mu_k' S^-1 z -
  mu_k' S^-1 mu_k / 2). Unlike the per-class rules it lets one component's
  logits speak about another's classes, which is what separates a digit that
  a 0-4 model has never seen from its own classes. It is fitted, not trained:
  no gradient step, no component weight changes; it adds a C x C map after
  the concatenated logits.

None of these train a weight of any component: they are set from samples of
the data the components were located on.

Calibration samples of a part are drawn from its locating dataset: the
located (most confident) samples plus up to `calibration_per_class` others per
class, picked with a fixed seed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lego_core.decide import (
    DECISION_FLOPS_SHARE,
    DECISION_RULES,
    DecisionNet,
    feature_taps,
    fit_decision_stage,
    flat_features,
)
from lego_core.disassemble import Component, disassemble
from lego_core.errors import IncompatibleComponentsError, LegoError
from lego_core.graph import GraphNet, LegoGraph, Node, Param
from lego_core.locate import Components
from lego_core.model import SourceModel
from lego_core.spec import InputSpec

SCALING_METHODS = ("gaussian", "discriminant", "calibrated", "reference", "none")
FORMS = ("branches", "padded")
DEFAULT_SCALING = "gaussian"
DECISION_FEATURES = ("all", "penultimate", "logits")
DEFAULT_CALIBRATION_PER_CLASS = 5000
DEFAULT_COMPENSATE = True
DISCRIMINANT_SHRINKAGE = 0.1

Progress = Callable[[float, str], None]


@dataclass
class Part:
    """Classes taken from one source model. `data` is the dataset the
    components were located on, loaded with the model's spec; scaling uses it."""

    model: SourceModel
    components: Components
    classes: list
    data: object | None = None
    source_id: str = ""


class InputAdapter(nn.Module):
    """Raw images in [0, 1] of one spec -> normalised images of another:
    channel conversion (luma weights for RGB -> gray), bilinear resize,
    normalisation."""

    def __init__(self, source: InputSpec, target: InputSpec):
        super().__init__()
        self.convert = None
        if source.channels == 3 and target.channels == 1:
            self.convert = "to_gray"
        elif source.channels == 1 and target.channels == 3:
            self.convert = "to_rgb"
        self.resize = (source.height, source.width) != (target.height, target.width)
        self.size = (target.height, target.width)
        self.register_buffer("mean", torch.tensor(target.mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(target.std).view(1, -1, 1, 1))
        self.register_buffer("luma", torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.convert == "to_gray":
            x = (x * self.luma).sum(1, keepdim=True)
        elif self.convert == "to_rgb":
            x = x.expand(-1, 3, -1, -1)
        if self.resize:
            x = F.interpolate(
                x, size=self.size, mode="bilinear", align_corners=False, antialias=True
            )
        return (x - self.mean) / self.std


def run_tapped(net: GraphNet, modes: tuple[str, ...], x: torch.Tensor):
    """(logits, features [B, D]) of a GraphNet with taps; D = 0 without taps."""
    out = net(x)
    if not net.taps:
        return out, out.new_zeros(out.shape[0], 0)
    logits, taps = out
    return logits, flat_features(taps, modes)


class Branch(nn.Module):
    def __init__(
        self,
        component: Component,
        raw_spec: InputSpec,
        scale: torch.Tensor,
        shift: torch.Tensor,
        taps: tuple[tuple[str, str], ...] = (),
    ):
        super().__init__()
        self.adapter = InputAdapter(raw_spec, component.spec)
        self.net = GraphNet(component.graph, tuple(name for name, _ in taps)).eval()
        self.tap_modes = tuple(mode for _, mode in taps)
        self.register_buffer("scale", scale.float().clone())
        self.register_buffer("shift", shift.float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[0]

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scaled logits, tapped features [B, D]; D = 0 without taps)."""
        logits, feats = run_tapped(self.net, self.tap_modes, self.adapter(x))
        return logits * self.scale + self.shift, feats


class BranchesNet(nn.Module):
    """Independent branches on one raw input; logits concatenated in order."""

    def __init__(self, branches: list[Branch]):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([b(x) for b in self.branches], 1)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outs = [b.features(x) for b in self.branches]
        return torch.cat([o[0] for o in outs], 1), torch.cat([o[1] for o in outs], 1)


class LogitMixer(nn.Module):
    """A fixed linear map on the assembled logits (the discriminant method)."""

    def __init__(self, inner: nn.Module, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.register_buffer("weight", weight.float().clone())
        self.register_buffer("bias", bias.float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.inner(x), self.weight, self.bias)


class PaddedNet(nn.Module):
    """One block-diagonal network (the paper's form) behind one adapter."""

    def __init__(
        self,
        graph: LegoGraph,
        raw_spec: InputSpec,
        spec: InputSpec,
        taps: tuple[tuple[str, str], ...] = (),
    ):
        super().__init__()
        self.adapter = InputAdapter(raw_spec, spec)
        self.net = GraphNet(graph, tuple(name for name, _ in taps)).eval()
        self.tap_modes = tuple(mode for _, mode in taps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[0]

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return run_tapped(self.net, self.tap_modes, self.adapter(x))


@dataclass
class AssembledModel:
    """A classifier for `class_names` taking raw images in [0, 1] of `spec`
    (the spec's mean 0 / std 1 say: normalisation happens inside)."""

    module: nn.Module
    class_names: list[str]
    lineage: list[dict]
    spec: InputSpec
    form: str
    scaling: str
    components: list[Component] = field(default_factory=list)
    scales: list[dict] = field(default_factory=list)
    sources: list[tuple[SourceModel, list[int]]] = field(default_factory=list)
    mixer: list | None = None  # [weight, bias] of the discriminant map, if any
    decision: dict | None = None  # the decision stage's size and fit, if any
    compensated: bool = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    @property
    def params(self) -> int:
        stage = (self.decision or {}).get("params", 0)
        if self.form == "branches":
            return sum(c.graph.param_count() for c in self.components) + stage
        return self.body.net.graph.param_count() + stage

    @property
    def body(self) -> nn.Module:
        """The components (BranchesNet or PaddedNet) without the stage after them."""
        if isinstance(self.module, LogitMixer):
            return self.module.inner
        if isinstance(self.module, DecisionNet):
            return self.module.body
        return self.module


def raw_spec_for(specs: list[InputSpec]) -> InputSpec:
    """The assembled model's input: the largest size and channel count of its
    parts, values in [0, 1]."""
    c = max(s.channels for s in specs)
    return InputSpec(
        c, max(s.height for s in specs), max(s.width for s in specs), (0.0,) * c, (1.0,) * c
    )


def to_raw(images: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """uint8 images of some spec -> float [0, 1] images of `spec` (channels and size)."""
    x = images.float() / 255.0
    if x.shape[1] == 1 and spec.channels == 3:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 3 and spec.channels == 1:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    if tuple(x.shape[2:]) != (spec.height, spec.width):
        x = F.interpolate(
            x, size=(spec.height, spec.width), mode="bilinear", align_corners=False, antialias=True
        )
    return x


# ---------------------------------------------------------------------------
# Calibration data and scaling


def calibration_indices(part: Part, component: Component, per_class: int, seed: int = 0):
    """Rows of the part's dataset used to calibrate, and their positions in the
    component's output (0..len(classes)-1)."""
    data = part.data
    name_to_pos = {n: i for i, n in enumerate(component.class_names)}
    labels = torch.tensor([name_to_pos.get(n, -1) for n in data.class_names])[data.labels]
    g = torch.Generator().manual_seed(seed)
    rows, pos = [], []
    for k, c in enumerate(component.class_indices):
        chosen = component.selected.get(k, torch.zeros(0, dtype=torch.long))
        members = torch.nonzero(labels == k).flatten()
        extra = members[torch.randperm(members.numel(), generator=g)]
        extra = extra[~torch.isin(extra, chosen)][:per_class]
        idx = torch.cat([chosen, extra])
        if idx.numel() == 0:
            raise LegoError(f"no calibration samples for class {part.model.class_names[c]}")
        rows.append(idx)
        pos.append(torch.full((idx.numel(),), k, dtype=torch.long))
    return torch.cat(rows), torch.cat(pos)


def reference_scales(logits: torch.Tensor, labels: torch.Tensor, n: int) -> torch.Tensor:
    """1 / mean winning logit per class over correctly classified samples."""
    scale = torch.ones(n)
    pred = logits.argmax(1)
    for k in range(n):
        ok = (labels == k) & (pred == k)
        if bool(ok.any()):
            mean = float(logits[ok, k].mean())
            if mean > 0:
                scale[k] = 1.0 / mean
    return scale


def calibrate_offsets(logits: torch.Tensor, labels: torch.Tensor, rounds: int = 4) -> torch.Tensor:
    """One additive offset per output class maximising the accuracy of the
    joint argmax on the calibration pool (coordinate ascent; each step is an
    exact 1-D sweep). `logits`: [N, C] scaled logits of all components."""
    n, c = logits.shape
    offsets = torch.zeros(c, dtype=logits.dtype)
    rows = torch.arange(n)
    for _ in range(rounds):
        changed = False
        for j in range(c):
            z = logits + offsets
            true = z[rows, labels]
            others = z.clone()
            others[rows, labels] = float("-inf")
            others[:, j] = float("-inf")
            rival = others.max(1).values  # strongest wrong class other than j
            zj = logits[:, j]
            own = labels == j
            # own sample: correct iff zj + b > rival; other sample: iff true > rival
            # (independent of b) and zj + b < true.
            lo = torch.where(own, rival - zj, torch.full_like(zj, float("-inf")))
            hi = torch.where(own, torch.full_like(zj, float("inf")), true - zj)
            relevant = own | (true > rival)
            b = _best_point(lo[relevant], hi[relevant], float(offsets[j]))
            changed |= b != float(offsets[j])
            offsets[j] = b
        if not changed:
            break
    return offsets


def _best_point(lo: torch.Tensor, hi: torch.Tensor, current: float) -> float:
    """The b inside the most open intervals (lo, hi); among equally good
    candidates (midpoints between interval ends), the one closest to `current`."""
    ends = torch.cat([lo, hi])
    ends = torch.unique(ends[torch.isfinite(ends)])
    if ends.numel() == 0:
        return current
    candidates = torch.cat([ends[:1] - 1.0, (ends[1:] + ends[:-1]) / 2, ends[-1:] + 1.0])
    inside = (lo[:, None] < candidates[None, :]) & (candidates[None, :] < hi[:, None])
    counts = inside.sum(0)
    best = counts == counts.max()
    distance = torch.where(
        best, (candidates - current).abs(), torch.full_like(candidates, float("inf"))
    )
    return float(candidates[distance.argmin()])


# ---------------------------------------------------------------------------


def build_components(
    parts: list[Part], compensate: bool = True, device: str | torch.device = "cpu"
) -> list[Component]:
    comps = []
    for p in parts:
        data = p.data if compensate else None
        comp = disassemble(p.model, p.components, p.classes, data=data, device=device)
        comp.source = p.source_id or p.model.name
        comps.append(comp)
    names = [n for c in comps for n in c.class_names]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise IncompatibleComponentsError(
            f"class name(s) {dupes} are requested from more than one model; "
            "an assembled model needs distinct class names"
        )
    return comps


def sample_pool(parts, comps, raw_spec: InputSpec, rows_of, method: str):
    """Raw images from every part's dataset (`rows_of(part, component)` gives
    rows and output positions) and their labels in the assembled order."""
    missing = [p.source_id or p.model.name for p in parts if p.data is None]
    if missing:
        raise LegoError(f"scaling '{method}' needs the locating dataset of {missing}")
    xs, ys, offset = [], [], 0
    for p, c in zip(parts, comps, strict=True):
        rows, pos = rows_of(p, c)
        xs.append(to_raw(p.data.images[rows], raw_spec))
        ys.append(pos + offset)
        offset += len(c.class_names)
    return torch.cat(xs), torch.cat(ys)


@torch.no_grad()
def compute_scales(
    parts: list[Part],
    comps: list[Component],
    raw_spec: InputSpec,
    method: str,
    per_class: int,
    device: str | torch.device = "cpu",
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    # "gaussian": the decision stage standardises every feature, logits included,
    # so a per-class scale would change nothing there.
    if method in ("none", "gaussian"):
        ones = [(torch.ones(len(c.class_names)), torch.zeros(len(c.class_names))) for c in comps]
        return ones, None
    x, y = sample_pool(
        parts, comps, raw_spec, lambda p, c: calibration_indices(p, c, per_class), method
    )
    raw_logits = []
    for c in comps:
        branch = Branch(
            c, raw_spec, torch.ones(len(c.class_names)), torch.zeros(len(c.class_names))
        ).to(device)
        raw_logits.append(
            torch.cat([branch(x[i : i + 256].to(device)).cpu() for i in range(0, x.shape[0], 256)])
        )
    scales, starts = [], 0
    for c, z in zip(comps, raw_logits, strict=True):
        n = len(c.class_names)
        own = (y >= starts) & (y < starts + n)
        scales.append(reference_scales(z[own], y[own] - starts, n))
        starts += n
    shifts = [torch.zeros(len(c.class_names)) for c in comps]
    scaled = torch.cat([z * s for z, s in zip(raw_logits, scales, strict=True)], 1)
    mixer = None
    if method == "calibrated":
        offsets = calibrate_offsets(scaled, y)
        shifts = list(torch.split(offsets, [len(c.class_names) for c in comps]))
    elif method == "discriminant":
        mixer = linear_discriminant(scaled, y)
    return list(zip(scales, shifts, strict=True)), mixer


def linear_discriminant(z: torch.Tensor, labels: torch.Tensor, shrinkage=DISCRIMINANT_SHRINKAGE):
    """Closed-form LDA on logits: returns (W, b) with scores = z @ W.T + b."""
    z = z.double()
    c = z.shape[1]
    mu = torch.stack([z[labels == k].mean(0) for k in range(c)])
    centred = z - mu[labels]
    cov = centred.T @ centred / max(1, z.shape[0] - c)
    ridge = cov.diagonal().mean().clamp(min=1e-12)
    cov = (1 - shrinkage) * cov + shrinkage * ridge * torch.eye(c, dtype=z.dtype)
    weight = mu @ torch.linalg.inv(cov)
    bias = -0.5 * (weight * mu).sum(1)
    return weight.float(), bias.float()


def decision_rows(part: Part, component: Component, per_class: int, seed: int = 0):
    """`per_class` random rows of each of the component's classes in the part's
    dataset (all of them where a class has fewer), and their output positions."""
    data = part.data
    name_to_pos = {n: i for i, n in enumerate(component.class_names)}
    labels = torch.tensor([name_to_pos.get(n, -1) for n in data.class_names])[data.labels]
    g = torch.Generator().manual_seed(seed)
    rows, pos = [], []
    for k in range(len(component.class_names)):
        members = torch.nonzero(labels == k).flatten()
        if members.numel() == 0:
            raise LegoError(
                f"no samples of class {component.class_names[k]} in the locating dataset "
                f"of {part.source_id or part.model.name}"
            )
        members = members[torch.randperm(members.numel(), generator=g)][:per_class]
        rows.append(members)
        pos.append(torch.full((members.numel(),), k, dtype=torch.long))
    return torch.cat(rows), torch.cat(pos)


@torch.no_grad()
def decision_budget(body: nn.Module, sample: torch.Tensor) -> float:
    """The FLOPs a sample that a decision stage over `body` may spend: a share
    (DECISION_FLOPS_SHARE) of the components' own."""
    with FlopCounterMode(display=False) as counter:
        body.features(sample.cpu())
    return DECISION_FLOPS_SHARE * counter.get_total_flops()


@torch.no_grad()
def fit_decision(
    parts: list[Part],
    comps: list[Component],
    body: nn.Module,
    raw_spec: InputSpec,
    per_class: int,
    rule: str,
    unscale: torch.Tensor,
    device: str | torch.device = "cpu",
) -> tuple[DecisionNet, dict]:
    """Runs every component over samples of every part's locating dataset and
    fits the Gaussian discriminant on their concatenated features and logits."""
    x, y = sample_pool(
        parts, comps, raw_spec, lambda p, c: decision_rows(p, c, per_class), "gaussian"
    )
    offset = sum(len(c.class_names) for c in comps)
    logits, feats = [], []
    body.to(device)
    for i in range(0, x.shape[0], 256):
        lg, ft = body.features(x[i : i + 256].to(device))
        logits.append(lg.cpu())
        feats.append(ft.cpu())
    body.cpu()
    z = torch.cat([torch.cat(feats), torch.cat(logits)], 1)
    stage, info = fit_decision_stage(z, y, offset, flops_budget=decision_budget(body, x[:1]))
    sizes = [len(c.class_names) for c in comps]
    params, flops = stage.size()
    info.update(rule=rule, samples=int(y.numel()), params=params, flops=flops)
    return DecisionNet(body, stage, unscale, sizes, rule), info


def assemble(
    parts: list[Part],
    scaling: str = DEFAULT_SCALING,
    form: str = "branches",
    calibration_per_class: int = DEFAULT_CALIBRATION_PER_CLASS,
    compensate: bool = DEFAULT_COMPENSATE,
    progress: Progress | None = None,
    decision_features: str = "all",
    decision_rule: str = DECISION_RULES[0],
    device: str | torch.device = "cpu",
) -> AssembledModel:
    """Builds one classifier for the union of the parts' classes, in order.

    `scaling`: see the module docstring ("gaussian", the default, adds the
    decision stage of lego_core.decide). `compensate`: fold removed channels'
    mean contribution into biases at disassembly (needs each part's dataset).
    `decision_features` ("all" linear-layer inputs, "penultimate" the last
    one's, "logits" none) and `decision_rule` ("factorised" or "joint") shape
    the decision stage. `device`: where the forward passes (mean compensation,
    scaling and decision fits) run; the assembled model is on the CPU."""
    if not parts:
        raise IncompatibleComponentsError("an assembly needs at least one part")
    if scaling not in SCALING_METHODS:
        raise LegoError(f"unknown scaling '{scaling}'; choose one of {', '.join(SCALING_METHODS)}")
    if form not in FORMS:
        raise LegoError(f"unknown form '{form}'; choose one of {', '.join(FORMS)}")
    if decision_features not in DECISION_FEATURES:
        raise LegoError(
            f"unknown decision features '{decision_features}'; "
            f"choose one of {', '.join(DECISION_FEATURES)}"
        )
    if decision_rule not in DECISION_RULES:
        raise LegoError(
            f"unknown decision rule '{decision_rule}'; choose one of {', '.join(DECISION_RULES)}"
        )
    if calibration_per_class < 1:
        raise LegoError("calibration_per_class must be at least 1")
    report = progress or (lambda f, m: None)
    report(0.0, "disassembling")
    comps = build_components(parts, compensate, device)
    raw_spec = raw_spec_for([c.spec for c in comps])
    if form == "padded":
        check_padded(parts, comps)
    report(0.4, "scaling")
    scales, mixer = compute_scales(
        parts, comps, raw_spec, scaling, calibration_per_class, device=device
    )
    report(0.6, "assembling")
    gaussian = scaling == "gaussian"

    def taps_of(graph: LegoGraph) -> tuple[tuple[str, str], ...]:
        if not gaussian or decision_features == "logits":
            return ()
        taps = feature_taps(graph)
        return tuple(taps[:1] if decision_features == "penultimate" else taps)

    if form == "branches":
        module = BranchesNet(
            [
                Branch(c, raw_spec, s, b, taps_of(c.graph))
                for c, (s, b) in zip(comps, scales, strict=True)
            ]
        )
    else:
        graph = merge_padded(comps, scales)
        module = PaddedNet(graph, raw_spec, comps[0].spec, taps_of(graph))
    decision = None
    if mixer is not None:
        module = LogitMixer(module, *mixer)
    elif gaussian:
        report(0.7, "fitting the decision stage")
        unscale = 1.0 / torch.cat([s for s, _ in scales])
        module, decision = fit_decision(
            parts,
            comps,
            module.eval(),
            raw_spec,
            calibration_per_class,
            decision_rule,
            unscale,
            device,
        )
    module.eval()
    lineage = [
        {"source": c.source, "class_index": int(i), "class_name": n, "position": pos}
        for pos, (c, i, n) in enumerate(
            (c, i, n) for c in comps for i, n in zip(c.class_indices, c.class_names, strict=True)
        )
    ]
    report(1.0, "assembled")
    return AssembledModel(
        module=module,
        class_names=[n for c in comps for n in c.class_names],
        lineage=lineage,
        spec=raw_spec,
        form=form,
        scaling=scaling,
        components=comps,
        scales=[{"scale": s.tolist(), "shift": b.tolist()} for s, b in scales],
        mixer=[t.tolist() for t in mixer] if mixer is not None else None,
        sources=[(p.model, c.class_indices) for p, c in zip(parts, comps, strict=True)],
        decision=decision,
        compensated=compensate and all(p.data is not None for p in parts),
    )


# ---------------------------------------------------------------------------
# The padded (block-diagonal) form


# Kinds that merge_padded lays out block-diagonally (a layer norm mixes the
# components' channels, an opaque op is not understood).
_PADDED_KINDS = {
    "input",
    "scalar",
    "conv",
    "linear",
    "bn",
    "pass",
    "getitem",
    "tie",
    "permute",
    "cat",
    "flatten",
}


def check_padded(parts: list[Part], comps: list[Component]) -> None:
    first = parts[0].model
    signature = [(n.name, n.kind, n.target) for n in first.graph.nodes]
    for p, c in zip(parts, comps, strict=True):
        if [(n.name, n.kind, n.target) for n in p.model.graph.nodes] != signature:
            raise IncompatibleComponentsError(
                "the padded form needs components of one architecture; use form 'branches'"
            )
        if p.model.spec != first.spec:
            raise IncompatibleComponentsError(
                "the padded form needs components with one input spec; use form 'branches'"
            )
        if c.graph.output_name != c.graph.nodes[-1].name or any(
            n.kind not in _PADDED_KINDS for n in c.graph.nodes
        ):
            raise IncompatibleComponentsError(
                "the padded form supports conv/linear/batch-norm/add/cat/flatten graphs only; "
                "use form 'branches'"
            )


def merge_padded(comps: list[Component], scales) -> LegoGraph:
    """Block-diagonal merge of components that share one graph structure.

    pos[i][value] are the channel positions of component i inside the merged
    value: new blocks at every conv/linear output, carried through per-channel
    ops, concatenated at cats and expanded at flattens."""
    import dataclasses

    g0 = comps[0].graph
    k = len(comps)
    pos: list[dict[str, torch.Tensor]] = [{} for _ in range(k)]
    width: dict[str, int] = {}
    tensors: dict[str, torch.Tensor] = {}
    nodes: list[Node] = []

    def merged_bias(node: Node, rows: list[torch.Tensor], size: int) -> Node:
        """Each component's own bias at its rows (mean compensation gives every
        component different values, and a bias to layers that had none), zeros
        where a component has none; the node gets a bias argument if needed."""
        own = [c.graph.node(node.name).bias_key() for c in comps]
        if not any(own):
            return node
        b = torch.zeros(size)
        for c, key, r in zip(comps, own, rows, strict=True):
            if key is not None:
                b[r] = c.graph.tensors[key].to(b.dtype)
        key = node.bias_key() or next(key for key in own if key is not None)
        tensors[key] = b
        if node.bias_key() == key:
            return node
        args = list(node.args) + [None] * max(0, 3 - len(node.args))
        args[2] = Param(key)
        return dataclasses.replace(node, args=tuple(args))

    for node in g0.nodes:
        name = node.name
        graphs = [c.graph for c in comps]
        if node.kind == "input":
            for i in range(k):
                pos[i][name] = torch.arange(node.channels)
            width[name] = node.channels
        elif node.kind in ("conv", "linear"):
            src = node.args[0].name
            ws = [g.tensors[node.weight_key()] for g in graphs]
            depthwise = node.kind == "conv" and node.conv_options()[3] > 1
            if depthwise:
                if any(w.shape[1] != 1 for w in ws):
                    raise IncompatibleComponentsError(
                        "grouped convs cannot be padded; use 'branches'"
                    )
                for i in range(k):
                    pos[i][name] = pos[i][src]
                width[name] = width[src]
                merged = torch.zeros(width[name], *ws[0].shape[1:])
                for i, w in enumerate(ws):
                    merged[pos[i][name]] = w
                from lego_core.disassemble import _with_groups

                node = _with_groups(node, width[name])
            else:
                offset = 0
                for i, w in enumerate(ws):
                    pos[i][name] = torch.arange(offset, offset + w.shape[0])
                    offset += w.shape[0]
                width[name] = offset
                merged = torch.zeros(offset, width[src], *ws[0].shape[2:])
                for i, w in enumerate(ws):
                    merged[pos[i][name][:, None], pos[i][src][None, :]] = w
            tensors[node.weight_key()] = merged
            node = merged_bias(node, [pos[i][name] for i in range(k)], width[name])
        elif node.kind in ("bn", "pass", "getitem", "tie", "permute"):
            src = [r for r in node.refs() if r in width][0]
            for i in range(k):
                pos[i][name] = pos[i][src]
            width[name] = width[src]
            if node.kind == "tie":
                a, b = [r for r in node.refs() if r in width][:2]
                if any(not torch.equal(pos[i][a], pos[i][b]) for i in range(k)):
                    raise IncompatibleComponentsError(
                        "residual channels do not line up; use 'branches'"
                    )
            if node.kind == "bn":
                for a in node.args[1:5]:
                    if isinstance(a, Param):
                        t = torch.zeros(width[name])
                        for i, g in enumerate(graphs):
                            t[pos[i][name]] = g.tensors[a.key]
                        tensors[a.key] = t
        elif node.kind == "cat":
            offset = 0
            for i in range(k):
                pos[i][name] = []
            for p in node.args[0]:
                for i in range(k):
                    pos[i][name].append(pos[i][p.name] + offset)
                offset += width[p.name]
            for i in range(k):
                pos[i][name] = torch.cat(pos[i][name])
            width[name] = offset
        elif node.kind == "flatten":
            src = node.args[0].name
            spatial = 1
            for d in comps[0].graph.node(src).shape[1:]:
                spatial *= d
            for i in range(k):
                pos[i][name] = (
                    pos[i][src][:, None] * spatial + torch.arange(spatial)[None]
                ).flatten()
            width[name] = width[src] * spatial
        nodes.append(node)
    out = g0.node(g0.output_name)
    if out.kind not in ("conv", "linear"):
        raise IncompatibleComponentsError("the padded form needs a conv or linear output layer")
    # Fold each component's logit scale and shift into the output layer.
    w, b_key = tensors[out.weight_key()], out.bias_key()
    if b_key is None:
        raise IncompatibleComponentsError("the padded form needs a bias on the output layer")
    for i, (scale, shift) in enumerate(scales):
        rows = pos[i][out.name]
        w[rows] *= scale.view(-1, *([1] * (w.dim() - 1)))
        tensors[b_key][rows] = tensors[b_key][rows] * scale + shift
    return LegoGraph(nodes, tensors, g0.input_name, g0.output_name)


__all__ = [
    "FORMS",
    "SCALING_METHODS",
    "AssembledModel",
    "Part",
    "assemble",
    "InputAdapter",
    "to_raw",
    "Components",
]
