"""The whole journey over HTTP against the embedded default (SQLite, local storage,
in-process runner), then what a finished assembly refuses: other owners, bad images."""

from __future__ import annotations

import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from service_helpers import (
    JOURNEY_NEEDS,
    Http,
    add_keys,
    b64url,
    make_settings,
    needs_lego,
    run_journey,
    snapshot,
)

from app.catalog import upgrade
from app.main import create_app

pytestmark = [needs_lego(*JOURNEY_NEEDS), pytest.mark.slow]


@pytest.fixture(scope="module")
def journey(tmp_path_factory, trained_lenets, mnist_small, digits):
    root = tmp_path_factory.mktemp("embedded")
    settings = make_settings(root)
    upgrade(settings.resolved_database_url)
    app = create_app(settings)
    alice, bob = add_keys(app.state.services.catalog)
    with TestClient(app) as client:
        http = Http(client, alice)
        ids = run_journey(http, trained_lenets, mnist_small, digits, root)
        yield {"http": http, "bob": Http(client, bob), "ids": ids, "svc": app.state.services}
    app.state.services.catalog.dispose()


def test_journey_embedded(journey):
    http, ids = journey["http"], journey["ids"]
    listed = http.get("/api/v1/assemblies").json()
    assert [a["id"] for a in listed] == [ids["assembly"]]
    assert {m["id"] for m in http.get("/api/v1/models").json()} == {ids["a"], ids["b"]}
    job = http.get(f"/api/v1/jobs/{ids['assembly_job']}").json()
    assert job["kind"] == "assemble" and job["status"] == "succeeded"
    assert job["assembly_id"] == ids["assembly"]


def test_assembly_options_reach_the_exported_model(journey, tmp_path):
    """Mean compensation off and a small calibration pool, chosen per request; the
    exported file says which were used and carries the decision stage."""
    import json

    import torch

    http, ids = journey["http"], journey["ids"]
    body = {
        "source_classes": [
            {"model_id": ids["a"], "classes": ["0", "1"]},
            {"model_id": ids["b"], "classes": ["7"]},
        ],
        "options": {"compensate": False, "calibration_per_class": 5},
    }
    r = http.post("/api/v1/assemblies", json=body)
    assert r.status_code == 202, r.text
    asm = http.wait_assembly(r.json()["id"])
    assert asm["status"] == "succeeded", asm
    path = tmp_path / "a.pt"
    path.write_bytes(http.get(f"/api/v1/assemblies/{asm['id']}/download").content)
    extra = {"lego.json": ""}
    torch.export.load(str(path), extra_files=extra)
    meta = json.loads(extra["lego.json"])
    assert meta["scaling"] == "gaussian" and meta["compensated"] is False
    assert meta["decision"]["samples"] <= 15 and meta["decision"]["params"] > 0
    http.delete(f"/api/v1/assemblies/{asm['id']}")


def test_another_owner_gets_404_everywhere(journey):
    bob, ids = journey["bob"], journey["ids"]
    a, asm, ds = ids["a"], ids["assembly"], ids["dataset"]
    for url in (
        f"/api/v1/models/{a}",
        f"/api/v1/models/{a}/components",
        f"/api/v1/models/{a}/routes.svg",
        f"/api/v1/datasets/{ds}",
        f"/api/v1/assemblies/{asm}",
        f"/api/v1/assemblies/{asm}/download",
        f"/api/v1/jobs/{ids['assembly_job']}",
    ):
        assert bob.get(url).status_code == 404, url
    r = bob.get(f"/api/v1/assemblies/{asm}/predict", params={"image": "AAAA"})
    assert r.status_code == 404
    assert bob.delete(f"/api/v1/models/{a}").status_code == 404
    assert bob.delete(f"/api/v1/assemblies/{asm}").status_code == 404
    assert bob.post(f"/api/v1/models/{a}/locate", json={"dataset_id": ds}).status_code == 404
    r = bob.post("/api/v1/assemblies", json={"source_classes": [{"model_id": a, "classes": [0]}]})
    assert r.status_code == 404
    for url in ("/api/v1/models", "/api/v1/datasets", "/api/v1/assemblies", "/api/v1/jobs"):
        assert bob.get(url).json() == []


