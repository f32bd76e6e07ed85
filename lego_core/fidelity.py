"""Located components checked against their source, and thresholds relaxed where
MDA's defaults cut too deep.

MDA's thresholds (alpha, beta) trade a component's size against how much of its
source's decisions it keeps. The defaults suit plain and residual CNNs, but on some
architectures (MobileNet V2's linear bottlenecks, EfficientNet) they remove channels
whose loss takes a component to chance even on the images it was located from. So
after locating, components of a few class sets are built (mean-compensated, as an
assembly builds them) and scored on their classes' located images, argmax over
their classes, against the source on the same images. A set fails when its
component keeps less than half of what its source has above chance there. When a
set fails and the caller left the thresholds at their defaults, the components are
located again with looser thresholds, step by step (`RELAX_STEPS`), until every
set passes. The report is kept in `Components.parameters["check"]`.
"""

from __future__ import annotations

import torch

from lego_core.disassemble import disassemble, input_means_and_logits
from lego_core.evaluate import predict_labels
from lego_core.locate import (
    CONTRIBUTION_BATCH,
    DEFAULT_ALPHA,
    DEFAULT_BETA,
    Components,
    Locator,
    Progress,
    _per_kind,
)
from lego_core.model import SourceModel

# (alpha factor, beta factor) on the defaults, tried in order: beta first (it
# decides how many inputs the relevant outputs pull in), then alpha (at a layer
# whose output mask is one class's logit only alpha decides, e.g. the classifier).
RELAX_STEPS = ((1.0, 1.0), (1.0, 0.5), (1.0, 0.0), (0.5, 0.0), (0.0, 0.0))
CHECK_SETS = 8  # class sets scored per check
SET_SIZE = 3
# A source this close to chance on its own located images has no decisions to keep.
MIN_SOURCE_MARGIN = 0.2


