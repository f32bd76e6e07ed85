"""The CNN architectures the service knows, built for a given input spec.

Every model takes normalised `spec.channels x spec.height x spec.width` images
and returns logits [B, num_classes]. torchvision models are adapted to the
channel count and, for inputs under 64 pixels a side (MNIST, CIFAR), to small
images the usual way (CIFAR stems, fewer pools, smaller heads), so that their
state_dict keys stay those of torchvision.

All ReLUs are made out-of-place: forward hooks that record a layer's output
(which component location relies on) would otherwise see it overwritten by the
next in-place ReLU.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Callable, Mapping

import torch
from torch import nn
from torchvision import models as tvm

from lego_core.errors import LegoError, ModelFileError
from lego_core.spec import InputSpec

ARCHITECTURES: tuple[str, ...] = (
    "lenet",
    "plain_cnn",
    "vgg11_bn",
    "vgg16_bn",
    "resnet18",
    "resnet50",
    "googlenet",
    "mobilenet_v2",
    "resnet_small",
)

# Below this side length an input counts as small (MNIST 28, CIFAR 32).
SMALL_INPUT = 64


class LeNet(nn.Module):
    """LeNet-5: two 5x5 conv/pool stages and three fully connected layers."""

    def __init__(self, num_classes: int, spec: InputSpec) -> None:
        super().__init__()
        height, width = _lenet_feature_size(spec.height), _lenet_feature_size(spec.width)
        if height < 1 or width < 1:
            raise LegoError(
                f"lenet needs inputs of at least 12x12 pixels, got {spec.height}x{spec.width}"
            )
        self.features = nn.Sequential(
            nn.Conv2d(spec.channels, 6, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        # Flatten keeps the spatial layout: 16 x 5 x 5 features for a 28x28 input.
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            nn.Linear(16 * height * width, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


def _lenet_feature_size(size: int) -> int:
    # conv 5x5 padding 2 keeps the size; pool halves; conv 5x5 takes 4; pool halves.
    return (size // 2 - 4) // 2


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    ]


class PlainCNN(nn.Module):
    """A small plain (no skip connections) CNN that trains in minutes on a CPU."""

    def __init__(self, num_classes: int, spec: InputSpec, dropout: float = 0.3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(spec.channels, 32),
            *_conv_bn_relu(32, 32),
            nn.MaxPool2d(2),
            *_conv_bn_relu(32, 64),
            *_conv_bn_relu(64, 64),
            nn.MaxPool2d(2),
            *_conv_bn_relu(64, 128),
            nn.AdaptiveAvgPool2d(1),
        )
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            nn.Linear(128, 128),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(128, num_classes),
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


class _BasicBlock(nn.Module):
    """Two 3x3 conv/BN layers and a shortcut (a 1x1 conv/BN projection when the
    shape changes), summed before the last ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetSmall(nn.Module):
    """A CIFAR-style ResNet-20 (He et al. 2016): a 3x3 stem, three stages of three
    basic blocks of width 16, 32 and 64 (stride 2 into stages two and three,
    projection shortcuts there), global average pooling and one linear layer.
    About 0.27M parameters: residual connections that train in minutes on a CPU."""

    def __init__(self, num_classes: int, spec: InputSpec, blocks: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(spec.channels, 16, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        layers: list[nn.Module] = []
        in_channels = 16
        for stage, width in enumerate((16, 32, 64)):
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(_BasicBlock(in_channels, width, stride))
                in_channels = width
        self.layers = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.flatten(self.avgpool(x)))


def _is_small(spec: InputSpec) -> bool:
    return min(spec.height, spec.width) < SMALL_INPUT


def _kaiming_conv(conv: nn.Conv2d) -> nn.Conv2d:
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def _vgg(factory: Callable[..., tvm.VGG], num_classes: int, spec: InputSpec) -> nn.Module:
    small = _is_small(spec)
    # For small inputs the 4096-wide head is replaced anyway; building it on the meta
    # device skips initialising ~120M parameters (seconds on a CPU).
    with torch.device("meta") if small else contextlib.nullcontext():
        model = factory(weights=None, num_classes=num_classes)
    first = model.features[0]
    model.features[0] = nn.Conv2d(spec.channels, first.out_channels, kernel_size=3, padding=1)
    if small:
        # Drop the pools that would shrink a map below 1x1 (28x28 input: the fifth).
        height, width = spec.height, spec.width
        for index, module in enumerate(model.features):
            if isinstance(module, nn.MaxPool2d):
                if height < 2 or width < 2:
                    model.features[index] = nn.Identity()
                else:
                    height, width = height // 2, width // 2
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Sequential(
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Dropout(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Dropout(),
            nn.Linear(512, num_classes),
        )
        model.to_empty(device="cpu")
        _init_like_torchvision_vgg(model)
    else:
        _kaiming_conv(model.features[0])
    return model


def _init_like_torchvision_vgg(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            _kaiming_conv(module)
        elif isinstance(module, nn.BatchNorm2d):
            module.reset_parameters()  # weight 1, bias 0 and fresh running statistics
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0, 0.01)
            nn.init.zeros_(module.bias)


def _resnet(factory: Callable[..., tvm.ResNet], num_classes: int, spec: InputSpec) -> nn.Module:
    model = factory(weights=None, num_classes=num_classes)
    if _is_small(spec):
        # CIFAR stem: keep the full resolution into layer1.
        model.conv1 = _kaiming_conv(
            nn.Conv2d(spec.channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        )
        model.maxpool = nn.Identity()
    elif spec.channels != 3:
        model.conv1 = _kaiming_conv(
            nn.Conv2d(spec.channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        )
    return model


def _googlenet(num_classes: int, spec: InputSpec) -> nn.Module:
    model = tvm.googlenet(
        weights=None,
        aux_logits=False,
        init_weights=True,
        transform_input=False,
        num_classes=num_classes,
    )
    if spec.channels != 3:
        conv = nn.Conv2d(spec.channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        # torchvision's GoogLeNet initialisation (init_weights=True).
        nn.init.trunc_normal_(conv.weight, mean=0.0, std=0.01, a=-2, b=2)
        model.conv1.conv = conv
    return model


def _mobilenet_v2(num_classes: int, spec: InputSpec) -> nn.Module:
    model = tvm.mobilenet_v2(weights=None, num_classes=num_classes)
    first = model.features[0][0]
    stride = 1 if _is_small(spec) else 2
    model.features[0][0] = _kaiming_conv(
        nn.Conv2d(
            spec.channels, first.out_channels, kernel_size=3, stride=stride, padding=1, bias=False
        )
    )
    return model


_BUILDERS: dict[str, Callable[[int, InputSpec], nn.Module]] = {
    "lenet": LeNet,
    "plain_cnn": PlainCNN,
    "vgg11_bn": lambda n, s: _vgg(tvm.vgg11_bn, n, s),
    "vgg16_bn": lambda n, s: _vgg(tvm.vgg16_bn, n, s),
    "resnet18": lambda n, s: _resnet(tvm.resnet18, n, s),
    "resnet50": lambda n, s: _resnet(tvm.resnet50, n, s),
    "googlenet": _googlenet,
    "mobilenet_v2": _mobilenet_v2,
    "resnet_small": ResNetSmall,
}


def build_model(arch: str, num_classes: int, spec: InputSpec) -> nn.Module:
    """A freshly initialised `arch` classifier for `spec` images and `num_classes` classes.

    Initialisation draws from torch's global RNG; seed it for reproducible weights.
    """
    if arch not in _BUILDERS:
        raise LegoError(f"unknown architecture '{arch}'; choose one of {', '.join(ARCHITECTURES)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise LegoError(f"num_classes must be a positive integer, got {num_classes!r}")
    model = _BUILDERS[arch](num_classes, spec)
    for module in model.modules():
        if isinstance(module, nn.ReLU | nn.ReLU6):
            module.inplace = False
    return model


def load_state_dict_file(
    path: str | os.PathLike, arch: str, num_classes: int, spec: InputSpec
) -> nn.Module:
    """Build `arch` and load the state_dict saved at `path` into it (eval mode).

    The file is read with `torch.load(weights_only=True)`, which refuses arbitrary
    pickled objects. A dict with a "state_dict" entry (a common checkpoint form)
    and "module."-prefixed keys (DataParallel) are accepted too.
    """
    model = build_model(arch, num_classes, spec)
    label = os.path.basename(os.fspath(path))
    state = _read_state_dict(path, label)
    expected = model.state_dict()
    what = f"{arch} with {num_classes} classes"

    # BatchNorm's step counter is missing from some older checkpoints and unused in eval.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing keys {_first_few(missing)}")
        if unexpected:
            problems.append(f"unexpected keys {_first_few(unexpected)}")
        raise ModelFileError(f"'{label}' does not fit {what}: " + "; ".join(problems))

    mismatched = [k for k in state if tuple(state[k].shape) != tuple(expected[k].shape)]
    if mismatched:
        key = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise ModelFileError(
            f"'{label}' does not fit {what}: '{key}' has shape {list(state[key].shape)}, "
            f"expected {list(expected[key].shape)}{more}"
        )
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ModelFileError(
            f"'{label}' does not load into {what}: {str(exc).splitlines()[0]}"
        ) from None
    return model.eval()


def _read_state_dict(path: str | os.PathLike, label: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise ModelFileError(f"model file '{label}' does not exist")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    # torch.save writes a zip file; its legacy format is a pickle (protocol opcode 0x80).
    if magic != b"PK\x03\x04" and magic[:1] != b"\x80":
        raise ModelFileError(f"'{label}' is not a PyTorch state_dict file (torch.save format)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign or damaged files
        text = str(exc)
        if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in text:
            raise ModelFileError(
                f"'{label}' holds objects other than tensors (a pickled model?); "
                "save model.state_dict() instead"
            ) from None
        reason = text.splitlines()[0][:200] if text else type(exc).__name__
        raise ModelFileError(f"'{label}' is not a PyTorch state_dict file: {reason}") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise ModelFileError(
            f"'{label}' does not hold a state_dict (a dict of tensors); found {type(obj).__name__}"
        )
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise ModelFileError(
            f"'{label}' is not a state_dict: entries {_first_few([str(k) for k in bad])} "
            "are not named tensors"
        )
    state = dict(obj)
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _first_few(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")
