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
import hashlib
import json
import multiprocessing
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

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
    Components,
    ImageFolderData,
    Part,
    accuracy_on,
    assemble,
    count_flops,
    disassemble,
    evaluate_assembly,
    full_component,
)
from lego_core.assemble import (
    DEFAULT_CALIBRATION_PER_CLASS,
    InputAdapter,
    decision_budget,
    decision_rows,
    to_raw,
)
from lego_core.data import normalize
from lego_core.decide import (
    DECISION_RULES,
    combine,
    fit_decision_stage,
    flat_features,
    part_index,
)
from lego_core.errors import IncompatibleComponentsError
from lego_core.files import atomic_write
from lego_core.locate import contribution_sums, masks_from_sums, sample_order

ALL = tuple(range(10))
H1, H2 = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)

PLANS = [
    ModelPlan("lenet_mnist", "lenet", "mnist", ALL, seed=0, epochs=2),
    ModelPlan("lenet_m1", "lenet", "mnist", H1, seed=1, epochs=2),
    ModelPlan("lenet_m2", "lenet", "mnist", H2, seed=2, epochs=2),
    ModelPlan("resnet_m2", "resnet_small", "mnist", H2, seed=3, epochs=1),
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
    ("m", [("lenet_m1", (0, 1, 2)), ("lenet_m2", (7, 8, 9))]),
    ("m", [("lenet_m1", H1), ("lenet_m2", H2)]),
    ("m", [("lenet_m1", (0, 1, 2)), ("resnet_m2", (7, 8, 9))]),
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
SCALINGS = ("reference", "none", "calibrated", "discriminant", "gaussian")
assert set(SCALINGS) == set(SCALING_METHODS), "a scaling method is missing from the report"
# The logit-only methods keep the calibration pool they were measured with before the
# decision stage existed (the located samples plus 100 more a class).
LOGIT_CALIBRATION_PER_CLASS = 100
# Decision-stage ablation: which features, how many samples a class, which rule.
ABLATION_FEATURES = ("logits", "penultimate", "all")
ABLATION_SAMPLES = (10, 50, 200, 1000, DEFAULT_CALIBRATION_PER_CLASS)
JOINT_MODELS = {"cifar10": "plain_all", "mnist": "lenet_mnist"}


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


def keep_all(t: Trained) -> Components:
    """The source model's components with every mask all ones: disassembly then
    keeps the whole model and only restricts its logits (what pruning costs)."""
    masks = {
        c: {k: torch.ones_like(m) for k, m in ms.items()} for c, ms in t.components.masks.items()
    }
    return dataclasses.replace(t.components, masks=masks, stats={})


def test_sets(models: dict[str, Trained], data: Data, spec_parts) -> list[ImageFolderData]:
    kinds = {models[k].plan.dataset for k, _ in spec_parts}
    if kinds == {"mnist"}:
        return [data.test("mnist")]
    if kinds == {"cifar10"}:
        return [data.test("cifar10")]
    return [data.mnist_test_rgb32(), data.test("cifar10")]


def code_fingerprint() -> str:
    """A hash of the code that measures a row (lego_core, and the experiments
    modules a row runs; not the report or other commands): a saved row is reused
    only by the same code."""
    digest = hashlib.sha256()
    mine = [ROOT / "experiments" / name for name in ("common.py", "reproduce.py")]
    for path in sorted([*ROOT.glob("lego_core/*.py"), *mine]):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def table_assembly(
    models: dict[str, Trained], data: Data, settings: Settings, jobs: int = 1
) -> list[dict]:
    """Table 2, one row per ASSEMBLIES entry; with `jobs` > 1 the rows run in
    that many forked processes (each single-threaded), in the same order. Each
    finished row is saved under the cache (keyed by the code's fingerprint), so
    a run that stops (a worker killed for memory raises, it does not hang) keeps
    its rows, and a re-run with the same code measures only the missing ones."""
    saved = settings.cache / "table2" / code_fingerprint()
    saved.mkdir(parents=True, exist_ok=True)
    rows: dict[int, dict] = {}
    for i in range(len(ASSEMBLIES)):
        if (saved / f"{i}.json").exists():
            rows[i] = json.loads((saved / f"{i}.json").read_text())
            log(f"table 2: row {i} from {saved / f'{i}.json'}")
    missing = [i for i in range(len(ASSEMBLIES)) if i not in rows]

    def keep(i: int, row: dict) -> None:
        rows[i] = row
        atomic_write(saved / f"{i}.json", lambda f: json.dump(row, f), mode="w")

    if jobs <= 1:
        for i in missing:
            keep(i, assembly_row(models, data, *ASSEMBLIES[i]))
    else:
        global _FORKED
        _FORKED = (models, data)
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(jobs, mp_context=context) as pool:
            futures = {pool.submit(_forked_assembly_row, i): i for i in missing}
            for done in as_completed(futures):
                keep(futures[done], done.result())
    return [rows[i] for i in range(len(ASSEMBLIES))]


_FORKED: tuple | None = None  # (models, data), inherited by table 2's forked workers


def _forked_assembly_row(index: int) -> dict:
    torch.set_num_threads(1)
    models, data = _FORKED
    return assembly_row(models, data, *ASSEMBLIES[index])


def assembly_row(models: dict[str, Trained], data: Data, group: str, spec_parts) -> dict:
    parts = [_part(models[k], c) for k, c in spec_parts]
    sizes = [len(p.classes) for p in parts]
    datasets = test_sets(models, data, spec_parts)
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
        decision=default.decision,
    )
    study = DecisionStudy(parts, default, merged)
    row[DEFAULT_SCALING] = round(metrics["accuracy"], 2)
    assert abs(study.accuracy(default) - metrics["accuracy"]) < 0.02
    for scaling in SCALINGS:
        if scaling == DEFAULT_SCALING:
            continue
        assembled = assemble(
            parts, scaling=scaling, calibration_per_class=LOGIT_CALIBRATION_PER_CLASS
        )
        row[scaling] = round(study.accuracy(assembled), 2)
        if scaling == "discriminant":
            row["errors_discriminant"] = study.decompose(study.outputs(assembled), sizes)
    row["errors"] = study.decompose(study.outputs(default), sizes)
    row["ablation"] = study.ablation()
    row["decision_flops_share"] = pct(default.decision["flops"], metrics["flops"])
    uncompensated = assemble(parts, scaling=DEFAULT_SCALING, compensate=False)
    row["uncompensated"] = study.decompose(study.outputs(uncompensated), sizes)
    full = [
        Part(p.model, keep_all(models[k]), p.classes, p.data, p.source_id)
        for p, (k, _) in zip(parts, spec_parts, strict=True)
    ]
    whole = assemble(full, scaling=DEFAULT_SCALING)
    row["full_sources"] = study.decompose(study.outputs(whole), sizes)
    row["full_sources"]["flops"] = count_flops(whole.module, whole.spec)
    row["task_bases"] = task_bases(parts, merged, default.spec)
    n = sum(b["images"] for b in row["task_bases"])
    row["base_weighted"] = round(sum(b["accuracy"] * b["images"] for b in row["task_bases"]) / n, 2)
    row["source_params"] = sum(models[k].model.graph.param_count() for k, _ in spec_parts)
    row["source_flops"] = sum(count_flops(models[k].model) for k, _ in spec_parts)
    row["padded"] = padded_cost(parts, default, datasets)
    row["joint_reference"] = joint_reference(models, spec_parts, datasets)
    row["seconds"] = round(time.time() - t0, 1)
    log(
        f"table 2{group}: {label}: base {row['base']:.2f}, "
        + ", ".join(f"{s} {row[s]:.2f}" for s in SCALINGS)
        + f"; cross-part {row['errors_discriminant']['cross_part']:.2f} -> "
        f"{row['errors']['cross_part']:.2f}; {row['seconds']:.0f} s"
    )
    return row


