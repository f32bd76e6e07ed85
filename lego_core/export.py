"""Export of assembled models as self-contained `.pt` files.

The file is a torch.export ExportedProgram (torch.export.save) with a dynamic
batch dimension. It takes raw images in [0, 1] of its input spec, normalises
inside, and returns logits. Its class names, input spec and lineage travel in
the archive as the extra file `lego.json`. A process with only torch loads it:

    extra = {"lego.json": ""}
    with open("model.pt", "rb") as f:
        program = torch.export.load(f, extra_files=extra)
    meta = json.loads(extra["lego.json"])
    logits = program.module()(images)   # images: [B, C, H, W] floats in [0, 1]

torch.export is the choice over TorchScript: TorchScript is deprecated in
torch 2.14, and an ExportedProgram carries the same ATen graph that the engine
works on.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lego_core.errors import ModelFileError
from lego_core.files import atomic_write
from lego_core.graph import load_exported_program
from lego_core.spec import InputSpec

META_FILE = "lego.json"
FORMAT = "model-lego/assembled-v1"


def export_model(assembled, path: str | Path) -> dict:
    """Writes `assembled` (an AssembledModel) to `path` atomically; returns the
    metadata stored with it."""
    path = Path(path)
    spec = assembled.spec
    example = torch.rand(2, *spec.shape)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with torch.no_grad():
        program = torch.export.export(
            assembled.module.eval(), (example,), dynamic_shapes=({0: batch},)
        )
    meta = {
        "format": FORMAT,
        "class_names": list(assembled.class_names),
        "input_spec": {**spec.to_dict(), "value_range": [0.0, 1.0], "normalised_inside": True},
        "lineage": assembled.lineage,
        "form": assembled.form,
        "scaling": assembled.scaling,
        "compensated": assembled.compensated,
        "decision": assembled.decision,
    }
    # Serialised in memory, then written by Python: torch's own file writer aborts
    # the whole process when the disk fills, where Python raises OSError(ENOSPC).
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={META_FILE: json.dumps(meta)})
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))
    return meta


@dataclass
class ExportedClassifier:
    """A loaded `.pt` classifier: call it on raw [0, 1] images (CPU tensors in and out;
    the model runs on `device`)."""

    module: torch.nn.Module
    class_names: list[str]
    spec: InputSpec
    meta: dict
    device: str = "cpu"

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.to(self.device)).cpu()


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> ExportedClassifier:
    """Loads a `.pt` classifier; `device` ("cpu", "cuda", ...) is where it runs."""
    extra = {META_FILE: ""}
    program = load_exported_program_with_meta(path, extra)
    if torch.device(device).type != "cpu":
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, device)
    try:
        meta = json.loads(extra[META_FILE])
        if meta.get("format") != FORMAT:
            raise ValueError("unknown format")
        spec = InputSpec.from_dict(meta["input_spec"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelFileError(f"{path} is not a Model LEGO classifier: {exc}") from None
    return ExportedClassifier(
        program.module(), list(meta["class_names"]), spec, meta, str(torch.device(device))
    )


def load_exported_program_with_meta(path, extra: dict):
    from lego_core.graph import _refuse_unpickling

    try:
        with _refuse_unpickling(), open(path, "rb") as f:
            return torch.export.load(f, extra_files=extra)
    except ModelFileError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ModelFileError(f"not a readable exported model: {exc}") from None


__all__ = ["export_model", "load_exported", "ExportedClassifier", "load_exported_program"]
