"""The whole journey over HTTP against the embedded default (SQLite, local storage,
in-process runner), then what a finished assembly refuses: other owners, bad images."""

from __future__ import annotations

import io
import json

import pytest
import torch
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
from lego_core.spec import MNIST_SPEC

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
        yield {
            "http": http,
            "bob": Http(client, bob),
            "ids": ids,
            "svc": app.state.services,
            "digits": digits,
            "spec": MNIST_SPEC,
        }
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


def test_raw_bodies_source_model_predict_and_v2_protocol(journey):
    from app.predict import decode_image

    http, ids, digits = journey["http"], journey["ids"], journey["digits"]
    png = {"content-type": "image/png"}
    r = http.post(f"/api/v1/assemblies/{ids['assembly']}/predict", content=digits["3"], headers=png)
    assert r.status_code == 200, r.text
    top = r.json()["predictions"][0][0]
    # A registered source model predicts too, over its own classes.
    r = http.post(f"/api/v1/models/{ids['a']}/predict", content=digits["3"], headers=png)
    assert r.status_code == 200, r.text
    assert {p["class"] for p in r.json()["predictions"][0]} <= {"0", "1", "2", "3", "4"}
    files = [("images", (f"{d}.png", digits[d], "image/png")) for d in ("5", "9")]
    r = http.post("/api/v1/models/lenet-5-9/predict", files=files, params={"top_k": 1})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 2
    assert http.post("/api/v1/models/999/predict", content=b"x", headers=png).status_code == 404

    # Open Inference Protocol v2, as a plain JSON client (Triton's, KServe's) sends it.
    c = http.client
    assert c.get("/v2/health/live").json() == {"live": True}
    assert c.get("/v2/health/ready").json() == {"ready": True}
    name = ids["body"]["name"]
    meta = http.get(f"/v2/models/{name}").json()
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert meta["outputs"][0]["shape"] == [-1, 4] and meta["versions"] == ["1"]
    assert meta["parameters"]["class_names"] == ids["names"]
    assert http.get(f"/v2/models/{name}/ready").json()["ready"] is True
    assert c.get(f"/v2/models/{name}").status_code == 401
    x = decode_image(digits["3"], journey["spec"], 10**6)
    tensor = {"name": "input", "shape": [2, 1, 28, 28], "datatype": "FP32"}
    body = {"id": "r1", "inputs": [{**tensor, "data": x.flatten().tolist() * 2}]}
    for url in (f"/v2/models/{name}/infer", f"/v2/models/{name}/versions/1/infer"):
        r = http.post(url, json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["model_name"] == name and out["model_version"] == "1" and out["id"] == "r1"
        (probs,) = out["outputs"]
        assert probs["name"] == "probabilities" and probs["shape"] == [2, 4]
        first = probs["data"][:4]
        best = max(range(4), key=first.__getitem__)
        assert ids["names"][best] == top["class"]
        assert abs(first[best] - top["probability"]) < 1e-4
    bad = {"inputs": [{**tensor, "shape": [1, 3, 28, 28], "data": [0.0] * 2352}]}
    r = http.post(f"/v2/models/{name}/infer", json=bad)
    assert r.status_code == 400 and "shape" in r.json()["error"]
    assert http.post("/v2/models/nothing/infer", json=body).status_code == 404


def test_registry_lineage_versions_aliases(journey, tmp_path):
    """Lineage names the exact source weights (in the catalog and in the .pt); a name
    has versions and aliases that predict and download resolve; a deleted id or
    version number is never given again."""
    http, ids = journey["http"], journey["ids"]
    model_a = http.get(f"/api/v1/models/{ids['a']}").json()
    assert model_a["version"] == 1 and model_a["used_by"] == [ids["assembly"]]
    asm = http.get(f"/api/v1/assemblies/{ids['assembly']}").json()
    src = asm["sources"][0]
    assert (src["model_name"], src["model_version"]) == ("lenet-0-4", 1)
    assert src["weights_sha256"] == model_a["weights_sha256"] and src["model_arch"] == "lenet"
    r = http.get("/api/v1/assemblies", params={"model_id": ids["a"]})
    assert [x["id"] for x in r.json()] == [ids["assembly"]]

    pt = tmp_path / "a.pt"
    pt.write_bytes(http.get(f"/api/v1/assemblies/{ids['assembly']}/download").content)
    extra = {"lego.json": ""}
    torch.export.load(str(pt), extra_files=extra)
    first = json.loads(extra["lego.json"])["lineage"][0]
    assert first["source_model_id"] == ids["a"] and first["source_model_name"] == "lenet-0-4"
    assert first["source_model_version"] == 1 and first["class_name"] == "0"
    assert first["source_weights_sha256"] == model_a["weights_sha256"]

    # The same name again: version 2, with its own id; aliases move between versions.
    r = http.post("/api/v1/assemblies", json=ids["body"])
    assert r.status_code == 202 and r.headers["location"] == f"/api/v1/assemblies/{r.json()['id']}"
    v2 = http.wait_assembly(r.json()["id"])
    assert v2["status"] == "succeeded" and v2["version"] == 2 and v2["id"] > ids["assembly"]
    name = ids["body"]["name"]
    assert http.get(f"/api/v1/assemblies/{name}").json()["id"] == v2["id"]  # the latest
    assert http.get(f"/api/v1/assemblies/{name}/1").json()["id"] == ids["assembly"]
    r = http.patch(f"/api/v1/assemblies/{name}/1", json={"aliases": ["champion"]})
    assert r.status_code == 200 and r.json()["aliases"] == ["champion"]
    assert http.get(f"/api/v1/assemblies/{name}@champion").json()["id"] == ids["assembly"]
    image = {"image": b64url(journey["digits"]["3"])}
    for ref in (f"{name}@champion", f"{name}/2", str(v2["id"])):
        r = http.get(f"/api/v1/assemblies/{ref}/predict", params=image)
        assert r.status_code == 200, (ref, r.text)
    r = http.get(f"/api/v1/assemblies/{name}@champion/download")
    assert r.status_code == 200 and r.content == pt.read_bytes()
    assert r.headers["etag"] == f'"{asm["artifact_sha256"]}"'
    cached = {"If-None-Match": r.headers["etag"]}
    r = http.get(f"/api/v1/assemblies/{name}/1/download", headers=cached)
    assert r.status_code == 304 and r.content == b""
    r = http.get(f"/api/v1/assemblies/{name}/1/download", headers={"If-None-Match": '"other"'})
    assert r.status_code == 200
    assert http.patch(f"/api/v1/assemblies/{name}/2", json={"aliases": ["champion"]}).is_success
    assert http.get(f"/api/v1/assemblies/{name}@champion").json()["id"] == v2["id"]
    assert http.get(f"/api/v1/assemblies/{name}/1").json()["aliases"] == []
    assert http.get(f"/api/v1/assemblies/{name}@nobody").status_code == 404
    assert http.get(f"/api/v1/assemblies/{name}/9").status_code == 404
    r = http.patch(f"/api/v1/assemblies/{name}/1", json={"aliases": ["no spaces"]})
    assert r.status_code == 422
    r = http.post("/api/v1/assemblies", json={**ids["body"], "name": "a/b"})
    assert r.status_code == 422

    # Deleting the latest version retires its id and its version number.
    assert http.delete(f"/api/v1/assemblies/{name}@champion").status_code == 204
    assert http.get(f"/api/v1/assemblies/{name}@champion").status_code == 404
    key = {"Idempotency-Key": "v3"}
    r = http.post("/api/v1/assemblies", json=ids["body"], headers=key)
    v3 = http.wait_assembly(r.json()["id"])
    assert v3["id"] == v2["id"] + 1 and v3["version"] == 3
    r = http.post("/api/v1/assemblies", json=ids["body"], headers=key)  # a retried request
    assert r.status_code == 202 and r.json()["id"] == v3["id"]
    assert r.headers["location"] == f"/api/v1/assemblies/{v3['id']}"
    r = http.post("/api/v1/assemblies", json={**ids["body"], "name": "x"}, headers=key)
    assert r.status_code == 422 and r.json()["code"] == "idempotency-key-reused"
    assert http.delete(f"/api/v1/assemblies/{v3['id']}").status_code == 204
    assert http.get(f"/api/v1/models/{ids['a']}").json()["used_by"] == [ids["assembly"]]


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