def check_sets(
    classes: list[int], count: int = CHECK_SETS, size: int = SET_SIZE
) -> list[list[int]]:
    """Disjoint class sets of `size` (the last takes any remainder) from a fixed
    shuffle of `classes`, at most `count` of them; none for fewer than two classes."""
    if len(classes) < 2:
        return []
    order = torch.randperm(len(classes), generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = [classes[i] for i in order]
    sets = [shuffled[i : i + size] for i in range(0, len(shuffled), size)]
    if len(sets) > 1 and len(sets[-1]) < 2:
        last = sets.pop()
        sets[-1] = sets[-1] + last
    return sets[:count]


def keeps_decisions(source: float, component: float, classes: int) -> bool:
    """Whether a component keeps at least half of what its source has above chance
    (always, for a source within MIN_SOURCE_MARGIN of chance)."""
    chance = 1.0 / classes
    if source - chance < MIN_SOURCE_MARGIN:
        return True
    return component >= chance + 0.5 * (source - chance)


@torch.no_grad()
def set_fidelity(
    model: SourceModel,
    components: Components,
    data,
    classes: list[int],
    device="cpu",
    source_side: dict | None = None,
) -> dict:
    """The source's and the (mean-compensated) component's accuracy on the located
    images of `classes`, argmax over those classes. `source_side` caches what does
    not depend on the thresholds (the source's predictions and the input means) for
    the next call with the same selected samples."""
    rows = torch.cat([components.selected[c] for c in classes])
    labels = torch.cat(
        [torch.full((components.selected[c].numel(),), i) for i, c in enumerate(classes)]
    )

    cached = (source_side or {}).get(tuple(classes))
    if cached is None:  # one pass of the source gives both
        means, logits = input_means_and_logits(model, data, rows, device=device)
        cached = {"source": logits[:, classes].argmax(1), "means": means}
        if source_side is not None:
            source_side[tuple(classes)] = cached
    comp = disassemble(model, components, classes, device=device, means=cached["means"])
    net = comp.net().to(device)
    predicted = predict_labels(  # in batches, as locate runs its forward passes
        lambda x: net(x.to(device)).cpu(),
        data.images[rows],
        model.spec,
        batch_size=CONTRIBUTION_BATCH,
    )
    s = float((cached["source"] == labels).float().mean())
    c = float((predicted == labels).float().mean())
    return {
        "classes": [model.class_names[k] for k in classes],
        "source": round(s, 4),
        "component": round(c, 4),
        "kept": keeps_decisions(s, c, len(classes)),
        "params": round(comp.graph.param_count() / max(1, model.graph.param_count()), 4),
    }


def check_components(
    model: SourceModel,
    components: Components,
    data,
    device="cpu",
    progress: Progress | None = None,
    source_side: dict | None = None,
) -> list[dict]:
    """`set_fidelity` of every set of `check_sets(located classes)`."""
    sets = check_sets(components.located_classes)
    out = []
    for i, classes in enumerate(sets):
        out.append(set_fidelity(model, components, data, classes, device, source_side))
        if progress:
            progress((i + 1) / len(sets), "checking components")
    return out


def locate_checked(
    model: SourceModel,
    data,
    alpha: float | dict | None = None,
    beta: float | dict | None = None,
    progress: Progress | None = None,
    device: str | torch.device = "cpu",
    locator: Locator | None = None,
    **locate_options,
) -> Components:
    """`locate`, then `check_components`. With the default thresholds (alpha and
    beta None), a failed check locates again with the next of `RELAX_STEPS` until
    the check passes; the last step keeps every input whose contribution is
    positive. If no step passes, the step whose worst set scored highest is kept.
    Thresholds given by the caller are used as given and only reported on.

    The steps go through one `locator` (by default `Locator(model, data, device=device,
    **locate_options)`, with `locate`'s samples_per_class, shards, memory_budget), so
    a relaxed step selects nothing again and, where the sums are kept, is one mask
    pass; the service passes its sharded Locator."""
    report = progress or (lambda f, m: None)
    relax = alpha is None and beta is None
    steps = RELAX_STEPS if relax else ((1.0, 1.0),)
    base_alpha = _per_kind(alpha, DEFAULT_ALPHA, "alpha")
    base_beta = _per_kind(beta, DEFAULT_BETA, "beta")

    locator = locator or Locator(model, data, device=device, **locate_options)
    source_side: dict = {}

    # Progress: the first locate to 0.8, its check to 0.85; later steps share the rest.
    def band(k: int) -> tuple[float, float, float]:
        if k == 0:
            return 0.0, 0.8, 0.85
        width = 0.15 / (len(steps) - 1)
        lo = 0.85 + width * (k - 1)
        return lo, lo + 0.8 * width, lo + width

    best, best_worst = None, float("-inf")
    for k, (fa, fb) in enumerate(steps):
        a = {kind: round(v * fa, 6) for kind, v in base_alpha.items()}
        b = {kind: round(v * fb, 6) for kind, v in base_beta.items()}
        lo, mid, hi = band(k)
        if k:
            report(lo, f"components lost their source's decisions: beta {b}, alpha {a}")
        comps = locator(a, b, lambda f, m, lo=lo, mid=mid: report(lo + (mid - lo) * f, m))
        sets = check_components(
            model,
            comps,
            data,
            device,
            lambda f, m, mid=mid, hi=hi: report(mid + (hi - mid) * f, m),
            source_side,  # the steps share the locator's selected samples
        )
        worst = min((s["component"] - s["source"] for s in sets), default=0.0)
        passed = all(s["kept"] for s in sets)
        comps.parameters["check"] = {
            "passed": passed,
            "relaxed": k,
            "sets": sets,
        }
        if passed:
            best = comps
            break
        if worst > best_worst:
            best, best_worst = comps, worst
    report(1.0, "done")
    return best


def check_warning(components: Components) -> str | None:
    """A sentence for the user when located components lost their source's decisions,
    or when the thresholds had to be relaxed to keep them; else None."""
    check = (components.parameters or {}).get("check")
    if not check:
        return None
    failed = [s for s in check["sets"] if not s["kept"]]
    if failed:
        s = failed[0]
        return (
            f"components do not keep their source's decisions: classes {', '.join(s['classes'])} "
            f"score {s['component']:.2f} against the source's {s['source']:.2f} on their located "
            f"images; assemblies with parts of this model may fall toward chance"
        )
    if check["relaxed"]:
        p = components.parameters
        shares = [s["params"] for s in check["sets"]]
        return (
            f"the default thresholds cut too deep for this model; located with alpha "
            f"{p['alpha']} and beta {p['beta']} so that components keep their source's "
            f"decisions (the checked ones keep {100 * min(shares):.0f}-{100 * max(shares):.0f}% "
            f"of its parameters)"
        )
    return None
