"""POST /models: a good registration, and every kind of bad input (422/413) leaving the
catalog and storage as they were. Uploads are never unpickled."""

from __future__ import annotations

import io
import json
import os
import pickle

import pytest
import torch
from service_helpers import MNIST_SPEC_DICT, needs_lego, snapshot, wait_job

pytestmark = needs_lego("load_source_model", "build_model", "ARCHITECTURES")


@pytest.fixture(scope="module")
def lenet_bytes() -> bytes:
    from lego_core import build_model
    from lego_core.spec import MNIST_SPEC

    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.save(build_model("lenet", 5, MNIST_SPEC).state_dict(), buf)
    return buf.getvalue()


def post_model(api, weights: bytes, who="alice", headers=None, **over):
    data = {
        "name": "m",
        "arch": "lenet",
        "class_names": json.dumps(list("abcde")),
        "input_spec": json.dumps(MNIST_SPEC_DICT),
    }
    data.update({k: v for k, v in over.items() if v is not None})
    for k in [k for k, v in over.items() if v is None]:
        data.pop(k)
    return api.post(
        "/api/v1/models",
        who=who,
        headers=headers or {},
        data=data,
        files={"weights": ("lenet.pt", weights, "application/octet-stream")},
    )


def test_register_get_list_delete(api, lenet_bytes):
    r = post_model(api, lenet_bytes)
    assert r.status_code == 201, r.text
    m = r.json()
    assert m["class_names"] == list("abcde") and m["input_spec"]["height"] == 28
    assert m["locate_job_id"] is None and m["component_sets"] == []
    assert api.get(f"/api/v1/models/{m['id']}").json()["weights_sha256"] == m["weights_sha256"]
    assert [x["id"] for x in api.get("/api/v1/models").json()] == [m["id"]]
    assert api.get(f"/api/v1/models/{m['id']}", who="bob").status_code == 404
    assert api.get("/api/v1/models", who="bob").json() == []
    comps = api.get(f"/api/v1/models/{m['id']}/components").json()
    assert comps["classes"] == [] and comps["component_sets"] == []
    r = api.get(f"/api/v1/models/{m['id']}/routes.svg")
    assert r.status_code == 409 and "locate" in r.json()["detail"]
    r = api.post(
        "/api/v1/assemblies", json={"source_classes": [{"model_id": m["id"], "classes": ["a"]}]}
    )
    assert r.status_code == 422 and "no located components" in r.json()["detail"]
    assert api.delete(f"/api/v1/models/{m['id']}", who="bob").status_code == 404
    assert api.delete(f"/api/v1/models/{m['id']}").status_code == 204
    assert api.get(f"/api/v1/models/{m['id']}").status_code == 404
    assert not api.svc.storage.exists(m["weights_sha256"])
    assert api.delete(f"/api/v1/models/{m['id']}").status_code == 404


def test_register_torchscript_and_exported(api):
    from lego_core import build_model
    from lego_core.spec import MNIST_SPEC

    torch.manual_seed(0)
    net = build_model("lenet", 5, MNIST_SPEC).eval()
    example = torch.rand(1, 1, 28, 28)
    ts, ep = io.BytesIO(), io.BytesIO()
    torch.jit.save(torch.jit.trace(net, example), ts)
    torch.export.save(torch.export.export(net, (example,)), ep)
    for arch, blob in (("torchscript", ts.getvalue()), ("exported", ep.getvalue())):
        r = post_model(api, blob, arch=arch)
        assert r.status_code == 201, (arch, r.text)
        assert r.json()["arch"] == arch
    # A TorchScript file is not a state_dict, and the other way round.
    r = post_model(api, ts.getvalue(), arch="lenet")
    assert r.status_code == 422


