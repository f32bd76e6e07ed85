"""Capture of torchvision models in the forms users bring them: programs exported
with a fixed batch, traced TorchScript, converter failures, parameter counts."""

from __future__ import annotations

import pytest
import torch
import torchvision.models as tvm

from lego_core import CIFAR10_SPEC, ModelFileError, load_source_model, source_from_module

NAMES = [str(i) for i in range(10)]


def tiny_vit():
    torch.manual_seed(0)
    return tvm.VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
        num_classes=10,
    ).eval()


def save_fixed_batch(module, path, batch):
    torch.export.save(torch.export.export(module, (torch.randn(batch, 3, 32, 32),)), path)


@pytest.mark.parametrize("batch", [1, 3])
def test_fixed_batch_channel_shuffle_runs_at_any_batch(tmp_path, batch):
    torch.manual_seed(0)
    module = tvm.shufflenet_v2_x0_5(num_classes=10).eval()
    path = tmp_path / "shufflenet.pt2"
    save_fixed_batch(module, path, batch)
    model = load_source_model(path, "exported", NAMES, CIFAR10_SPEC)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.net()(x), module(x), atol=1e-5)


def test_fixed_batch_attention_is_refused_with_advice(tmp_path):
    path = tmp_path / "vit.pt2"
    save_fixed_batch(tiny_vit(), path, 2)
    with pytest.raises(ModelFileError, match=r"fixed batch size of 2.*dynamic_shapes"):
        load_source_model(path, "exported", NAMES, CIFAR10_SPEC)


def test_traced_vit_torchscript_is_captured(tmp_path):
    module = tiny_vit()
    path = tmp_path / "vit.ts"
    traced = torch.jit.trace(module, torch.randn(2, 3, 32, 32), check_trace=False)
    traced.save(str(path))
    model = load_source_model(path, "torchscript", NAMES, CIFAR10_SPEC)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.net()(x), module(x), atol=1e-5)


def test_unconvertible_torchscript_gets_the_whole_message_and_what_to_do(tmp_path):
    path = tmp_path / "vit.ts"
    torch.jit.script(tiny_vit()).save(str(path))  # scripted: torch's converter gives up
    with pytest.raises(ModelFileError) as info:
        load_source_model(path, "torchscript", NAMES, CIFAR10_SPEC)
    text = str(info.value)
    assert "torch._export.converter" in text
    assert "torch.export.export(" in text and "'exported' format" in text
    assert "\n" not in text


def test_param_count_counts_every_parameter_and_buffer():
    vit = tiny_vit()
    model = source_from_module(vit, CIFAR10_SPEC, NAMES, "vit")
    assert model.graph.param_count() == sum(p.numel() for p in vit.parameters())
    torch.manual_seed(0)
    resnet = tvm.resnet18(num_classes=10).eval()
    model = source_from_module(resnet, CIFAR10_SPEC, NAMES, "resnet18")
    total = sum(p.numel() for p in resnet.parameters())
    stats = sum(b.numel() for n, b in resnet.named_buffers() if "running" in n)
    assert total + stats <= model.graph.param_count()
