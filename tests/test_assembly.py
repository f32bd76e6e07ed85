"""Assembly (MDA sections 5-6) and export of assembled models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lego_core import (
    CIFAR10_SPEC,
    MNIST_SPEC,
    IncompatibleComponentsError,
    Part,
    accuracy_on,
    assemble,
    build_model,
    count_flops,
    evaluate_assembly,
    export_model,
    load_exported,
    load_image_folder,
    locate,
    source_from_module,
)

TASKS = (["0", "1", "2"], ["7", "8", "9"])


@pytest.fixture(scope="module")
def halves(lenet_halves):
    """(parts, base accuracies' inputs) for {0,1,2} of the 0-4 LeNet and
    {7,8,9} of the 5-9 LeNet."""
    parts = []
    for (module, data), task in zip(lenet_halves, TASKS, strict=True):
        model = source_from_module(
            module, MNIST_SPEC, data.class_names, "lenet", f"lenet-{task[0]}"
        )
        parts.append(Part(model, locate(model, data, with_stats=False), task, data, model.name))
    return parts


@pytest.fixture(scope="module")
def six_digits(data_dir):
    return load_image_folder(
        data_dir / "mnist-test.tar.gz", MNIST_SPEC, classes=[*TASKS[0], *TASKS[1]], progress=False
    )


def base_of(parts, test) -> float:
    """Mean of the sources' accuracy on their own task's test images (MDA 7)."""
    bases = []
    for part in parts:
        rows = torch.isin(
            test.labels, torch.tensor([test.class_names.index(n) for n in part.classes])
        )
        images = test.subset(torch.nonzero(rows).flatten())
        bases.append(accuracy_on(part.model.net(), images, part.model.class_names, MNIST_SPEC))
    return sum(b["accuracy"] for b in bases) / len(bases)


def test_assembly_of_two_lenets_stays_within_one_point_of_base(halves, six_digits):
    base = base_of(halves, six_digits)
    assembled = assemble(halves)
    assert assembled.class_names == ["0", "1", "2", "7", "8", "9"]
    assert assembled.scaling == "gaussian" and assembled.decision["rule"] == "joint"
    acc = accuracy_on(assembled.module, six_digits, assembled.class_names, None)["accuracy"]
    assert acc >= base - 1.0, (acc, base)
    metrics = evaluate_assembly(assembled, [six_digits])
    assert metrics["accuracy"] == pytest.approx(acc)
    assert metrics["base_accuracy"] == pytest.approx(base)
    # The decision stage is a small map on features the components compute anyway.
    assert metrics["decision"]["flops"] < 0.05 * metrics["flops"]


def test_decision_stage_beats_logit_only_discriminant(halves, six_digits):
    """Features of every component, fitted on both parts' data, separate the parts
    better than the components' logits alone."""

    def cross_part(assembled):
        with torch.no_grad():
            pred = assembled.module(six_digits.images.float() / 255).argmax(1)
        part = torch.tensor([0, 0, 0, 1, 1, 1])
        return float((part[pred] != part[six_digits.labels]).float().mean())

    staged = assemble(halves)
    logits_only = assemble(halves, scaling="discriminant")
    assert cross_part(staged) < cross_part(logits_only)


def test_mean_compensation_is_an_option(halves):
    on = assemble(halves, scaling="reference", compensate=True)
    off = assemble(halves, scaling="reference", compensate=False)
    assert on.compensated and not off.compensated
    for a, b in zip(on.components, off.components, strict=True):
        assert [n.name for n in a.graph.layers()] == [n.name for n in b.graph.layers()]
        # the same channels are kept; only the biases differ
        assert a.graph.param_count() >= b.graph.param_count()
        assert any(
            not torch.equal(a.graph.tensors[k], b.graph.tensors[k])
            for k in b.graph.tensors
            if k in a.graph.tensors
        )


def test_lineage_names_the_source_of_every_output(halves):
    assembled = assemble(halves, scaling="none")
    assert [(e["source"], e["class_name"], e["class_index"]) for e in assembled.lineage] == [
        ("lenet-0", "0", 0),
        ("lenet-0", "1", 1),
        ("lenet-0", "2", 2),
        ("lenet-7", "7", 2),
        ("lenet-7", "8", 3),
        ("lenet-7", "9", 4),
    ]


@pytest.mark.parametrize("scaling", ["none", "reference", "calibrated", "discriminant"])
def test_padded_form_outputs_equal_branches_form(halves, six_digits, scaling):
    branches = assemble(halves, scaling=scaling, form="branches")
    padded = assemble(halves, scaling=scaling, form="padded")
    x = six_digits.images[:64].float() / 255
    with torch.no_grad():
        assert torch.allclose(branches(x), padded(x), rtol=1e-4, atol=1e-4)
    # the padded form computes the zero blocks too
    assert count_flops(padded.module, padded.spec) > count_flops(branches.module, branches.spec)


def test_branches_cost_is_the_sum_of_the_components():
    """Three components of one architecture (random weights, as FLOPs do not
    depend on them)."""
    parts = []
    for seed in range(3):
        torch.manual_seed(seed)
        module = build_model("plain_cnn", 4, CIFAR10_SPEC).eval()
        names = [f"m{seed}c{i}" for i in range(4)]
        model = source_from_module(module, CIFAR10_SPEC, names, "plain_cnn", f"m{seed}")
        g = torch.Generator().manual_seed(seed)
        data = _random_data(names, g)
        parts.append(
            Part(
                model,
                locate(model, data, samples_per_class=8, with_stats=False),
                names[:2],
                data,
                model.name,
            )
        )
    assembled = assemble(parts, scaling="none")
    total = count_flops(assembled.module, assembled.spec)
    summed = sum(count_flops(c) for c in assembled.components)
    assert abs(total - summed) <= 0.01 * summed
    assert assembled.params == sum(c.graph.param_count() for c in assembled.components)


def _random_data(names, g):
    from lego_core import ImageFolderData

    images = torch.randint(0, 256, (16 * len(names), 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.arange(len(names)).repeat_interleave(16)
    return ImageFolderData(images, labels, list(names), "random")


def test_assembly_across_architectures_and_input_specs(halves):
    """A LeNet on 28x28 gray with a CNN on 32x32 RGB: branches adapt the input."""
    torch.manual_seed(0)
    names = ["cat", "dog", "ship"]
    module = build_model("plain_cnn", 3, CIFAR10_SPEC).eval()
    rgb = source_from_module(module, CIFAR10_SPEC, names, "plain_cnn", "rgb")
    data = _random_data(names, torch.Generator().manual_seed(1))
    rgb_part = Part(rgb, locate(rgb, data, samples_per_class=8, with_stats=False), ["dog"], data)
    assembled = assemble([halves[0], rgb_part], scaling="reference")
    assert assembled.spec.shape == (3, 32, 32)
    assert assembled.class_names == ["0", "1", "2", "dog"]
    with torch.no_grad():
        assert assembled(torch.rand(2, 3, 32, 32)).shape == (2, 4)
    with pytest.raises(IncompatibleComponentsError, match="one architecture"):
        assemble([halves[0], rgb_part], scaling="none", form="padded")


def test_duplicate_class_names_are_refused(halves):
    with pytest.raises(IncompatibleComponentsError, match="distinct class names"):
        assemble([halves[0], halves[0]], scaling="none")


def test_exported_model_predicts_the_same_in_a_bare_process(halves, six_digits, tmp_path):
    assembled = assemble(halves)
    path = tmp_path / "assembled.pt"
    meta = export_model(assembled, path)
    assert meta["class_names"] == assembled.class_names
    x = six_digits.images[::97][:32].float() / 255
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = assembled(x).argmax(1)
    loaded = load_exported(path)
    assert torch.equal(loaded(x).argmax(1), expected)

    script = textwrap.dedent(
        """
        import sys
        # The venv has the project installed (editable); make it unimportable so
        # nothing of it can take part in loading.
        for name in ("lego_core", "app", "worker"):
            sys.modules[name] = None
        import json, torch
        try:
            import lego_core  # noqa: F401
            raise SystemExit("lego_core is importable")
        except ImportError:
            pass
        extra = {"lego.json": ""}
        with open(sys.argv[1], "rb") as f:
            program = torch.export.load(f, extra_files=extra)
        meta = json.loads(extra["lego.json"])
        x = torch.load(sys.argv[2], weights_only=True)
        pred = program.module()(x).argmax(1).tolist()
        print(json.dumps({"pred": pred, "classes": meta["class_names"],
                          "spec": meta["input_spec"]}))
        """
    )
    bare = tmp_path / "bare"
    bare.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = ""
    out = subprocess.run(
        [sys.executable, "-I", "-c", script, str(path), str(tmp_path / "x.pt")],
        cwd=bare,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["pred"] == expected.tolist()
    assert result["classes"] == ["0", "1", "2", "7", "8", "9"]
    assert result["spec"]["channels"] == 1 and result["spec"]["height"] == 28


class ResidualConcatNet(torch.nn.Module):
    """An architecture lego_core has no builder for: a residual add and a
    channel concatenation, global pooling and one linear layer."""

    def __init__(self, num_classes: int):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.pool = nn.MaxPool2d(2)
        self.left = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(16, 8, 1), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(32 * 4, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.b(self.a(x)))
        x = self.pool(x)
        x = torch.cat([self.left(x), self.right(x)], 1)
        x = torch.nn.functional.adaptive_avg_pool2d(x, 2)
        return self.head(torch.flatten(x, 1))


@pytest.fixture(scope="module")
def unseen_architecture_halves(data_dir):
    from lego_core.train import train

    parts = []
    for digits, task, seed in ((range(5), TASKS[0], 1), (range(5, 10), TASKS[1], 2)):
        data = load_image_folder(
            data_dir / "mnist-train.tar.gz",
            MNIST_SPEC,
            classes=[str(d) for d in digits],
            progress=False,
        )
        # 12,000 images of the half, one epoch: enough for ~98% and quick on 2 cores.
        keep = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:12000]
        data = data.subset(torch.sort(keep).values)
        torch.manual_seed(seed)
        module = train(ResidualConcatNet(5), data, MNIST_SPEC, epochs=1, seed=seed, progress=False)
        model = source_from_module(module, MNIST_SPEC, data.class_names, "rescat", f"rc-{task[0]}")
        parts.append(Part(model, locate(model, data, with_stats=False), task, data, model.name))
    return parts


def test_two_part_mnist_assembly_of_an_unseen_architecture(unseen_architecture_halves, six_digits):
    base = base_of(unseen_architecture_halves, six_digits)
    assert base > 90
    assembled = assemble(unseen_architecture_halves)
    acc = accuracy_on(assembled.module, six_digits, assembled.class_names, None)["accuracy"]
    assert acc >= base - 1.0, (acc, base)
