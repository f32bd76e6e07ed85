"""Locating and disassembly (MDA sections 3-4) on real models and data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lego_core import (
    CIFAR10_SPEC,
    MNIST_SPEC,
    Components,
    ModelFileError,
    UnknownClassError,
    accuracy_on,
    build_model,
    component_stats,
    disassemble,
    load_source_model,
    locate,
    source_from_module,
)

DIGITS = [str(i) for i in range(10)]


def keep_everything(model) -> Components:
    """Components whose masks keep every channel of every layer."""
    masks = {
        c: {
            n.layer: torch.ones(model.graph.node(n.args[0].name).channels, dtype=torch.bool)
            for n in model.graph.layers()
        }
        for c in range(len(model.class_names))
    }
    return Components(
        class_names=model.class_names,
        layers=[n.layer for n in model.graph.layers()],
        masks=masks,
        selected={c: torch.zeros(0, dtype=torch.long) for c in masks},
        parameters={},
    )


class ResidualConcatNet(nn.Module):
    """An architecture the registry does not know: a residual add, a concat,
    a depthwise conv and functional ops."""

    def __init__(self, num_classes: int = 6):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.side = nn.Conv2d(8, 4, 1)
        self.head = nn.Linear(12 * 8 * 8, 32)
        self.out = nn.Linear(32, num_classes)

    def forward(self, x):
        a = F.relu(self.bn(self.stem(x)))
        b = F.relu(self.body(a)) + a
        b = F.relu(self.depthwise(b))
        c = torch.cat([b, self.side(b)], 1)
        c = F.max_pool2d(c, 4)
        return self.out(F.relu(self.head(c.view(c.size(0), -1))))


def _randomise_bn(module: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(5)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return module.eval()


@pytest.mark.parametrize(
    "arch,spec",
    [
        ("lenet", MNIST_SPEC),
        ("plain_cnn", CIFAR10_SPEC),
        ("vgg11_bn", CIFAR10_SPEC),
        ("resnet18", CIFAR10_SPEC),
        ("googlenet", CIFAR10_SPEC),
        ("mobilenet_v2", CIFAR10_SPEC),
    ],
)
def test_full_masks_reproduce_the_source_logits(arch, spec):
    torch.manual_seed(0)
    module = _randomise_bn(build_model(arch, 10, spec))
    model = source_from_module(module, spec, DIGITS, arch)
    classes = [7, 2, 4]
    comp = disassemble(model, keep_everything(model), classes)
    x = torch.randn(3, *spec.shape)
    with torch.no_grad():
        expected = module(x)[:, classes]
        got = comp.net()(x)
    assert comp.class_names == ["7", "2", "4"]
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)


def _check_unknown_architecture(model, module):
    comp = disassemble(model, keep_everything(model), [5, 0])
    x = torch.randn(4, *CIFAR10_SPEC.shape)
    with torch.no_grad():
        assert torch.allclose(comp.net()(x), module(x)[:, [5, 0]], rtol=1e-4, atol=1e-5)
    kinds = {n.kind for n in model.graph.nodes}
    assert {"tie", "cat", "flatten", "conv", "linear", "bn"} <= kinds


def test_unknown_architecture_from_an_exported_program(tmp_path):
    torch.manual_seed(0)
    module = _randomise_bn(ResidualConcatNet())
    program = torch.export.export(module, (torch.randn(2, *CIFAR10_SPEC.shape),))
    path = tmp_path / "net.pt2"
    torch.export.save(program, path)
    names = [f"c{i}" for i in range(6)]
    model = load_source_model(path, "exported", names, CIFAR10_SPEC)
    _check_unknown_architecture(model, module)


def test_unknown_architecture_from_torchscript(tmp_path):
    torch.manual_seed(0)
    module = _randomise_bn(ResidualConcatNet())
    path = tmp_path / "net.ts"
    torch.jit.save(torch.jit.script(module), str(path))
    names = [f"c{i}" for i in range(6)]
    model = load_source_model(path, "torchscript", names, CIFAR10_SPEC)
    _check_unknown_architecture(model, module)


def test_bad_files_and_classes_give_one_line_errors(tmp_path):
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(ModelFileError, match="not a readable torch.export"):
        load_source_model(junk, "exported", ["a", "b"], CIFAR10_SPEC)
    program = torch.export.export(ResidualConcatNet().eval(), (torch.randn(2, 3, 32, 32),))
    path = tmp_path / "net.pt2"
    torch.export.save(program, path)
    with pytest.raises(ModelFileError, match="outputs 6 classes but 2 class names"):
        load_source_model(path, "exported", ["a", "b"], CIFAR10_SPEC)
    with pytest.raises(ModelFileError, match="does not run on inputs"):
        load_source_model(path, "exported", [str(i) for i in range(6)], MNIST_SPEC)
    model = load_source_model(path, "exported", [str(i) for i in range(6)], CIFAR10_SPEC)
    with pytest.raises(UnknownClassError, match="unknown class 'cat'"):
        model.class_indices(["cat"])
    with pytest.raises(UnknownClassError, match="out of range"):
        model.class_indices([6])


@pytest.fixture(scope="module")
def located_lenet(lenet_mnist, mnist_train):
    model = source_from_module(lenet_mnist, MNIST_SPEC, DIGITS, "lenet", "lenet-mnist")
    components = locate(model, mnist_train)
    components.stats = component_stats(model, components)
    return model, components


def _task_images(data, task):
    rows = torch.isin(data.labels, torch.tensor(task))
    return data.subset(torch.nonzero(rows).flatten())


@pytest.mark.parametrize("task,allowed_drop", [([0, 1, 2], 0.0), ([3, 4, 5, 6, 7, 8, 9], 0.5)])
@pytest.mark.parametrize("mean_compensation", [False, True])
def test_component_keeps_base_accuracy_with_fewer_parameters(
    located_lenet, mnist_train, mnist_test, task, allowed_drop, mean_compensation
):
    model, components = located_lenet
    images = _task_images(mnist_test, task)
    base = accuracy_on(model.net(), images, DIGITS, MNIST_SPEC)["accuracy"]
    data = mnist_train if mean_compensation else None
    comp = disassemble(model, components, task, data=data)
    names = [DIGITS[c] for c in task]
    component = accuracy_on(comp.net(), images, names, MNIST_SPEC)["accuracy"]
    assert component >= base - allowed_drop, (task, base, component)
    assert comp.graph.param_count() < model.graph.param_count()


def test_summary_reports_channels_params_and_flops(located_lenet):
    model, components = located_lenet
    summary = components.summary()
    assert set(summary) == set(DIGITS)
    row = summary["0"]
    assert row["samples"] == 50
    assert 0 < row["params"] < model.graph.param_count()
    assert row["flops"] > 0
    for layer, (kept, total) in row["layers"].items():
        assert 0 <= kept <= total, layer
    # the first conv always reads its image channel
    assert row["layers"][components.layers[0]] == [1, 1]


def test_four_shards_give_the_same_masks_as_one_pass(lenet_mnist, mnist_train):
    model = source_from_module(lenet_mnist, MNIST_SPEC, DIGITS, "lenet")
    one = locate(model, mnist_train)
    four = locate(model, mnist_train, shards=4)
    assert one.layers == four.layers
    for c in one.masks:
        for layer in one.layers:
            assert torch.equal(one.masks[c][layer], four.masks[c][layer]), (c, layer)


def test_components_round_trip_through_a_file(located_lenet, tmp_path):
    _, components = located_lenet
    path = tmp_path / "components.pt"
    components.save(path)
    loaded = Components.load(path)
    assert loaded.summary() == components.summary()
    assert not list(tmp_path.glob(".tmp-*"))


def test_stricter_thresholds_give_smaller_components(lenet_mnist, mnist_train):
    model = source_from_module(lenet_mnist, MNIST_SPEC, DIGITS, "lenet")
    loose = locate(model, mnist_train, alpha=0.1, beta=0.1)
    strict = locate(model, mnist_train, alpha=0.6, beta=0.5)
    small = disassemble(model, strict, [0, 1, 2]).graph.param_count()
    large = disassemble(model, loose, [0, 1, 2]).graph.param_count()
    assert small < large


def test_decision_routes_picture_shows_every_layer(located_lenet):
    import xml.etree.ElementTree as ET

    from lego_core import render_routes, route_table

    model, components = located_lenet
    svg = render_routes(model, components, ["0", "1"])
    root = ET.fromstring(svg)
    assert root.tag.endswith("svg")
    text = " ".join(t.text or "" for t in root.iter() if t.tag.endswith("text"))
    for layer in components.layers:
        assert layer in text
    assert "0 only" in text and "1 only" in text and "shared" in text
    table = route_table(model, components, ["0", "1"])
    first_linear = next(r for r in table if r["channels"] == 400)
    assert first_linear["per_class"]["0"] == int(components.masks[0][first_linear["layer"]].sum())
    with pytest.raises(UnknownClassError):
        render_routes(model, components, ["eleven"])


def test_routes_picture_draws_every_channel_with_a_full_legend(located_lenet):
    """No binning: one cell per input channel of every layer (classifier.0 has 400),
    unused channels stay visible, shared and class-specific cells have their own
    colours, and the legend counts add up to every channel."""
    import xml.etree.ElementTree as ET

    from lego_core.routes import PALETTE, SHARED_ALL, UNUSED, render_routes, route_table

    model, components = located_lenet
    svg = render_routes(model, components, ["0", "1"], name="lenet-digits")
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    table = route_table(model, components, ["0", "1"])
    cells = [r for r in root.iter(f"{ns}rect") if r.get("height") == "10"]
    assert len(cells) == sum(r["channels"] for r in table)
    fills = [c.get("fill") for c in cells]
    assert fills.count(UNUSED) == sum(r["unused"] for r in table)
    assert fills.count(SHARED_ALL) == sum(r["shared"] for r in table)
    assert fills.count(PALETTE[0]) == sum(r["only"]["0"] for r in table)
    assert fills.count(PALETTE[1]) == sum(r["only"]["1"] for r in table)
    wide = next(r for r in table if r["channels"] == 400)
    assert wide["unused"] > 0  # the case binning used to hide
    text = [t.text or "" for t in root.iter(f"{ns}text")]
    assert text[0] == "Decision routes of lenet-digits: 0, 1"
    assert root.find(f"{ns}title").text == "Decision routes of lenet-digits: 0, 1"
    legend = " | ".join(text)
    total = sum(r["channels"] for r in table)
    counts = [int(t.rsplit(": ", 1)[1]) for t in text if t.rsplit(": ", 1)[-1].isdigit()]
    assert sum(counts[-4:]) == total  # 0 only, 1 only, shared, unused
    assert "0 only" in legend and "shared by all 2 classes" in legend
    assert "unused by these classes (removed)" in legend
    three = render_routes(model, components, ["0", "1", "2"])
    assert "shared by some of them" in three


def test_program_exported_in_training_mode_classifies_in_eval_mode(tmp_path):
    torch.manual_seed(0)
    module = _randomise_bn(ResidualConcatNet())
    program = torch.export.export(module.train(), (torch.randn(4, *CIFAR10_SPEC.shape),))
    path = tmp_path / "train-mode.pt2"
    torch.export.save(program, path)
    model = load_source_model(path, "exported", [f"c{i}" for i in range(6)], CIFAR10_SPEC)
    x = torch.randn(3, *CIFAR10_SPEC.shape)
    with torch.no_grad():
        assert torch.allclose(model.net()(x), module.eval()(x), rtol=1e-4, atol=1e-5)


def test_mean_compensation_keeps_the_mean_logits_through_affine_layers():
    """Removed channels feed only affine layers (conv -> average pool -> linear), so
    with their mean contribution folded into the biases, the component's mean logits
    over the samples the means came from equal the source's."""
    from lego_core.data import ImageFolderData, normalize

    torch.manual_seed(0)
    spec = MNIST_SPEC
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 3, 3, padding=1, bias=False),  # no bias: the fold must add one
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, 2),
    ).eval()
    model = source_from_module(net, spec, ["a", "b"], "tiny", "tiny")
    images = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8)
    data = ImageFolderData(images, torch.arange(40) % 2, ["a", "b"])
    components = keep_everything(model)
    conv2, linear = [n.layer for n in model.graph.layers()][1:]
    for c in (0, 1):
        components.masks[c][conv2] = torch.tensor([True, False, True, False])
        components.masks[c][linear] = torch.tensor([False, True, True])
        components.selected[c] = torch.arange(c, 40, 2)
    plain = disassemble(model, components, ["a", "b"])
    compensated = disassemble(model, components, ["a", "b"], data=data)
    assert plain.graph.param_count() < model.graph.param_count()
    batch = normalize(images, spec)
    with torch.no_grad():
        source = model.net()(batch).mean(0)
        without = plain.net()(batch).mean(0)
        with_means = compensated.net()(batch).mean(0)
    assert torch.allclose(with_means, source, atol=1e-4), (with_means, source)
    assert not torch.allclose(without, source, atol=1e-2)


