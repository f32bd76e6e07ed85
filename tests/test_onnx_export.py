"""ONNX and Triton exports of assembled models (lego_core.onnx_export): ONNX Runtime
gives the `.pt`'s logits, and the Triton repository zip has Triton's layout."""

from __future__ import annotations

import json
import re
import zipfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from lego_core import MNIST_SPEC, Part, assemble, export_model, load_exported, locate
from lego_core import source_from_module as capture
from lego_core.onnx_export import export_onnx, write_triton_repository

TASKS = (["0", "1", "2"], ["7", "8", "9"])


@pytest.fixture(scope="module")
def parts(lenet_halves):
    out = []
    for (module, data), task in zip(lenet_halves, TASKS, strict=True):
        model = capture(module, MNIST_SPEC, data.class_names, "lenet", f"lenet-{task[0]}")
        out.append(Part(model, locate(model, data, with_stats=False), task, data, model.name))
    return out


@pytest.fixture(scope="module")
def images(mnist_test):
    return mnist_test.images[::251][:40].float() / 255


@pytest.mark.parametrize("form", ["branches", "padded"])
def test_onnx_runtime_logits_equal_the_pt_logits(parts, images, tmp_path, form):
    pt, path = tmp_path / "a.pt", tmp_path / "a.onnx"
    export_model(assemble(parts, form=form), pt)
    meta = export_onnx(pt, path)
    expected = load_exported(pt)(images).numpy()

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.shape) == ("images", ["batch", 1, 28, 28])
    assert (out.name, out.shape) == ("logits", ["batch", 6])
    for rows in (slice(0, 1), slice(0, 7), slice(None)):  # the batch dimension is dynamic
        got = session.run(["logits"], {"images": images[rows].numpy()})[0]
        assert got.shape == expected[rows].shape
        assert np.abs(got - expected[rows]).max() < 1e-4
    assert (got.argmax(1) == expected.argmax(1)).all()

    props = {p.key: p.value for p in onnx.load(path).metadata_props}
    stored = json.loads(props["lego.json"])
    assert stored == meta and stored["class_names"] == [*TASKS[0], *TASKS[1]]


def test_triton_repository_zip_layout_and_config(parts, tmp_path):
    pt, path, repo = tmp_path / "a.pt", tmp_path / "a.onnx", tmp_path / "repo.zip"
    export_model(assemble(parts), pt)
    meta = export_onnx(pt, path)
    name = write_triton_repository(path, meta, "../digits 0-2/7-9", repo)
    assert name == "digits_0-2_7-9"

    with zipfile.ZipFile(repo) as z:
        assert sorted(z.namelist()) == sorted(
            [f"{name}/config.pbtxt", f"{name}/labels.txt", f"{name}/1/model.onnx"]
        )
        assert z.read(f"{name}/1/model.onnx") == path.read_bytes()
        labels = z.read(f"{name}/labels.txt").decode().splitlines()
        config = z.read(f"{name}/config.pbtxt").decode()
    assert labels == meta["class_names"]
    assert re.search(rf'^name: "{name}"$', config, re.M)
    assert re.search(r'^backend: "onnxruntime"$', config, re.M)
    assert re.search(r"^max_batch_size: 64$", config, re.M)
    # Triton adds the batch dimension itself: dims are those of one image / one output row.
    inputs, outputs = config.split("output [")
    assert 'name: "images"' in inputs and "dims: [ 1, 28, 28 ]" in inputs
    assert 'name: "logits"' in outputs and "dims: [ 6 ]" in outputs
    assert 'label_filename: "labels.txt"' in outputs
    assert "dynamic_batching" in config
    assert config.count("{") == config.count("}") and config.count("[") == config.count("]")


def test_exported_onnx_runs_without_torch_or_this_project(parts, images, tmp_path):
    """ONNX Runtime alone: a process where torch and lego_core cannot be imported."""
    import os
    import subprocess
    import sys

    pt, path = tmp_path / "a.pt", tmp_path / "a.onnx"
    export_model(assemble(parts), pt)
    export_onnx(pt, path)
    np.save(tmp_path / "x.npy", images.numpy())
    script = (
        "import sys\n"
        "for name in ('torch', 'lego_core', 'app', 'worker'):\n"
        "    sys.modules[name] = None\n"
        "import numpy as np, onnxruntime as ort\n"
        "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
        "np.save(sys.argv[3], s.run(None, {'images': np.load(sys.argv[2])})[0])\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    done = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            script,
            str(path),
            str(tmp_path / "x.npy"),
            str(tmp_path / "y"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    expected = load_exported(pt)(images).numpy()
    got = np.load(tmp_path / "y.npy")
    assert got.shape == expected.shape == (images.shape[0], 6)
    assert np.abs(got - expected).max() < 1e-4
