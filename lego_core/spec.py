"""The input spec that travels with every model: what image it expects."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lego_core.errors import LegoError


@dataclass(frozen=True)
class InputSpec:
    """Image shape and normalisation of a classifier's input.

    A model takes `channels x height x width` images whose values in [0, 1]
    were normalised per channel as `(x - mean) / std`.
    """

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.channels not in (1, 3):
            raise LegoError(f"input spec: channels must be 1 or 3, got {self.channels}")
        if not (1 <= self.height <= 4096 and 1 <= self.width <= 4096):
            raise LegoError(f"input spec: size {self.height}x{self.width} is outside 1..4096")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise LegoError(
                f"input spec: mean and std need {self.channels} values each, "
                f"got {len(self.mean)} and {len(self.std)}"
            )
        if any(s <= 0 for s in self.std):
            raise LegoError("input spec: every std must be positive")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> InputSpec:
        try:
            return cls(
                channels=int(d["channels"]),
                height=int(d["height"]),
                width=int(d["width"]),
                mean=tuple(d["mean"]),
                std=tuple(d["std"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, LegoError):
                raise
            raise LegoError(
                "input spec must be {channels, height, width, mean, std}: " + str(exc)
            ) from None


MNIST_SPEC = InputSpec(1, 28, 28, (0.1307,), (0.3081,))
CIFAR10_SPEC = InputSpec(3, 32, 32, (0.4913, 0.4821, 0.4465), (0.245, 0.243, 0.261))
IMAGENET_SPEC = InputSpec(3, 224, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
