"""Hostile model uploads: pickles that would run code when unpickled.

Every payload below would create a marker file if anything unpickled it (`open(path, "w")`
or `os.system("touch path")` in `__reduce__`). Each upload must answer 422 with a message,
the marker must never appear, and the catalog and storage must be as before. The payloads
go in as every kind of upload the API takes: a state_dict (`arch=lenet`), an
ExportedProgram (`arch=exported`, with a pickle planted inside a real .pt2 archive) and
TorchScript (`arch=torchscript`, with the archive's data.pkl replaced).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from collections import Counter

import pytest
import torch
from service_helpers import MNIST_SPEC_DICT, needs_lego, snapshot

pytestmark = needs_lego("load_source_model", "build_model")


class WritesFile:
    path = ""

    def __reduce__(self):
        return (open, (self.path, "w"))


class RunsShell:
    path = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _lenet():
    from lego_core import build_model
    from lego_core.spec import MNIST_SPEC

    torch.manual_seed(0)
    return build_model("lenet", 5, MNIST_SPEC).eval()


def _replace_member(archive: bytes, suffix: str, blob: bytes) -> bytes:
    """The zip `archive` with the member whose name ends with `suffix` replaced by `blob`."""
    src = zipfile.ZipFile(io.BytesIO(archive))
    out = io.BytesIO()
    hit = False
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith(suffix):
                data, hit = blob, True
            dst.writestr(info, data)
    assert hit, suffix
    return out.getvalue()


def payloads(marker: str) -> dict[str, tuple[str, bytes]]:
    """name -> (arch, file bytes)."""
    WritesFile.path = RunsShell.path = marker
    write, shell = WritesFile(), RunsShell()
    net = _lenet()

    def tsave(obj, **kw) -> bytes:
        buf = io.BytesIO()
        torch.save(obj, buf, **kw)
        return buf.getvalue()

    state = {k: v for k, v in net.state_dict().items()}
    exported = io.BytesIO()
    torch.export.save(torch.export.export(net, (torch.rand(1, 1, 28, 28),)), exported)
    script = io.BytesIO()
    torch.jit.save(torch.jit.trace(net, torch.rand(1, 1, 28, 28)), script)
    out = {}
    for proto in (2, 4, 5):
        out[f"raw pickle protocol {proto} (open)"] = ("lenet", pickle.dumps(write, protocol=proto))
    out["raw pickle (os.system)"] = ("lenet", pickle.dumps(shell))
    out["torch.save zip, code in a value"] = ("lenet", tsave({**state, "conv1.weight": shell}))
    out["torch.save zip, code as the whole object"] = ("lenet", tsave(write))
    out["torch.save legacy format"] = (
        "lenet",
        tsave({"x": shell}, _use_new_zipfile_serialization=False),
    )
    out["checkpoint dict with code beside state_dict"] = (
        "lenet",
        tsave({"state_dict": state, "optimizer": shell}),
    )
    out["raw pickle as exported"] = ("exported", pickle.dumps(shell))
    out["raw pickle as torchscript"] = ("torchscript", pickle.dumps(shell))
    out[".pt2 with pickled sample inputs"] = (
        "exported",
        _replace_member(exported.getvalue(), "sample_inputs/model.pt", tsave((shell,))),
    )
    out[".pt2 with a pickle as weights config"] = (
        "exported",
        _replace_member(exported.getvalue(), "model_weights_config.json", pickle.dumps(shell)),
    )
    out["TorchScript with data.pkl replaced"] = (
        "torchscript",
        _replace_member(script.getvalue(), "archive/data.pkl", pickle.dumps(shell, protocol=2)),
    )
    out["TorchScript with constants.pkl replaced"] = (
        "torchscript",
        _replace_member(script.getvalue(), "constants.pkl", pickle.dumps(write, protocol=2)),
    )
    return out


CASES = [
    "raw pickle protocol 2 (open)",
    "raw pickle protocol 4 (open)",
    "raw pickle protocol 5 (open)",
    "raw pickle (os.system)",
    "torch.save zip, code in a value",
    "torch.save zip, code as the whole object",
    "torch.save legacy format",
    "checkpoint dict with code beside state_dict",
    "raw pickle as exported",
    "raw pickle as torchscript",
    ".pt2 with pickled sample inputs",
    ".pt2 with a pickle as weights config",
    "TorchScript with data.pkl replaced",
    "TorchScript with constants.pkl replaced",
]


@pytest.fixture(scope="module")
def results():
    return {}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    marker = tmp_path_factory.mktemp("hostile-models") / "pwned"
    return marker, payloads(str(marker))


@pytest.mark.parametrize("case", CASES)
def test_pickle_that_runs_code_is_refused(api, tmp_path, case, results, built):
    marker, cases = built
    arch, blob = cases[case]
    assert not marker.exists()
    # The payload really is live: unpickling it here would create the marker.
    if case.startswith("raw pickle"):
        probe = marker.with_name("probe")
        WritesFile.path = RunsShell.path = str(probe)
        pickle.loads(blob.replace(str(marker).encode(), str(probe).encode()))
        assert probe.exists()
        probe.unlink()
    before = snapshot(api.svc)
    r = api.post(
        "/api/v1/models",
        data={
            "name": "evil",
            "arch": arch,
            "class_names": json.dumps(list("abcde")),
            "input_spec": json.dumps(MNIST_SPEC_DICT),
        },
        files={"weights": ("model.pt", blob, "application/octet-stream")},
    )
    assert r.status_code == 422, (case, r.status_code, r.text)
    detail = r.json()["detail"]
    assert isinstance(detail, str) and detail, case
    assert not marker.exists(), f"{case}: the payload ran"
    assert snapshot(api.svc) == before, case
    results[case] = {"status": r.status_code, "detail": detail[:160]}


def test_zz_record(results, figures):
    if results:
        figures.record(
            "hostile_models",
            requests=len(results),
            by_status=dict(Counter(str(v["status"]) for v in results.values())),
            code_ran=0,
            rows_or_files_left=0,
            cases=results,
        )
