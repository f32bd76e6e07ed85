"""The files `GET /assemblies/{id}/download?format=...` answers with.

`pt` is the stored artifact itself. `onnx` and `triton` are made from it on the first
request (lego_core.onnx_export; a few seconds for a small model) and kept next to the
artifact's other derived files (work/named/<sha>.*), which go when the artifact goes.
Writes are atomic, so API processes that make the same file at once do no harm.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from app import adapters
from app.storage import Storage

DownloadFormat = Literal["pt", "onnx", "triton"]
# format -> (file name suffix, media type)
FORMATS = {
    "pt": (".pt", "application/octet-stream"),
    "onnx": (".onnx", "application/octet-stream"),
    "triton": (".zip", "application/zip"),
}


def onnx_file(storage: Storage, sha256: str) -> Path:
    from lego_core.onnx_export import export_onnx

    target = storage.work_dir("named") / f"{sha256}.onnx"
    if not target.exists():
        with adapters.EXPORT_LOCK:  # torch.export loading and tracing are not thread-safe
            if not target.exists():
                export_onnx(adapters.named_path(storage, sha256, ".pt"), target)
    return target


def triton_file(storage: Storage, sha256: str, name: str) -> Path:
    import json

    import onnx

    from lego_core.export import META_FILE
    from lego_core.onnx_export import triton_name, write_triton_repository

    model_name = triton_name(name)
    target = storage.work_dir("named") / f"{sha256}.triton-{model_name}.zip"
    if not target.exists():
        source = onnx_file(storage, sha256)
        props = {p.key: p.value for p in onnx.load(source, load_external_data=False).metadata_props}
        write_triton_repository(source, json.loads(props[META_FILE]), model_name, target)
    return target


def download_file(storage: Storage, sha256: str, fmt: DownloadFormat, name: str) -> Path:
    """The file of the assembly artifact `sha256` in format `fmt` (see FORMATS)."""
    if fmt == "onnx":
        return onnx_file(storage, sha256)
    if fmt == "triton":
        return triton_file(storage, sha256, name)
    return storage.require(sha256)
