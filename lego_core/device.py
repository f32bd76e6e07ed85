"""Which device the forward passes run on (`LEGO_DEVICE`, `--device`)."""

from __future__ import annotations

import torch

from lego_core.errors import LegoError


def resolve_device(setting: str = "auto") -> str:
    """`auto`: CUDA when torch sees a GPU, else the CPU; `cpu`, `cuda` or `cuda:N` as given.

    On CUDA, TF32 is switched off for convolutions and matrix products: with it,
    float32 results differ from the CPU's in the third decimal, enough to move a
    channel across a locating threshold. Full float32 keeps masks and logits those
    of the CPU (make gpu-check)."""
    setting = (setting or "auto").strip().lower()
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LegoError(f"device {setting!r}: torch sees no CUDA GPU")
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    elif setting != "cpu":
        raise LegoError(f"unknown device {setting!r}; choose auto, cpu or cuda")
    return setting