@pytest.mark.parametrize(
    "shape, kernel, stride, padding, dilation",
    [
        ((4, 3, 32, 32), 3, 2, 1, 1),
        ((2, 3, 11, 9), 2, 2, 0, 1),
        ((2, 3, 11, 9), 3, 1, 1, 1),
        ((2, 3, 12, 12), 3, 2, 1, 2),
        ((2, 3, 7, 7), 2, None, 0, 1),  # stride defaults to the kernel
        ((2, 3, 9, 9), 1, 2, 0, 1),  # one tap: the result must not be a view of x
        ((2, 3, 5, 6), 3, 3, 1, 1),  # the border taps read inside x for some outputs only
    ],
)
def test_captured_max_pool_values_equal_torch(shape, kernel, stride, padding, dilation):
    from lego_core.graph import max_pool2d_values

    x = torch.randn(shape)
    x[0, 0, 0, :3] = float("nan")  # NaN propagates as in max pooling
    expected = F.max_pool2d(x, kernel, stride, padding, dilation)
    before = x.clone()
    (got,) = max_pool2d_values(
        x, [kernel] * 2, [stride] * 2 if stride else [], [padding] * 2, [dilation] * 2
    )
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got.nan_to_num(), expected.nan_to_num())
    got.fill_(0.0)  # the result is its own tensor: x is unchanged, now and after
    assert torch.equal(x.nan_to_num(), before.nan_to_num())
