"""`make reproduce`: the paper's disassembly, assembly and sensitivity tables,
measured on the shared data with lego_core's own code paths.

    python -m experiments.reproduce            # full run (~35 min on 2 CPU cores)
    python -m experiments.reproduce --quick    # smoke run: 300 images a class, 1 epoch
    python -m experiments.reproduce --report-only   # re-render from the saved JSON

The full run writes docs/RESULTS.md and docs/sensitivity.png; a quick run writes
them under .cache/experiments/quick/ so it never overwrites the committed report.
Trained models and located components are cached under .cache/experiments/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time

import torch

import lego_core
from experiments.common import (
    FULL,
    QUICK,
    ROOT,
    Data,
    ModelPlan,
    Settings,
    Trained,
    log,
    restrict,
    trained,
)
from lego_core import (
    DEFAULT_ALPHA,
    DEFAULT_BETA,
    DEFAULT_SCALING,
    REFERENCE_ALPHA,
    REFERENCE_BETA,
    SCALING_METHODS,
    ImageFolderData,
    Part,
    accuracy_on,
    assemble,
    count_flops,
    disassemble,
    evaluate_assembly,
    full_component,
)
from lego_core.assemble import InputAdapter, LogitMixer
from lego_core.errors import IncompatibleComponentsError
from lego_core.locate import contribution_sums, masks_from_sums, sample_order

ALL = tuple(range(10))
H1, H2 = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)

PLANS = [
    ModelPlan("lenet_mnist", "lenet", "mnist", ALL, seed=0, epochs=2),
    ModelPlan("plain_h1", "plain_cnn", "cifar10", H1, seed=1, epochs=5),
    ModelPlan("plain_h2", "plain_cnn", "cifar10", H2, seed=2, epochs=5),
    ModelPlan("plain_all", "plain_cnn", "cifar10", ALL, seed=0, epochs=5),
    ModelPlan("resnet_h2", "resnet_small", "cifar10", H2, seed=3, epochs=4),
    ModelPlan("resnet_all", "resnet_small", "cifar10", ALL, seed=0, epochs=4),
]

DISASSEMBLY_MODELS = ("lenet_mnist", "plain_all", "resnet_all")
DISASSEMBLY_TASKS = ((0,), (1,), (0, 1, 2), (3, 4, 5, 6, 7, 8, 9))

# (group, [(model key, class indices into the dataset's class list), ...])
ASSEMBLIES = [
    ("a", [("plain_h1", (0, 1, 2)), ("plain_h2", (5, 6, 7))]),
    ("a", [("plain_h1", (0,)), ("plain_h2", (5,))]),
    ("a", [("plain_h1", H1), ("plain_h2", H2)]),
    ("b", [("plain_h1", (0, 1, 2)), ("resnet_h2", (5, 6, 7))]),
    ("b", [("plain_h1", H1), ("resnet_h2", H2)]),
    ("b", [("plain_all", (0, 1, 2)), ("resnet_all", (3, 4, 5, 6, 7, 8, 9))]),
    ("c", [("lenet_mnist", (0, 1, 2)), ("plain_all", (0, 1, 2))]),
    ("c", [("lenet_mnist", ALL), ("plain_all", ALL)]),
    ("c", [("lenet_mnist", ALL), ("resnet_all", ALL)]),
]
# Reported in this order: the reference rule first, then the other methods.
SCALINGS = ("reference", "none", "calibrated", "discriminant")
assert set(SCALINGS) == set(SCALING_METHODS), "a scaling method is missing from the report"


def pct(part: int, whole: int) -> float:
    return round(100.0 * part / whole, 2)


def part_label(plan: ModelPlan, classes) -> str:
    """e.g. 'plain_cnn (CIFAR-10 {0,...,4}) {0,1,2}'."""
    data = "MNIST" if plan.dataset == "mnist" else "CIFAR-10"
    trained_on = data if plan.classes == ALL else f"{data} {task_label(plan.classes)}"
    return f"{plan.arch} ({trained_on}) {task_label(classes)}"


def task_label(classes) -> str:
    classes = list(classes)
    if len(classes) > 3 and classes == list(range(classes[0], classes[-1] + 1)):
        return f"{{{classes[0]},...,{classes[-1]}}}"
    return "{" + ",".join(str(c) for c in classes) + "}"


# --------------------------------------------------------------------------- tables


def source_accuracy(t: Trained, data: Data) -> float:
    test = restrict(data.test(t.plan.dataset), t.model.class_names)
    return accuracy_on(t.model.net(), test, t.model.class_names, t.model.spec)["accuracy"]


class SumsCache:
    """Contribution sums of each model's located samples (computed once), from
    which masks for any alpha/beta follow exactly as `locate` derives them."""

    def __init__(self):
        self._sums = {}
        self.mismatches: dict[str, list[str]] = {}

    def components(self, t: Trained, alpha: dict, beta: dict):
        key = t.plan.key
        if key not in self._sums:
            idx, lab = sample_order(t.components.selected)
            self._sums[key] = contribution_sums(t.model, t.train_data, idx, lab)
            # The default parameters should give back exactly what locate() stored;
            # a difference (e.g. components cached by an older lego_core) is reported.
            check = masks_from_sums(
                t.model, self._sums[key], t.components.located_classes, DEFAULT_ALPHA, DEFAULT_BETA
            )
            self.mismatches[key] = [
                f"class {c} layer {layer}"
                for c, masks in check.items()
                for layer, m in masks.items()
                if not torch.equal(m, t.components.masks[c][layer])
            ]
            if self.mismatches[key]:
                log(f"WARNING {key}: masks from sums differ from locate(): {self.mismatches[key]}")
        masks = masks_from_sums(t.model, self._sums[key], t.components.located_classes, alpha, beta)
        return dataclasses.replace(
            t.components,
            masks=masks,
            parameters={**t.components.parameters, "alpha": alpha, "beta": beta},
            stats={},
        )


def table_disassembly(models: dict[str, Trained], data: Data, sums: SumsCache) -> list[dict]:
    rows = []
    for key in DISASSEMBLY_MODELS:
        t = models[key]
        model, spec = t.model, t.model.spec
        test = data.test(t.plan.dataset)
        total_params, total_flops = model.graph.param_count(), count_flops(model)
        reference = sums.components(t, REFERENCE_ALPHA, REFERENCE_BETA)
        for task in DISASSEMBLY_TASKS:
            names = [model.class_names[c] for c in task]
            sub = restrict(test, names)
            base = accuracy_on(model.net(), sub, model.class_names, spec)["accuracy"]
            whole = full_component(model, task)
            whole_acc = accuracy_on(
                whole.net(), sub, whole.class_names, spec, restrict_to_task=True
            )["accuracy"]
            comp = disassemble(model, t.components, task, data=t.train_data)
            comp_acc = accuracy_on(comp.net(), sub, comp.class_names, spec, restrict_to_task=True)
            ref = disassemble(model, reference, task, data=t.train_data)
            ref_acc = accuracy_on(ref.net(), sub, ref.class_names, spec, restrict_to_task=True)
            rows.append(
                {
                    "model": key,
                    "dataset": t.plan.dataset,
                    "arch": t.plan.arch,
                    "task": task_label(task),
                    "classes": names,
                    "images": comp_acc["images"],
                    "base": round(base, 2),
                    "unpruned_task_argmax": round(whole_acc, 2),
                    "component": round(comp_acc["accuracy"], 2),
                    "change": round(comp_acc["accuracy"] - base, 2),
                    "params": comp.graph.param_count(),
                    "params_kept": pct(comp.graph.param_count(), total_params),
                    "flops": count_flops(comp),
                    "flops_kept": pct(count_flops(comp), total_flops),
                    "component_reference_ab": round(ref_acc["accuracy"], 2),
                    "params_kept_reference_ab": pct(ref.graph.param_count(), total_params),
                    "flops_kept_reference_ab": pct(count_flops(ref), total_flops),
                }
            )
            log(f"table 1: {key} {rows[-1]['task']}: base {base:.2f} -> {comp_acc['accuracy']:.2f}")
    return rows


def _part(t: Trained, classes) -> Part:
    names = [t.model.class_names[t.plan.classes.index(c)] for c in classes]
    return Part(t.model, t.components, names, t.train_data, t.plan.key)


def table_assembly(models: dict[str, Trained], data: Data) -> list[dict]:
    cifar_test = data.test("cifar10")
    rows = []
    for group, spec_parts in ASSEMBLIES:
        parts = [_part(models[k], c) for k, c in spec_parts]
        datasets = (
            [data.mnist_test_rgb32(), cifar_test]
            if any(models[k].plan.dataset == "mnist" for k, _ in spec_parts)
            else [cifar_test]
        )
        label = " + ".join(part_label(models[k].plan, c) for k, c in spec_parts)
        row = {"group": group, "label": label, "parts": [[k, list(c)] for k, c in spec_parts]}
        t0 = time.time()
        merged = merge(datasets)
        default = assemble(parts, scaling=DEFAULT_SCALING)
        metrics = evaluate_assembly(default, datasets)
        row.update(
            base=round(metrics["base_accuracy"], 2),
            images=metrics["images"],
            params=metrics["params"],
            flops=metrics["flops"],
            per_class=metrics["per_class"],
            class_names=default.class_names,
        )
        row[DEFAULT_SCALING] = round(metrics["accuracy"], 2)
        logits = AssemblyLogits(default, merged)
        for scaling in SCALINGS:
            assembled = default if scaling == DEFAULT_SCALING else assemble(parts, scaling=scaling)
            acc = logits.accuracy(assembled)
            if scaling == DEFAULT_SCALING:
                assert abs(acc - metrics["accuracy"]) < 0.02, (acc, metrics["accuracy"])
            row[scaling] = round(acc, 2)
        row["errors"] = logits.decompose(default, [len(p.classes) for p in parts])
        row["task_bases"] = task_bases(parts, merged, default.spec)
        n = sum(b["images"] for b in row["task_bases"])
        row["base_weighted"] = round(
            sum(b["accuracy"] * b["images"] for b in row["task_bases"]) / n, 2
        )
        row["source_params"] = sum(models[k].model.graph.param_count() for k, _ in spec_parts)
        row["source_flops"] = sum(count_flops(models[k].model) for k, _ in spec_parts)
        row["padded"] = padded_cost(parts, default, datasets)
        row["joint_reference"] = joint_reference(models, spec_parts, cifar_test)
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        log(
            f"table 2{group}: {label}: base {row['base']:.2f}, "
            + ", ".join(f"{s} {row[s]:.2f}" for s in SCALINGS)
        )
    return rows


class AssemblyLogits:
    """The components' unscaled logits on the test images, computed once per
    assembly row; every scaling method's assembled model is then scored from them
    (its fitted scale, shift and discriminant applied), after checking on real
    test images that this gives that model's own outputs. The components are the
    same for every scaling (disassembly is deterministic), so this is the
    accuracy `accuracy_on(assembled.module, ...)` would measure, at a quarter of
    the cost."""

    def __init__(self, assembled, merged: ImageFolderData):
        names = assembled.class_names
        target = torch.tensor([names.index(n) if n in names else -1 for n in merged.class_names])
        labels = target[merged.labels]
        keep = labels >= 0
        self.images, self.labels = merged.images[keep], labels[keep]
        branches = self._branches(assembled)
        with torch.no_grad():
            self.raw = torch.cat(
                [
                    torch.cat([b.net(b.adapter(x)) for b in branches], 1)
                    for x in (
                        self.images[i : i + 256].float() / 255.0
                        for i in range(0, len(self.labels), 256)
                    )
                ]
            )

    @staticmethod
    def _branches(assembled):
        module = assembled.module
        inner = module.inner if isinstance(module, LogitMixer) else module
        return list(inner.branches)

    def scores(self, assembled, raw: torch.Tensor) -> torch.Tensor:
        scale = torch.cat([torch.tensor(s["scale"]) for s in assembled.scales])
        shift = torch.cat([torch.tensor(s["shift"]) for s in assembled.scales])
        z = raw * scale + shift
        if assembled.mixer is not None:
            weight, bias = (torch.tensor(t) for t in assembled.mixer)
            z = z @ weight.T + bias
        return z

    @torch.no_grad()
    def accuracy(self, assembled) -> float:
        check = slice(0, len(self.labels), max(1, len(self.labels) // 256))
        own = assembled.module(self.images[check].float() / 255.0)
        mine = self.scores(assembled, self.raw[check])
        if not torch.allclose(own, mine, atol=1e-3, rtol=1e-3):
            raise RuntimeError(f"scores differ from the {assembled.scaling} assembled model")
        pred = self.scores(assembled, self.raw).argmax(1)
        return 100.0 * float((pred == self.labels).float().mean())

    def decompose(self, assembled, sizes: list[int]) -> dict:
        """Splits the assembly's errors: *cross-part*, the image went to a class of
        another part (a decision no single source model was trained to make);
        *within-part accuracy*, the argmax restricted to the true part's own
        classes (what Base measures, through the assembled model)."""
        logits = self.scores(assembled, self.raw)
        part_of = torch.cat([torch.full((n,), k) for k, n in enumerate(sizes)])
        own = part_of[self.labels]
        pred = logits.argmax(1)
        mask = part_of[None, :] == own[:, None]
        within = logits.masked_fill(~mask, float("-inf")).argmax(1)
        return {
            "accuracy": round(100.0 * float((pred == self.labels).float().mean()), 2),
            "cross_part": round(100.0 * float((part_of[pred] != own).float().mean()), 2),
            "within_part_accuracy": round(100.0 * float((within == self.labels).float().mean()), 2),
        }


def task_bases(parts: list[Part], merged: ImageFolderData, raw_spec) -> list[dict]:
    """Each source's Base on its task, measured as evaluate_assembly does (raw test
    images through the InputAdapter of the assembled input), with image counts."""
    out = []
    for p in parts:
        net, adapter = p.model.net(), InputAdapter(raw_spec, p.model.spec)
        sub = restrict(merged, list(p.classes))
        acc = accuracy_on(lambda x, n=net, a=adapter: n(a(x)), sub, p.model.class_names, None)
        out.append(
            {"source": p.source_id, "accuracy": round(acc["accuracy"], 2), "images": acc["images"]}
        )
    return out


def merge(datasets: list[ImageFolderData]) -> ImageFolderData:
    """One dataset of several (same image shape), class names unified."""
    names = [n for d in datasets for n in d.class_names]
    if len(set(names)) != len(names):
        raise ValueError("datasets to merge must have distinct class names")
    offsets, start = [], 0
    for d in datasets:
        offsets.append(start)
        start += len(d.class_names)
    return ImageFolderData(
        torch.cat([d.images for d in datasets]),
        torch.cat([d.labels + o for d, o in zip(datasets, offsets, strict=True)]),
        names,
        "+".join(d.source for d in datasets),
    )


def padded_cost(parts: list[Part], branches, datasets) -> dict | None:
    """Params and FLOPs of the paper's padded (block-diagonal) form, and the
    largest logit difference from the branches form on some test images."""
    try:
        padded = assemble(parts, scaling=DEFAULT_SCALING, form="padded")
    except IncompatibleComponentsError as exc:
        return {"error": str(exc).split(";")[0]}
    x = torch.cat([d.images[:128] for d in datasets]).float() / 255.0
    with torch.no_grad():
        diff = float((padded.module(x) - branches.module(x)).abs().max())
    return {
        "params": padded.params,
        "flops": count_flops(padded.module, padded.spec),
        "max_logit_diff": diff,
    }


def joint_reference(models, spec_parts, cifar_test) -> dict | None:
    """For CIFAR-only rows: one plain_cnn trained on all ten classes, on the same
    test images, argmax over the union's classes: what one jointly trained model
    of this size gets on the assembled task."""
    if any(models[k].plan.dataset != "cifar10" for k, _ in spec_parts):
        return None
    t = models["plain_all"]
    union = [t.model.class_names[c] for _, cs in spec_parts for c in cs]
    sub = restrict(cifar_test, union)
    acc = accuracy_on(t.model.net(), sub, t.model.class_names, t.model.spec, restrict_to_task=True)
    return {"model": "plain_all", "accuracy": round(acc["accuracy"], 2)}


def table_sensitivity(
    models: dict[str, Trained], data: Data, sums: SumsCache, settings: Settings
) -> list[dict]:
    rows = []
    task = (0, 1, 2)
    for key in settings.sensitivity_models:
        t = models[key]
        model, spec = t.model, t.model.spec
        names = [model.class_names[c] for c in task]
        sub = restrict(data.test(t.plan.dataset), names)
        total_params, total_flops = model.graph.param_count(), count_flops(model)
        base = accuracy_on(model.net(), sub, model.class_names, spec)["accuracy"]
        for kind in ("conv", "linear"):
            for a in settings.grid_alpha:
                for b in settings.grid_beta:
                    alpha = {**DEFAULT_ALPHA, kind: a}
                    beta = {**DEFAULT_BETA, kind: b}
                    comp = disassemble(
                        model, sums.components(t, alpha, beta), task, data=t.train_data
                    )
                    acc = accuracy_on(
                        comp.net(), sub, comp.class_names, spec, restrict_to_task=True
                    )["accuracy"]
                    rows.append(
                        {
                            "model": key,
                            "arch": t.plan.arch,
                            "dataset": t.plan.dataset,
                            "kind": kind,
                            "alpha": a,
                            "beta": b,
                            "accuracy": round(acc, 2),
                            "base": round(base, 2),
                            "params": comp.graph.param_count(),
                            "params_kept": pct(comp.graph.param_count(), total_params),
                            "flops_kept": pct(count_flops(comp), total_flops),
                        }
                    )
            log(f"table 3: {key} {kind} grid done")
    return rows


# --------------------------------------------------------------------------- main


def environment() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "cuda": torch.cuda.is_available(),
        "lego_core_defaults": {
            "alpha": DEFAULT_ALPHA,
            "beta": DEFAULT_BETA,
            "scaling": DEFAULT_SCALING,
            "samples_per_class": lego_core.DEFAULT_SAMPLES_PER_CLASS,
        },
    }


def run(settings: Settings) -> dict:
    started = time.time()
    torch.set_num_threads(settings.threads)
    torch.manual_seed(0)
    data = Data(settings)
    timings = {}
    t = time.time()
    models = {plan.key: trained(settings, data, plan) for plan in PLANS}
    timings["train_and_locate"] = round(time.time() - t, 1)
    model_rows = {}
    for key, m in models.items():
        model_rows[key] = {
            **m.meta,
            "test_accuracy": round(source_accuracy(m, data), 2),
            "params": m.model.graph.param_count(),
            "flops": count_flops(m.model),
        }
        log(f"{key}: test accuracy {model_rows[key]['test_accuracy']:.2f}")
    sums = SumsCache()
    t = time.time()
    table1 = table_disassembly(models, data, sums)
    timings["table1"] = round(time.time() - t, 1)
    t = time.time()
    table2 = table_assembly(models, data)
    timings["table2"] = round(time.time() - t, 1)
    t = time.time()
    table3 = table_sensitivity(models, data, sums, settings)
    timings["table3"] = round(time.time() - t, 1)
    timings["total"] = round(time.time() - started, 1)
    return {
        "settings": {
            "mode": settings.tag(),
            "train_per_class": settings.train_per_class,
            "test_per_class": settings.test_per_class,
            "samples_per_class": settings.samples_per_class,
            "grid_alpha": list(settings.grid_alpha),
            "grid_beta": list(settings.grid_beta),
        },
        "environment": environment(),
        "models": model_rows,
        "table1": table1,
        "table2": table2,
        "table3": table3,
        "mask_check_mismatches": sums.mismatches,
        "timings": timings,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run on little data")
    parser.add_argument(
        "--report-only", action="store_true", help="re-render the report from the saved JSON"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared 2-core machine, 2 threads "
        "wait on each other at every op and run 10x slower)",
    )
    args = parser.parse_args(argv)
    settings = dataclasses.replace(QUICK if args.quick else FULL, threads=args.threads)
    results_path = settings.cache / "results.json"
    if args.report_only:
        results = json.loads(results_path.read_text())
    else:
        results = run(settings)
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=1))
    from experiments.report import write_report

    out_dir = settings.cache if settings.quick else ROOT / "docs"
    write_report(results, out_dir / "RESULTS.md", out_dir / "sensitivity.png")
    log(
        f"wrote {out_dir / 'RESULTS.md'} and {out_dir / 'sensitivity.png'} "
        f"(run time {results['timings']['total'] / 60:.1f} min)"
    )


if __name__ == "__main__":
    main()
