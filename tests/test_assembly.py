"""Assembly (MDA sections 5-6) and export of assembled models."""

from __future__ import annotations

import dataclasses
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
        parts.append(Part(model, locate(model, data), task, data, model.name))
    return parts


@pytest.fixture(scope="module")
def six_digits(data_dir):
    return load_image_folder(
        data_dir / "mnist-test.tar.gz", MNIST_SPEC, classes=[*TASKS[0], *TASKS[1]], progress=False
    )


def test_assembly_of_two_lenets_stays_within_two_points_of_base(halves, six_digits):
    bases = []
    for part, task in zip(halves, TASKS, strict=True):
        images = six_digits.subset(
            torch.nonzero(
                torch.isin(
                    six_digits.labels, torch.tensor([six_digits.class_names.index(n) for n in task])
                )
            ).flatten()
        )
        bases.append(accuracy_on(part.model.net(), images, part.model.class_names, MNIST_SPEC))
    base = sum(b["accuracy"] for b in bases) / 2
    assembled = assemble(halves)
    assert assembled.class_names == ["0", "1", "2", "7", "8", "9"]
    acc = accuracy_on(assembled.module, six_digits, assembled.class_names, None)["accuracy"]
    assert acc >= base - 2.0, (acc, base)
    metrics = evaluate_assembly(assembled, [six_digits])
    assert metrics["accuracy"] == pytest.approx(acc)
    assert metrics["base_accuracy"] == pytest.approx(base)


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
                locate(model, data, samples_per_class=8),
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
    rgb_part = Part(rgb, locate(rgb, data, samples_per_class=8), ["dog"], data)
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


def test_padded_equals_branches_with_mean_compensation_in_either_order():
    """Components of bias-free residual convs: mean compensation gives each its own
    new biases, which the padded form must keep per component."""
    parts = []
    for seed in range(2):
        torch.manual_seed(seed)
        module = build_model("resnet_small", 3, CIFAR10_SPEC).eval()
        names = [f"r{seed}c{i}" for i in range(3)]
        model = source_from_module(module, CIFAR10_SPEC, names, "resnet_small", f"r{seed}")
        data = _random_data(names, torch.Generator().manual_seed(seed))
        comps = locate(model, data, samples_per_class=8, alpha=0.5, beta=0.4)
        if seed == 0:  # keeps every channel: no compensation, no new biases
            masks = {
                c: {k: torch.ones_like(m) for k, m in ms.items()} for c, ms in comps.masks.items()
            }
            comps = dataclasses.replace(comps, masks=masks)
        parts.append(Part(model, comps, names[:2], data, model.name))
    x = parts[0].data.images[:16].float() / 255
    for order in (parts, parts[::-1]):
        branches = assemble(order, scaling="none", form="branches")
        padded = assemble(order, scaling="none", form="padded")
        added = [
            any(k.endswith("lego_mean_bias") for k in c.graph.tensors) for c in branches.components
        ]
        assert added == ([False, True] if order is parts else [True, False])
        with torch.no_grad():
            assert torch.allclose(branches(x), padded(x), rtol=1e-4, atol=1e-4)
