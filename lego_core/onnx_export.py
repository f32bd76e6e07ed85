"""ONNX and Triton exports of an assembled `.pt` classifier, for established servers.

`export_onnx` converts the torch.export program of a `.pt` (lego_core.export) to an
ONNX model with torch.onnx's exporter (dynamo=True, which needs `onnxscript`): input
`images` [batch, C, H, W] raw floats in [0, 1] (normalised inside, as the `.pt`),
output `logits` [batch, classes], a dynamic batch dimension named `batch`. The
`.pt`'s metadata (class names, input spec, lineage) travels as the ONNX metadata
entry `lego.json`. ONNX Runtime runs it with no project code:

    import onnxruntime as ort
    session = ort.InferenceSession("model.onnx")
    logits = session.run(["logits"], {"images": images})[0]   # float32 numpy

`write_triton_repository` writes a Triton Inference Server model repository as a zip:
`<name>/config.pbtxt` (onnxruntime backend, dynamic batching), `<name>/1/model.onnx`
and `<name>/labels.txt` (the class names, for Triton's classification output).
Unzipped, `tritonserver --model-repository=DIR` serves it.

`onnx` and `onnxruntime` are imported here only; the rest of lego_core needs neither.
"""

from __future__ import annotations

import io
import json
import re
import warnings
import zipfile
from pathlib import Path

import torch

from lego_core.errors import LegoError
from lego_core.export import META_FILE, load_exported_program_with_meta
from lego_core.files import atomic_write

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"
TRITON_MAX_BATCH = 64


def input_shape(meta: dict) -> list[int]:
    spec = meta["input_spec"]
    return [int(spec["channels"]), int(spec["height"]), int(spec["width"])]


def _rename_dim(model, old: str, new: str) -> None:
    """Gives the symbolic dimension `old` the name `new` everywhere in the graph."""
    g = model.graph
    for vi in [*g.input, *g.output, *g.value_info]:
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param == old:
                d.dim_param = new


def onnx_bytes(pt_path: str | Path) -> tuple[bytes, dict]:
    """The ONNX model (serialised) of the `.pt` at `pt_path`, and the `.pt`'s metadata."""
    import onnx

    extra = {META_FILE: ""}
    program = load_exported_program_with_meta(pt_path, extra)
    try:
        meta = json.loads(extra[META_FILE])
        shape = input_shape(meta)
    except (ValueError, KeyError, TypeError) as exc:
        raise LegoError(f"{pt_path} is not a Model LEGO classifier: {exc}") from None
    example = torch.rand(2, *shape)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        exported = torch.onnx.export(
            program,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            verbose=False,
        )
    model = exported.model_proto
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    if batch.HasField("dim_param"):
        _rename_dim(model, batch.dim_param, BATCH_DIM)
    entry = model.metadata_props.add()
    entry.key, entry.value = META_FILE, json.dumps(meta)
    onnx.checker.check_model(model)
    return model.SerializeToString(), meta


def export_onnx(pt_path: str | Path, out_path: str | Path) -> dict:
    """Writes the ONNX model of the `.pt` at `pt_path` to `out_path` atomically;
    returns the `.pt`'s metadata."""
    data, meta = onnx_bytes(pt_path)
    atomic_write(out_path, lambda f: f.write(data))
    return meta


def triton_name(name: str) -> str:
    """A Triton model name (a directory name) from any string."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")[:64] or "model"


def triton_config(name: str, meta: dict, max_batch_size: int = TRITON_MAX_BATCH) -> str:
    """config.pbtxt of the ONNX model: dims without the batch dimension, which
    Triton adds itself (max_batch_size > 0), and dynamic batching."""
    shape = input_shape(meta)
    classes = len(meta["class_names"])
    return (
        f'name: "{name}"\n'
        'backend: "onnxruntime"\n'
        f"max_batch_size: {int(max_batch_size)}\n"
        "input [\n"
        "  {\n"
        f'    name: "{INPUT_NAME}"\n'
        "    data_type: TYPE_FP32\n"
        f"    dims: [ {', '.join(map(str, shape))} ]\n"
        "  }\n"
        "]\n"
        "output [\n"
        "  {\n"
        f'    name: "{OUTPUT_NAME}"\n'
        "    data_type: TYPE_FP32\n"
        f"    dims: [ {classes} ]\n"
        '    label_filename: "labels.txt"\n'
        "  }\n"
        "]\n"
        "dynamic_batching { }\n"
        "instance_group [ { kind: KIND_AUTO } ]\n"
    )


def write_triton_repository(
    onnx_path: str | Path,
    meta: dict,
    name: str,
    out_zip: str | Path,
    max_batch_size: int = TRITON_MAX_BATCH,
) -> str:
    """Writes a Triton model repository holding the ONNX model at `onnx_path` as a
    zip to `out_zip` atomically; returns the model name used inside."""
    name = triton_name(name)
    labels = "".join(f"{c}\n" for c in meta["class_names"])
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(f"{name}/config.pbtxt", triton_config(name, meta, max_batch_size))
        z.writestr(f"{name}/labels.txt", labels)
        z.write(onnx_path, f"{name}/1/model.onnx")
    atomic_write(out_zip, lambda f: f.write(buffer.getbuffer()))
    return name


__all__ = [
    "export_onnx",
    "onnx_bytes",
    "triton_config",
    "triton_name",
    "write_triton_repository",
]