def test_bad_assembly_requests(journey):
    http, ids, svc = journey["http"], journey["ids"], journey["svc"]
    before = snapshot(svc)
    a, b = ids["a"], ids["b"]

    def post(body):
        return http.post("/api/v1/assemblies", json=body)

    r = post({"source_classes": [{"model_id": a, "classes": ["0", "zebra"]}]})
    assert r.status_code == 422 and "zebra" in r.json()["detail"]
    r = post({"source_classes": [{"model_id": a, "classes": [7]}]})
    assert r.status_code == 422 and "index 7" in r.json()["detail"]
    r = post({"source_classes": [{"model_id": 999, "classes": [0]}]})
    assert r.status_code == 404 and "model 999" in r.json()["detail"]
    r = post({"source_classes": [{"model_id": a, "classes": [0]}], "eval_dataset_ids": [999]})
    assert r.status_code == 404
    r = post({"source_classes": [{"model_id": a, "classes": [0]}], "options": {"form": "cube"}})
    assert r.status_code == 422 and "cube" in r.json()["detail"]
    r = post({"source_classes": [{"model_id": a, "classes": [0]}], "options": {"scaling": "x"}})
    assert r.status_code == 422 and "gaussian" in r.json()["detail"]
    r = post(
        {
            "source_classes": [{"model_id": a, "classes": [0]}],
            "options": {"calibration_per_class": 0},
        }
    )
    assert r.status_code == 422
    r = post({"source_classes": []})
    assert r.status_code == 422
    r = post({"source_classes": [{"model_id": a, "classes": [0]}, {"model_id": a, "classes": [1]}]})
    assert r.status_code == 422 and "twice" in r.json()["detail"]
    r = http.get(f"/api/v1/models/{b}/routes.svg", params={"classes": "5,zebra"})
    assert r.status_code == 422 and "'zebra'" in r.json()["detail"]
    assert snapshot(svc) == before


def test_bad_predict_input(journey):
    http, asm = journey["http"], journey["ids"]["assembly"]
    url = f"/api/v1/assemblies/{asm}/predict"
    r = http.get(url, params={"image": b64url(b"definitely not an image")})
    assert r.status_code == 422 and "image 0" in r.json()["detail"]
    r = http.get(url, params={"image": "%%%not base64%%%"})
    assert r.status_code == 422 and "base64" in r.json()["detail"]
    r = http.post(url, files=[("images", ("x.png", b"GIF89a broken", "image/png"))])
    assert r.status_code == 422
    r = http.post(url, json={"images": []})
    assert r.status_code == 422
    r = http.post(url, content=b"raw", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    big = io.BytesIO()
    Image.new("L", (5000, 5000)).save(big, format="PNG")
    journey["svc"].settings.max_image_pixels = 1_000_000
    r = http.post(url, files=[("images", ("big.png", big.getvalue(), "image/png"))])
    assert r.status_code == 422 and "pixels" in r.json()["detail"]
    r = http.get(url, params={"image": b64url(b"x"), "top_k": 0})
    assert r.status_code == 422
    assert http.get("/api/v1/assemblies/999/predict", params={"image": "AAAA"}).status_code == 404


def test_download_as_onnx_and_triton_repository(journey, tmp_path):
    """?format=onnx gives the .pt's logits under ONNX Runtime; ?format=triton a repository zip."""
    import zipfile

    import numpy as np
    import onnxruntime as ort
    import torch

    from lego_core import load_exported

    http, asm = journey["http"], journey["ids"]["assembly"]
    url = f"/api/v1/assemblies/{asm}/download"
    pt = tmp_path / "a.pt"
    pt.write_bytes(http.get(url, params={"format": "pt"}).content)
    r = http.get(url, params={"format": "onnx"})
    assert r.status_code == 200, r.text
    assert r.headers["content-disposition"].endswith('-digits-0379.onnx"')
    x = np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32)
    session = ort.InferenceSession(r.content, providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"images": x})[0]
    expected = load_exported(pt)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)

    r = http.get(url, params={"format": "triton"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    (tmp_path / "repo.zip").write_bytes(r.content)
    with zipfile.ZipFile(tmp_path / "repo.zip") as z:
        assert sorted(z.namelist()) == [
            "digits-0379/1/model.onnx",
            "digits-0379/config.pbtxt",
            "digits-0379/labels.txt",
        ]
        assert z.read("digits-0379/labels.txt").decode().split() == ["0", "3", "7", "9"]
    assert http.get(url, params={"format": "tflite"}).status_code == 422
    assert journey["bob"].get(url, params={"format": "onnx"}).status_code == 404


def test_assembly_can_be_deleted_then_its_models(journey):
    http, ids, svc = journey["http"], journey["ids"], journey["svc"]
    r = http.post("/api/v1/assemblies", json=ids["body"])
    assert r.status_code == 202
    again = http.wait_assembly(r.json()["id"])
    assert again["status"] == "succeeded"
    # Deterministic: the same sources give the same file (stored once).
    first = http.get(f"/api/v1/assemblies/{ids['assembly']}").json()
    sha = first["artifact_sha256"]
    assert http.delete(f"/api/v1/assemblies/{again['id']}").status_code == 204
    if again["artifact_sha256"] == sha:
        assert svc.storage.exists(sha)
    assert http.delete(f"/api/v1/assemblies/{ids['assembly']}").status_code == 204
    assert not svc.storage.exists(sha)
    r = http.delete(f"/api/v1/datasets/{ids['dataset']}")
    assert r.status_code == 409 and "components" in r.json()["detail"]
    for model in (ids["a"], ids["b"]):
        r = http.delete(f"/api/v1/models/{model}")
        assert r.status_code == 204, r.text
        assert http.get(f"/api/v1/models/{model}").status_code == 404
    assert http.delete(f"/api/v1/datasets/{ids['dataset']}").status_code == 204
    counts, files = snapshot(svc)
    assert files == [] and counts["jobs"] > 0 and counts["models"] == 0
