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


def test_convnext_prunes_its_mlp_channels_and_keeps_layer_norm_inputs_whole():
    """A linear layer over a channels-last map is a 1x1 conv: its outputs can be
    pruned. A layer norm's inputs cannot (its statistics span every channel), and
    what a component reports keeping is what its weights hold."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    from lego_core import Components, disassemble
    from lego_core.disassemble import fixed_inputs_warning
    from lego_core.evaluate import single_class_stats

    torch.manual_seed(0)
    module = ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=10)
    model = source_from_module(module.eval(), CIFAR10_SPEC, NAMES, "convnext")
    norms = [n.kind for n in model.graph.nodes if n.target is torch.ops.aten.layer_norm.default]
    assert norms and set(norms) == {"norm"}
    hidden = [n for n in model.graph.layers() if n.kind == "linear" and len(n.shape) == 3]
    assert len(hidden) == 4  # two per block
    # Masks that drop half of every layer's inputs.
    masks = {
        c: {
            n.layer: torch.arange(model.graph.node(n.args[0].name).channels) % 2 == 0
            for n in model.graph.layers()
        }
        for c in range(10)
    }
    comps = Components(NAMES, [n.layer for n in model.graph.layers()], masks, {}, {})
    comp = disassemble(model, comps, [3])
    stats = single_class_stats(comp)
    for node in comp.graph.layers():
        w = comp.graph.tensors[node.weight_key()]
        groups = node.conv_options()[3] if node.kind == "conv" else 1
        assert stats["layers"][node.layer][0] == w.shape[1] * groups
    first_mlp, second_mlp = hidden[0], hidden[1]
    # The MLP's hidden channels are pruned; its input (a layer norm's output) is whole.
    assert stats["layers"][second_mlp.layer] == [32, 64]
    assert stats["layers"][first_mlp.layer] == [16, 16]
    assert stats["params"] < model.graph.param_count()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.net()(x), module(x), atol=1e-5)
    # The residual stream feeds every block's layer norm: kept whole, and said so.
    assert "layer norms" in fixed_inputs_warning(model)


def test_shufflenet_is_warned_about_channels_that_cannot_be_pruned():
    from lego_core.disassemble import fixed_inputs_warning

    torch.manual_seed(0)
    model = source_from_module(
        tvm.shufflenet_v2_x0_5(num_classes=10).eval(), CIFAR10_SPEC, NAMES, "shufflenet"
    )
    warning = fixed_inputs_warning(model)
    assert warning is not None and "cannot be pruned" in warning