class Exploit:
    """Unpickling this would create a file: uploads must never be unpickled."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def bad_inputs(lenet_bytes: bytes, tmp_path) -> dict:
    from lego_core import build_model
    from lego_core.spec import MNIST_SPEC

    Exploit.marker = str(tmp_path / "pwned")
    exploit = io.BytesIO()
    torch.save({"conv1.weight": Exploit()}, exploit)
    whole = io.BytesIO()
    torch.save(build_model("lenet", 5, MNIST_SPEC), whole)
    other = io.BytesIO()
    torch.save(build_model("lenet", 7, MNIST_SPEC).state_dict(), other)
    spec3 = dict(MNIST_SPEC_DICT, channels=3, mean=[0.5] * 3, std=[0.5] * 3)
    return {
        "not a model file": (b"hello, I am a text file" * 40, {}, ""),
        "raw pickle": (pickle.dumps({"a": 1}), {}, ""),
        "pickled code": (exploit.getvalue(), {}, ""),
        "whole pickled model": (whole.getvalue(), {}, ""),
        "wrong arch": (lenet_bytes, {"arch": "resnet18"}, "resnet18"),
        "too few class names": (lenet_bytes, {"class_names": '["a", "b", "c"]'}, ""),
        "other output size": (other.getvalue(), {}, ""),
        "input spec that does not fit": (lenet_bytes, {"input_spec": json.dumps(spec3)}, ""),
        "input spec incomplete": (lenet_bytes, {"input_spec": '{"channels": 1}'}, "input spec"),
        "input spec not json": (lenet_bytes, {"input_spec": "{nope"}, "input_spec"),
        "negative std": (
            lenet_bytes,
            {"input_spec": json.dumps(dict(MNIST_SPEC_DICT, std=[-1.0]))},
            "std",
        ),
        "unknown arch": (lenet_bytes, {"arch": "alexnet-9000"}, "alexnet-9000"),
        "class names not json": (lenet_bytes, {"class_names": "a,b,c"}, "class_names"),
        "class names not a list": (lenet_bytes, {"class_names": '{"a": 1}'}, "class_names"),
        "duplicate class names": (
            lenet_bytes,
            {"class_names": '["a","a","b","c","d"]'},
            "more than once",
        ),
        "empty file": (b"", {}, "empty"),
        "missing name": (lenet_bytes, {"name": None}, ""),
        "unknown dataset": (lenet_bytes, {"dataset_id": "999"}, "dataset 999"),
    }


CASES = [
    "not a model file",
    "raw pickle",
    "pickled code",
    "whole pickled model",
    "wrong arch",
    "too few class names",
    "other output size",
    "input spec that does not fit",
    "input spec incomplete",
    "input spec not json",
    "negative std",
    "unknown arch",
    "class names not json",
    "class names not a list",
    "duplicate class names",
    "empty file",
    "missing name",
    "unknown dataset",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_model_upload(api, lenet_bytes, tmp_path, case):
    weights, over, word = bad_inputs(lenet_bytes, tmp_path)[case]
    before = snapshot(api.svc)
    r = post_model(api, weights, **over)
    expected = 404 if case == "unknown dataset" else 422
    assert r.status_code == expected, (case, r.status_code, r.text)
    detail = r.json()["detail"]
    assert detail, case
    if word:
        assert word in str(detail), (case, detail)
    assert snapshot(api.svc) == before, case
    assert not os.path.exists(Exploit.marker)


def test_messages_name_the_problem(api, lenet_bytes, tmp_path):
    cases = bad_inputs(lenet_bytes, tmp_path)
    r = post_model(api, cases["pickled code"][0])
    assert "lenet.pt" in r.json()["detail"]  # the user's file name, not a temp file
    r = post_model(api, lenet_bytes, class_names='["a", "b", "c"]')
    assert "5" in r.json()["detail"] and "3" in r.json()["detail"]


def test_oversized_upload_is_413(api, lenet_bytes):
    before = snapshot(api.svc)
    api.svc.settings.max_model_bytes = len(lenet_bytes) // 2
    r = post_model(api, lenet_bytes)
    assert r.status_code == 413, r.text
    assert snapshot(api.svc) == before


@needs_lego("inspect_image_folder")
def test_bad_locate_requests(api, lenet_bytes, mnist_small):
    m = post_model(api, lenet_bytes).json()  # classes a..e
    ds = api.post(
        "/api/v1/datasets", data={"name": "digits"}, files={"archive": ("d.tar.gz", mnist_small)}
    ).json()
    before = snapshot(api.svc)
    url = f"/api/v1/models/{m['id']}/locate"
    r = api.post(url, json={"dataset_id": ds["id"]})
    assert r.status_code == 422 and "none of model" in r.json()["detail"]
    assert api.post(url, json={"dataset_id": 999}).status_code == 404
    assert api.post("/api/v1/models/999/locate", json={"dataset_id": ds["id"]}).status_code == 404
    for bad in (
        {"alpha": 1.5},
        {"beta": -0.1},
        {"alpha": {"fc": 0.2}},
        {"samples_per_class": 0},
        {"alpha": "high"},
        {"unknown": 1},
    ):
        r = api.post(url, json={"dataset_id": ds["id"], **bad})
        assert r.status_code == 422, (bad, r.text)
    r = post_model(api, lenet_bytes, dataset_id=str(ds["id"]))  # locate at registration
    assert r.status_code == 422 and "none of model" in r.json()["detail"]
    assert snapshot(api.svc) == before


def test_names_have_versions_aliases_and_pages(api, lenet_bytes):
    ids = [post_model(api, lenet_bytes, name=n).json()["id"] for n in ("m", "m", "other")]
    m1, m2 = (api.get(f"/api/v1/models/{i}").json() for i in ids[:2])
    assert (m1["version"], m2["version"]) == (1, 2)
    assert api.get("/api/v1/models/m").json()["id"] == ids[1]  # the latest version
    assert api.get("/api/v1/models/m/1").json()["id"] == ids[0]
    r = api.client.patch(
        "/api/v1/models/m/1", headers=api.alice, json={"aliases": ["prod", "stable"]}
    )
    assert r.status_code == 200 and r.json()["aliases"] == ["prod", "stable"]
    assert api.get("/api/v1/models/m@prod").json()["id"] == ids[0]
    assert api.get("/api/v1/models/m@prod/components").json()["model_id"] == ids[0]
    api.client.patch("/api/v1/models/m/2", headers=api.alice, json={"aliases": ["prod"]})
    assert api.get("/api/v1/models/m@prod").json()["id"] == ids[1]
    assert api.get("/api/v1/models/m@stable").json()["id"] == ids[0]
    assert api.get("/api/v1/models/m@prod", who="bob").status_code == 404
    assert api.get("/api/v1/models/m/7").status_code == 404

    r = api.get("/api/v1/models", params={"limit": 2})
    assert [x["id"] for x in r.json()] == ids[:2] and r.headers["x-total-count"] == "3"
    assert r.headers["link"] == '</api/v1/models?limit=2&offset=2>; rel="next"'
    r = api.get("/api/v1/models", params={"limit": 2, "offset": 2})
    assert [x["id"] for x in r.json()] == ids[2:] and "link" not in r.headers
    r = api.get("/api/v1/models", params={"name": "m"})
    assert [x["id"] for x in r.json()] == ids[:2] and r.headers["x-total-count"] == "2"

    for bad in ("a/b", "a@b", "123"):
        r = post_model(api, lenet_bytes, name=bad)
        assert r.status_code == 422 and "name" in r.json()["detail"], bad

    # The latest version deleted: neither its id nor its version number comes back.
    assert api.delete("/api/v1/models/m@prod").status_code == 204
    assert api.get("/api/v1/models/m@prod").status_code == 404
    m3 = post_model(api, lenet_bytes, name="m").json()
    assert m3["id"] == ids[2] + 1 and m3["version"] == 3


def test_idempotency_key_replays_the_first_registration(api, lenet_bytes):
    key = {"Idempotency-Key": "reg-1"}
    first = post_model(api, lenet_bytes, headers=key)
    again = post_model(api, lenet_bytes, headers=key)
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"] and again.json()["version"] == 1
    assert again.headers["location"] == f"/api/v1/models/{first.json()['id']}"
    r = post_model(api, lenet_bytes, headers=key, name="other")  # same key, other request
    assert r.status_code == 422 and r.json()["code"] == "idempotency-key-reused"
    assert post_model(api, lenet_bytes, who="bob", headers=key).json()["id"] != first.json()["id"]
    assert post_model(api, lenet_bytes).json()["version"] == 2  # no key: a new version
    assert api.get("/api/v1/models").headers["x-total-count"] == "2"


def test_cancel_a_running_locate_job_over_http(api, lenet_bytes, mnist_small):
    r = api.post("/api/v1/datasets", data={"name": "d"}, files={"archive": ("d.tgz", mnist_small)})
    ds = r.json()["id"]
    api.svc.settings.debug_job_delay_s = 1.0  # the job runs for a while before its first step
    digits = json.dumps(list("01234"))
    m = post_model(api, lenet_bytes, dataset_id=str(ds), class_names=digits).json()
    jid = m["locate_job_id"]
    wait_job(lambda: {"status": "failed" if api.get(f"/api/v1/jobs/{jid}").json()["status"]
                      == "running" else "queued"}, timeout=30)  # fmt: skip
    r = api.post(f"/api/v1/jobs/{jid}/cancel")
    assert r.status_code == 202 and r.json()["cancel_requested"] and r.json()["status"] == "running"
    job = api.wait_job(jid)
    assert job["status"] == "cancelled" and job["error"] is None
    assert api.get(f"/api/v1/models/{m['id']}/components").json()["component_sets"] == []
    assert api.delete(f"/api/v1/jobs/{jid}").json()["status"] == "cancelled"  # again: no-op
    r = api.get("/api/v1/jobs", params={"status": "cancelled"})
    assert [j["id"] for j in r.json()] == [jid]

    api.svc.settings.debug_job_delay_s = 0.0
    r = api.post(f"/api/v1/models/{m['id']}/locate", json={"dataset_id": ds})
    assert r.status_code == 202 and r.headers["location"] == f"/api/v1/jobs/{r.json()['job_id']}"
    done = api.wait_job(r.json()["job_id"])
    assert done["status"] == "succeeded"
    r = api.post(f"/api/v1/jobs/{done['id']}/cancel")
    assert r.status_code == 409 and r.json()["code"] == "job-finished"
    assert api.post("/api/v1/jobs/999/cancel").status_code == 404
