"""lego_core.architectures: every model builds, runs, exports and round-trips its weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lego_core.architectures import ARCHITECTURES, build_model, load_state_dict_file
from lego_core.errors import LegoError, ModelFileError
from lego_core.spec import CIFAR10_SPEC, IMAGENET_SPEC, MNIST_SPEC

MNIST_ARCHS = ("lenet", "plain_cnn", "resnet18", "mobilenet_v2", "googlenet", "vgg11_bn")


def run(model: nn.Module, spec, batch: int = 2) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.randn(batch, *spec.shape))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_builds_runs_and_exports_for_cifar(arch):
    torch.manual_seed(0)
    model = build_model(arch, 7, CIFAR10_SPEC).eval()
    example = torch.randn(2, *CIFAR10_SPEC.shape)
    with torch.no_grad():
        logits = model(example)
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()
    exported = torch.export.export(model, (example,))
    assert torch.allclose(exported.module()(example), logits, atol=1e-4)


@pytest.mark.parametrize("arch", MNIST_ARCHS)
def test_builds_for_mnist(arch):
    model = build_model(arch, 10, MNIST_SPEC)
    assert run(model, MNIST_SPEC).shape == (2, 10)


def test_lenet_exports_for_mnist_and_flattens_16x5x5():
    model = build_model("lenet", 10, MNIST_SPEC).eval()
    assert model.classifier[0].in_features == 16 * 5 * 5
    assert not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in model.modules())
    example = torch.randn(2, *MNIST_SPEC.shape)
    exported = torch.export.export(model, (example,))
    assert exported.module()(example).shape == (2, 10)


def test_lenet_flatten_size_follows_input():
    assert build_model("lenet", 10, CIFAR10_SPEC).classifier[0].in_features == 16 * 6 * 6
    assert build_model("lenet", 3, IMAGENET_SPEC).classifier[0].in_features == 16 * 54 * 54


@pytest.mark.parametrize("arch", ["lenet", "resnet18", "mobilenet_v2"])
def test_imagenet_size(arch):
    assert run(build_model(arch, 5, IMAGENET_SPEC), IMAGENET_SPEC, batch=1).shape == (1, 5)


def test_small_input_adaptations():
    vgg = build_model("vgg11_bn", 10, MNIST_SPEC)
    assert isinstance(vgg.features[-1], nn.Identity)  # 28 -> 14 -> 7 -> 3 -> 1: no fifth pool
    assert isinstance(vgg.avgpool, nn.AdaptiveAvgPool2d)
    assert [m.out_features for m in vgg.classifier if isinstance(m, nn.Linear)] == [512, 512, 10]
    assert (
        sum(isinstance(m, nn.MaxPool2d) for m in build_model("vgg16_bn", 10, CIFAR10_SPEC).features)
        == 5
    )
    resnet = build_model("resnet18", 10, MNIST_SPEC)
    assert resnet.conv1.kernel_size == (3, 3) and resnet.conv1.stride == (1, 1)
    assert resnet.conv1.in_channels == 1 and isinstance(resnet.maxpool, nn.Identity)
    assert build_model("resnet18", 10, IMAGENET_SPEC).conv1.stride == (2, 2)
    assert build_model("mobilenet_v2", 10, CIFAR10_SPEC).features[0][0].stride == (1, 1)
    assert build_model("googlenet", 10, MNIST_SPEC).conv1.conv.in_channels == 1


def test_resnet_small_is_a_cifar_resnet20_with_residual_adds():
    torch.manual_seed(0)
    model = build_model("resnet_small", 10, CIFAR10_SPEC).eval()
    assert 260_000 < sum(p.numel() for p in model.parameters()) < 280_000
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    widths = [c.out_channels for c in convs if c.kernel_size == (3, 3)]
    assert widths == [16] * 7 + [32] * 6 + [64] * 6
    example = torch.randn(2, *CIFAR10_SPEC.shape)
    exported = torch.export.export(model, (example,))
    with torch.no_grad():
        assert torch.allclose(exported.module()(example), model(example), atol=1e-4)
    adds = [n for n in exported.graph.nodes if n.target == torch.ops.aten.add.Tensor]
    assert len(adds) == 9  # one residual add per basic block
    assert run(build_model("resnet_small", 3, MNIST_SPEC), MNIST_SPEC).shape == (2, 3)


def test_relus_are_out_of_place():
    for arch in ("resnet18", "mobilenet_v2", "vgg11_bn"):
        model = build_model(arch, 10, CIFAR10_SPEC)
        assert not any(getattr(m, "inplace", False) for m in model.modules()), arch


def test_unknown_architecture_lists_choices():
    with pytest.raises(LegoError, match="unknown architecture 'alexnet'; choose one of lenet"):
        build_model("alexnet", 10, CIFAR10_SPEC)
    with pytest.raises(LegoError, match="num_classes"):
        build_model("lenet", 0, MNIST_SPEC)


# --------------------------------------------------------------------------- state_dict files


def test_state_dict_round_trip(tmp_path):
    torch.manual_seed(1)
    model = build_model("resnet18", 10, MNIST_SPEC).eval()
    example = torch.randn(3, *MNIST_SPEC.shape)
    path = tmp_path / "resnet18.pt"
    torch.save(model.state_dict(), path)
    loaded = load_state_dict_file(path, "resnet18", 10, MNIST_SPEC)
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(example), model(example))


def test_state_dict_nested_and_data_parallel_forms(tmp_path):
    model = build_model("lenet", 10, MNIST_SPEC)
    nested = tmp_path / "nested.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, nested)
    prefixed = tmp_path / "prefixed.pt"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, prefixed)
    for path in (nested, prefixed):
        loaded = load_state_dict_file(path, "lenet", 10, MNIST_SPEC)
        assert torch.equal(loaded.classifier[-1].weight, model.classifier[-1].weight)


def test_random_bytes_file(tmp_path):
    path = tmp_path / "noise.pt"
    noise = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
    path.write_bytes(b"\x13" + noise.to(torch.uint8).numpy().tobytes())
    with pytest.raises(ModelFileError, match="'noise.pt' is not a PyTorch state_dict file") as info:
        load_state_dict_file(path, "lenet", 10, MNIST_SPEC)
    assert "\n" not in str(info.value)


def test_damaged_torch_file(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save(build_model("lenet", 10, MNIST_SPEC).state_dict(), path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ModelFileError, match="'cut.pt' is not a PyTorch state_dict file: "):
        load_state_dict_file(path, "lenet", 10, MNIST_SPEC)


def test_pickled_model_object_is_refused(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(build_model("lenet", 10, MNIST_SPEC), path)
    with pytest.raises(ModelFileError, match="save model.state_dict"):
        load_state_dict_file(path, "lenet", 10, MNIST_SPEC)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ModelFileError, match="does not hold a state_dict"):
        load_state_dict_file(path, "lenet", 10, MNIST_SPEC)
    torch.save({"weights": [1, 2]}, path)
    with pytest.raises(ModelFileError, match="not named tensors"):
        load_state_dict_file(path, "lenet", 10, MNIST_SPEC)


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        load_state_dict_file(tmp_path / "gone.pt", "lenet", 10, MNIST_SPEC)


def test_state_dict_of_another_arch_names_keys(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(build_model("plain_cnn", 10, MNIST_SPEC).state_dict(), path)
    with pytest.raises(ModelFileError) as info:
        load_state_dict_file(path, "resnet18", 10, MNIST_SPEC)
    message = str(info.value)
    assert "does not fit resnet18 with 10 classes" in message
    assert "missing keys 'conv1.weight'" in message
    assert "unexpected keys 'features.0.weight'" in message
    assert "more)" in message and "\n" not in message


def test_wrong_num_classes_names_the_shape(tmp_path):
    path = tmp_path / "lenet10.pt"
    torch.save(build_model("lenet", 10, MNIST_SPEC).state_dict(), path)
    with pytest.raises(
        ModelFileError,
        match=r"'classifier.4.weight' has shape \[10, 84\], expected \[5, 84\]",
    ):
        load_state_dict_file(path, "lenet", 5, MNIST_SPEC)


def test_wrong_input_spec_is_a_shape_mismatch(tmp_path):
    path = tmp_path / "lenet_mnist.pt"
    torch.save(build_model("lenet", 10, MNIST_SPEC).state_dict(), path)
    with pytest.raises(ModelFileError, match=r"'features.0.weight' has shape"):
        load_state_dict_file(path, "lenet", 10, CIFAR10_SPEC)
