"""Evaluation (MDA section 7): accuracy by the paper's protocol, params, FLOPs.

- Base accuracy of a source model on a class set T: test images of T, argmax
  over all of the model's classes.
- Component accuracy on T: test images of T, argmax over T's logits only.
- Assembled accuracy: test images of the union of all tasks, argmax over all
  assembled logits; compared with Base = mean of the sources' base accuracy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lego_core.assemble import InputAdapter
from lego_core.data import ImageFolderData, normalize
from lego_core.disassemble import disassemble
from lego_core.errors import DatasetError
from lego_core.spec import InputSpec


def count_flops(model, spec: InputSpec | None = None) -> int:
    """FLOPs of one forward pass on a single image (torch.utils.flop_counter;
    a multiply-add counts as two)."""
    if spec is None:
        spec = model.spec
    module = model if isinstance(model, nn.Module) else model.net()
    x = torch.zeros(1, *spec.shape)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    return int(counter.get_total_flops())


def component_stats(model, components, progress=None) -> dict[int, dict]:
    """Params, FLOPs and kept input channels of every located class's single-class
    component, as {class: single_class_stats} (what `Components.stats` holds)."""
    classes = components.located_classes
    stats = {}
    for i, c in enumerate(classes):
        stats[c] = single_class_stats(disassemble(model, components, [c]))
        if progress:
            progress((i + 1) / len(classes), "measuring components")
    return stats


def single_class_stats(comp) -> dict:
    """What a component really holds: params, FLOPs, and per layer the input
    channels kept ("layers", [kept, total]; this replaces the masks' counts in
    `Components.summary`, since channels that cannot be pruned stay)."""
    return {
        "params": comp.graph.param_count(),
        "flops": count_flops(comp),
        "layers": {k: list(v) for k, v in comp.kept_inputs.items()},
    }


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def predict_labels(
    forward: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    spec: InputSpec | None,
    restrict: list[int] | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Argmax predictions of `forward` over uint8 images. With `spec` the
    images are normalised by it, else passed as floats in [0, 1]. `restrict`
    limits the argmax to those logits (returned as indices into `restrict`)."""
    preds = []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start : start + batch_size]
        x = normalize(batch, spec) if spec is not None else batch.float() / 255.0
        logits = forward(x)
        if restrict is not None:
            logits = logits[:, restrict]
        preds.append(logits.argmax(1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def accuracy_on(
    forward, data, class_names: list[str], spec: InputSpec | None, restrict_to_task: bool = False
) -> dict:
    """Accuracy of a classifier whose outputs are `class_names` on the images of
    `data` whose class is one of them (matched by name). Returns overall and
    per-class accuracy (in percent) and the number of images used."""
    target = torch.full((len(data.class_names),), -1, dtype=torch.long)
    for i, name in enumerate(data.class_names):
        if name in class_names:
            target[i] = class_names.index(name)
    labels = target[data.labels]
    keep = labels >= 0
    if not bool(keep.any()):
        raise DatasetError(f"the evaluation data has none of the classes {class_names[:10]}")
    labels = labels[keep]
    task = sorted(set(labels.tolist())) if restrict_to_task else None
    preds = predict_labels(forward, data.images[keep], spec, restrict=task)
    if task is not None:
        preds = torch.tensor(task)[preds]
    correct = preds == labels
    per_class = {
        class_names[c]: round(100.0 * float(correct[labels == c].float().mean()), 2)
        for c in sorted(set(labels.tolist()))
    }
    return {
        "accuracy": 100.0 * float(correct.float().mean()),
        "per_class": per_class,
        "images": int(labels.numel()),
    }


def _merge(datasets):
    """Concatenates datasets of one image shape, unifying class names."""
    if len(datasets) == 1:
        return datasets[0]
    names: list[str] = []
    for d in datasets:
        names += [n for n in d.class_names if n not in names]
    images = torch.cat([d.images for d in datasets])
    labels = torch.cat(
        [torch.tensor([names.index(n) for n in d.class_names])[d.labels] for d in datasets]
    )
    return ImageFolderData(images, labels, names, "+".join(d.source for d in datasets))


@torch.no_grad()
def evaluate_assembly(assembled, datasets: list) -> dict:
    """Assembled accuracy and Base (MDA section 7) on test datasets loaded with
    the assembled model's spec (raw images, classes matched by name)."""
    if not datasets:
        raise DatasetError("no evaluation dataset was given")
    shapes = {tuple(d.images.shape[1:]) for d in datasets}
    if shapes != {assembled.spec.shape}:
        raise DatasetError(
            f"evaluation images must be {assembled.spec.shape}, got {sorted(shapes)}"
        )
    data = _merge(datasets)
    result = accuracy_on(assembled.module, data, assembled.class_names, None)
    bases = []
    for model, classes in assembled.sources:
        adapter = InputAdapter(assembled.spec, model.spec)
        net = model.net()
        task_names = [model.class_names[c] for c in classes]
        present = [n for n in task_names if n in data.class_names]
        if not present:
            continue
        rows = torch.isin(data.labels, torch.tensor([data.class_names.index(n) for n in present]))
        sub = data.subset(torch.nonzero(rows).flatten())
        bases.append(
            accuracy_on(lambda x, net=net, a=adapter: net(a(x)), sub, model.class_names, None)
        )
    return {
        "accuracy": round(result["accuracy"], 4),
        "base_accuracy": round(sum(b["accuracy"] for b in bases) / len(bases), 4)
        if bases
        else None,
        "per_class": result["per_class"],
        "images": result["images"],
        "params": assembled.params,
        "flops": count_flops(assembled.module, assembled.spec),
        "decision": getattr(assembled, "decision", None),
    }