def decompose(logits: torch.Tensor, labels: torch.Tensor, sizes: list[int]) -> dict:
    """Splits an assembly's errors: *cross-part*, the image went to a class of
    another part (a decision no single source model was trained to make);
    *within-part accuracy*, the argmax restricted to the true part's own classes
    (what Base measures, through the assembled model)."""
    part_of = part_index(sizes)
    own = part_of[labels]
    pred = logits.argmax(1)
    mask = part_of[None, :] == own[:, None]
    within = logits.masked_fill(~mask, float("-inf")).argmax(1)
    return {
        "accuracy": round(100.0 * float((pred == labels).float().mean()), 2),
        "cross_part": round(100.0 * float((part_of[pred] != own).float().mean()), 2),
        "within_part_accuracy": round(100.0 * float((within == labels).float().mean()), 2),
    }


class DecisionStudy:
    """The default assembly's components run once over the test images and over
    the decision stage's calibration pool (every part's samples, the largest
    count of the ablation), keeping their logits and tapped features. Every
    logit-scaling method and every decision-stage variant is then scored from
    these, after checking on real test images that this gives the assembled
    model's own outputs; the components are the same for all of them
    (disassembly is deterministic)."""

    def __init__(self, parts: list[Part], assembled, merged: ImageFolderData):
        names = assembled.class_names
        target = torch.tensor([names.index(n) if n in names else -1 for n in merged.class_names])
        labels = target[merged.labels]
        keep = labels >= 0
        self.images, self.labels = merged.images[keep], labels[keep]
        self.sizes = [len(c.class_names) for c in assembled.components]
        body = assembled.body
        self.test_logits, self.test_feats = self._run(
            body, (x.float() / 255.0 for x in self._chunks(self.images))
        )
        xs, ys, ranks, offset = [], [], [], 0
        for p, c in zip(parts, assembled.components, strict=True):
            rows, pos = decision_rows(p, c, max(ABLATION_SAMPLES))
            xs.append(to_raw(p.data.images[rows], assembled.spec))
            ys.append(pos + offset)
            ranks.append(torch.cat([torch.arange(int((pos == k).sum())) for k in pos.unique()]))
            offset += len(c.class_names)
        self.cal_y, self.cal_rank = torch.cat(ys), torch.cat(ranks)
        self.cal_logits, self.cal_feats = self._run(body, self._chunks(torch.cat(xs)))
        self.columns = self._columns(body)
        self.budget = decision_budget(body, xs[0][:1])

    @staticmethod
    def _chunks(x: torch.Tensor):
        return (x[i : i + 256] for i in range(0, x.shape[0], 256))

    @staticmethod
    @torch.no_grad()
    def _run(body, batches):
        logits, feats = [], []
        for x in batches:
            lg, ft = body.features(x)
            logits.append(lg)
            feats.append(ft)
        return torch.cat(logits), torch.cat(feats)

    def _columns(self, body) -> dict[str, torch.Tensor]:
        """Columns of [features, logits] that each ablation variant reads."""
        widths = []
        with torch.no_grad():
            for branch in body.branches:
                x = torch.zeros(1, *self.images.shape[1:])
                out = branch.net(branch.adapter(x))
                taps = out[1] if branch.net.taps else []
                modes = branch.tap_modes
                widths.append(
                    [flat_features([t], [m]).shape[1] for t, m in zip(taps, modes, strict=True)]
                )
        total = sum(sum(w) for w in widths)
        logits = torch.arange(total, total + sum(self.sizes))
        penultimate, start = [], 0
        for w in widths:
            if w:  # the first tap is the last linear layer's input
                penultimate.append(torch.arange(start, start + w[0]))
            start += sum(w)
        return {
            "logits": logits,
            "penultimate": torch.cat([*penultimate, logits]),
            "all": torch.arange(total + sum(self.sizes)),
        }

    def variant(self, features: str, per_class: int, rule: str, rank: int | None = None) -> dict:
        """`rank`: the stage's second-order rank (None: chosen as assemble does)."""
        cols = self.columns[features]
        rows = self.cal_rank < per_class
        z = torch.cat([self.cal_feats, self.cal_logits], 1)[rows][:, cols]
        stage, info = fit_decision_stage(
            z, self.cal_y[rows], sum(self.sizes), rank=rank, flops_budget=self.budget
        )
        zt = torch.cat([self.test_feats, self.test_logits], 1)[:, cols]
        with torch.no_grad():
            out = combine(stage(zt), self.test_logits, self.sizes, rule)
        return {
            "features": features,
            "per_class": per_class,
            "rule": rule,
            "rank": info["quadratic_rank"],
            "linear_only": rank == 0,
            "inputs": int(cols.numel()),
            **decompose(out, self.labels, self.sizes),
        }

    def ablation(self) -> list[dict]:
        out = [
            self.variant(f, DEFAULT_CALIBRATION_PER_CLASS, DECISION_RULES[0])
            for f in ABLATION_FEATURES
        ]
        out += [self.variant("all", k, DECISION_RULES[0]) for k in ABLATION_SAMPLES[:-1]]
        out += [self.variant("all", DEFAULT_CALIBRATION_PER_CLASS, r) for r in DECISION_RULES[1:]]
        out.append(self.variant("all", DEFAULT_CALIBRATION_PER_CLASS, DECISION_RULES[0], rank=0))
        return out

    @torch.no_grad()
    def outputs(self, assembled) -> torch.Tensor:
        """The assembled model's outputs on every test image: from the cached
        component logits where the components are the default's (logit-scaling
        methods), else by running it."""
        if assembled.scaling in ("gaussian",) or not assembled.compensated:
            return torch.cat(
                [assembled.module(x.float() / 255.0) for x in self._chunks(self.images)]
            )
        scale = torch.cat([torch.tensor(s["scale"]) for s in assembled.scales])
        shift = torch.cat([torch.tensor(s["shift"]) for s in assembled.scales])
        z = self.test_logits * scale + shift
        if assembled.mixer is not None:
            weight, bias = (torch.tensor(t) for t in assembled.mixer)
            z = z @ weight.T + bias
        check = slice(0, len(self.labels), max(1, len(self.labels) // 256))
        own = assembled.module(self.images[check].float() / 255.0)
        if not torch.allclose(own, z[check], atol=1e-3, rtol=1e-3):
            raise RuntimeError(f"scores differ from the {assembled.scaling} assembled model")
        return z

    def accuracy(self, assembled) -> float:
        pred = self.outputs(assembled).argmax(1)
        return 100.0 * float((pred == self.labels).float().mean())

    def decompose(self, logits: torch.Tensor, sizes: list[int]) -> dict:
        return decompose(logits, self.labels, sizes)


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


@torch.no_grad()
def joint_split(model, data: ImageFolderData, union: list[str], sizes: list[int]) -> dict:
    """A jointly trained `model` on `data`'s images of `union` (names in part
    order, parts of `sizes` classes), argmax over the union's classes: accuracy,
    cross-part errors and within-part accuracy, as `decompose` splits an
    assembly's."""
    sub = restrict(data, union)  # label i is union[i]
    columns = torch.tensor([model.class_names.index(n) for n in union])
    net = model.net()
    logits = torch.cat(
        [
            net(normalize(sub.images[i : i + 500], model.spec))[:, columns]
            for i in range(0, len(sub), 500)
        ]
    )
    return decompose(logits, sub.labels, sizes) | {"images": len(sub)}


def joint_reference(models, spec_parts, datasets) -> dict | None:
    """For rows from one dataset: the model trained on all ten classes of it
    (plain_cnn on CIFAR-10, LeNet on MNIST), on the same test images, argmax
    over the union's classes: what one jointly trained model gets on the
    assembled task, with its errors split as the assembly's are."""
    kinds = {models[k].plan.dataset for k, _ in spec_parts}
    if len(kinds) != 1:
        return None
    t = models[JOINT_MODELS[kinds.pop()]]
    union = [t.model.class_names[c] for _, cs in spec_parts for c in cs]
    split = joint_split(t.model, datasets[0], union, [len(cs) for _, cs in spec_parts])
    return {"model": t.plan.key, **split}


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
    table2 = table_assembly(models, data, settings, settings.jobs)
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
            "logit_calibration": LOGIT_CALIBRATION_PER_CLASS,
            "decision_calibration": DEFAULT_CALIBRATION_PER_CLASS,
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
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="processes for table 2's rows (default 1; 2 on an otherwise idle 2-core machine)",
    )
    args = parser.parse_args(argv)
    settings = dataclasses.replace(
        QUICK if args.quick else FULL, threads=args.threads, jobs=args.jobs
    )
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
