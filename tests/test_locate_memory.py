"""Memory-bounded locating: per-class sums of x+ / x- for linear layers, classes in
blocks that fit a budget, and masks equal to the dense per-sample oracle."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from lego_core import CIFAR10_SPEC, ImageFolderData, locate, source_from_module
from lego_core.contributions import conv_contributions, linear_contributions
from lego_core.locate import (
    DEFAULT_ALPHA,
    DEFAULT_BETA,
    class_bytes,
    contribution_sums,
    masks_from_sums,
    sample_order,
    select_samples,
    shard_plan,
)

CLASSES = [f"c{i}" for i in range(7)]


class Mixed(nn.Module):
    """Plain, grouped and depthwise convs, plain and grouped 1x1 convs (one strided,
    on signed inputs), a 3x3 conv on a 1x1 map (only its centre tap reads the
    input) gating the channels, a residual add, and two linear layers, the second
    on signed inputs (no ReLU in between)."""

    def __init__(self, classes: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.down = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.pointwise = nn.Conv2d(12, 12, 1, groups=3)
        self.project = nn.Conv2d(12, 16, 1, stride=2)
        self.gate = nn.Conv2d(16, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 4 * 4, 20)
        self.fc2 = nn.Linear(20, classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.depthwise(torch.relu(self.grouped(x))))
        x = torch.relu(self.down(x))
        x = torch.relu(self.project(self.pointwise(x)))
        x = x * torch.sigmoid(self.gate(nn.functional.adaptive_avg_pool2d(x, 1)))
        x = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return self.fc2(self.fc1(x))


@pytest.fixture(scope="module")
def mixed():
    torch.manual_seed(0)
    model = source_from_module(Mixed(len(CLASSES)).eval(), CIFAR10_SPEC, CLASSES, "mixed")
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (140, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.arange(140) % len(CLASSES)
    return model, ImageFolderData(images, labels, list(CLASSES), "random")


def dense_oracle(model, data, selected) -> dict[str, torch.Tensor]:
    """The dense form: per sample clamped contributions [Q, P / groups] of every
    layer, summed per class in float64, {layer: [classes, Q, P / groups]}."""
    from lego_core.data import normalize

    idx, lab = sample_order(selected)
    sums: dict[str, torch.Tensor] = {}

    def hook(node, x):
        w = model.graph.tensors[node.weight_key()]
        if node.kind == "linear":
            per = linear_contributions(x, w)
        else:
            per = conv_contributions(x, w, *node.conv_options())
        part = torch.zeros(len(CLASSES), *per.shape[1:], dtype=torch.float64)
        part.index_add_(0, lab, per.double())
        sums[node.layer] = sums[node.layer] + part if node.layer in sums else part

    net = model.net()
    net.hook = hook
    with torch.no_grad():
        net(normalize(data.images[idx], model.spec))
    return sums


def test_masks_equal_the_dense_oracle_whatever_the_budget(mixed):
    model, data = mixed
    one = locate(model, data, samples_per_class=12)
    oracle = masks_from_sums(
        model,
        dense_oracle(model, data, one.selected),
        one.located_classes,
        DEFAULT_ALPHA,
        DEFAULT_BETA,
    )
    blocks = locate(model, data, samples_per_class=12, memory_budget=1)  # one class a block
    shards = locate(model, data, samples_per_class=12, shards=3)
    assert one.located_classes == list(range(len(CLASSES)))
    for c in one.located_classes:
        for layer in one.layers:
            expected = oracle[c][layer]
            assert torch.equal(one.masks[c][layer], expected), (c, layer)
            assert torch.equal(blocks.masks[c][layer], expected), (c, layer)
            assert torch.equal(shards.masks[c][layer], expected), (c, layer)
    # not trivially all-kept or all-dropped
    kept = [float(m.float().mean()) for m in one.masks[0].values()]
    assert 0 < min(kept) < 1


def test_shards_hold_whole_classes_within_the_budget(mixed):
    model, data = mixed
    selected = select_samples(model, data, 12)
    per_class = class_bytes(model)
    plan = shard_plan(selected, 1, model, memory_budget=3 * per_class)
    assert sorted(len(set(lab.tolist())) for _, lab in plan) == [2, 2, 3]
    classes = [c for _, lab in plan for c in sorted(set(lab.tolist()))]
    assert classes == sorted(selected)  # each class in exactly one shard
    assert len(shard_plan(selected, 1, model)) == 1  # the default budget holds them all


def test_shard_sums_are_small_and_load_with_weights_only(mixed):
    model, data = mixed
    selected = select_samples(model, data, 12)
    idx, lab = shard_plan(selected, 2, model)[1]
    sums = contribution_sums(model, data, idx, lab)
    classes = sums["#classes"].tolist()
    assert classes == sorted(set(lab.tolist()))
    assert sums["fc1#pos"].shape == (len(classes), 16 * 16)  # [classes, P], not [C, Q, P]
    assert sums["pointwise#neg"].shape == (len(classes), 12)  # 1x1 convs too
    assert sums["gate#pos"].shape == (len(classes), 16)  # and convs read through one tap
    assert not {"fc1", "pointwise", "project", "gate"} & set(sums)
    assert "depthwise" not in sums  # nor depthwise convs' sums
    assert sums["down"].shape == (len(classes), 12, 8)  # larger kernels: [C, Q, P]
    buf = io.BytesIO()
    torch.save(sums, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=True)
    assert masks_from_sums(model, back, classes, DEFAULT_ALPHA, DEFAULT_BETA).keys() == set(classes)
