"""Short, seeded training runs: a helper for tests and demos, not the product.

MDA works on already trained models; this trains the small source models that
tests and demos disassemble. Adam with a one-cycle learning-rate schedule gets
LeNet past 98% on MNIST in one CPU epoch and trains the CIFAR models reasonably
in a few epochs, with no tuning per architecture.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lego_core.data import ImageFolderData, normalize
from lego_core.errors import DatasetError, LegoError
from lego_core.spec import InputSpec

DEFAULT_LR = 3e-3
WEIGHT_DECAY = 5e-4
CROP_PADDING = 4


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None` picks CUDA when available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise LegoError("device 'cuda' was requested but CUDA is not available")
    return resolved


def train(
    model: nn.Module,
    data: ImageFolderData,
    spec: InputSpec,
    epochs: int = 1,
    batch_size: int = 128,
    lr: float = DEFAULT_LR,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    augment: bool = False,
) -> nn.Module:
    """Train `model` on `data` with cross-entropy; return it in eval mode.

    Runs are reproducible on one machine and device: `seed` seeds torch's global
    RNG (dropout) and a generator that drives shuffling and augmentation.
    `augment` adds a random crop (zero padding of 4) and a horizontal flip, which
    suits natural images such as CIFAR-10 but not digits. Model weights are not
    initialised here; seed before `build_model` for reproducible weights.
    """
    if len(data) == 0:
        raise DatasetError("cannot train on an empty dataset")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise LegoError("epochs and batch_size must be at least 1 and lr positive")
    data.check_spec(spec)
    target = resolve_device(device)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)

    model.to(target).train()
    steps_per_epoch = -(-len(data) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    total = epochs * steps_per_epoch
    # OneCycleLR divides by its phase lengths, which must be at least one step
    # each; runs of fewer than 4 steps keep a constant rate.
    schedule = (
        torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=total, pct_start=max(0.25, 2.0 / total)
        )
        if total >= 4
        else None
    )
    show = progress and sys.stderr.isatty()
    for epoch in range(epochs):
        order = torch.randperm(len(data), generator=generator)
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch + 1}/{epochs}",
            unit="batch",
            disable=not show,
            leave=False,
        )
        for step in bar:
            index = order[step * batch_size : (step + 1) * batch_size]
            if len(index) < 2 and step > 0:
                if schedule is not None:
                    schedule.step()  # BatchNorm cannot train on a batch of one
                continue
            images = data.images[index]
            if augment:
                images = _augment(images, generator)
            inputs = normalize(images.to(target), spec)
            labels = data.labels[index].to(target)
            loss = F.cross_entropy(model(inputs), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
            if show and step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
    return model.eval()


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding, then a random horizontal flip, per image."""
    count, _, height, width = images.shape
    padded = F.pad(images, (CROP_PADDING,) * 4)
    offsets = torch.randint(0, 2 * CROP_PADDING + 1, (count, 2), generator=generator)
    rows = offsets[:, 0, None] + torch.arange(height)  # [N, H]
    cols = offsets[:, 1, None] + torch.arange(width)  # [N, W]
    flip = torch.rand(count, generator=generator) < 0.5
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(count)[:, None, None]
    # Advanced indexing gathers every crop at once: [N, H, W, C] -> [N, C, H, W].
    cropped = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return cropped.permute(0, 3, 1, 2).contiguous()


@torch.inference_mode()
def accuracy(
    model: nn.Module,
    data: ImageFolderData,
    spec: InputSpec,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> float:
    """Top-1 accuracy (argmax over all logits) of `model` on `data`, in [0, 1]."""
    if len(data) == 0:
        raise DatasetError("cannot measure accuracy on an empty dataset")
    if device is None:
        first = next(model.parameters(), None)
        target = first.device if first is not None else torch.device("cpu")
    else:
        target = resolve_device(device)
        model.to(target)
    was_training = model.training
    model.eval()
    correct = 0
    for inputs, labels in data.batches(batch_size, spec, device=target):
        correct += int((model(inputs).argmax(dim=1) == labels).sum())
    model.train(was_training)
    return correct / len(data)
