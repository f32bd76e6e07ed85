"""Hostile input to a running app that holds an assembled model: images to predict on
(truncated, 1x1, 20000x20000, CMYK, 16-bit, animated, ...), base64 that is not base64,
JSON with wrong types, huge numbers and unknown fields, in bodies, queries, paths and
form fields. Every answer is a 4xx with a message (or a 200 for images that decode),
never a 5xx; nothing is created by a refused request."""

from __future__ import annotations

import base64
import io
import json
import math

import pytest
from rel_helpers import Traffic, hostile_images, png_bomb
from service_helpers import JOURNEY_NEEDS, b64url, needs_lego, snapshot

pytestmark = [needs_lego(*JOURNEY_NEEDS), pytest.mark.slow]

HUGE = 10**30
BIG = 2**63


def check_4xx(r, what) -> str:
    assert 400 <= r.status_code < 500, (what, r.status_code, r.text[:400])
    body = r.json()
    detail = body.get("detail")
    if isinstance(detail, list):  # request validation: a list of {loc, msg, type}
        assert detail and all(d.get("msg") for d in detail), (what, body)
        return "; ".join(str(d["msg"]) for d in detail)
    assert isinstance(detail, str) and detail, (what, body)
    return detail


@pytest.fixture(scope="module")
def traffic(ready):
    t = Traffic()
    t.attach(ready.client)
    yield t
    t.detach(ready.client)


@pytest.fixture(scope="module")
def results():
    return {}


def test_predict_hostile_images(ready, digits, traffic, results):
    http, asm = ready.http, ready.ids["assembly"]
    url = f"/api/v1/assemblies/{asm}/predict"
    images = hostile_images(digits["3"])
    images["PNG bomb 12000x12000"] = (png_bomb(), False)
    reference = http.post(url, files=[("images", ("3.png", digits["3"], "image/png"))])
    assert reference.status_code == 200, reference.text
    top = reference.json()["predictions"][0][0]["class"]
    out = {}
    for name, (blob, accepted) in images.items():
        for how in ("multipart", "json", "query"):
            if how == "multipart":
                r = http.post(url, files=[("images", ("x.png", blob, "image/png"))])
            elif how == "json":
                r = http.post(url, json={"images": [b64url(blob)]})
            else:
                if len(blob) > 4000:
                    continue
                r = http.get(url, params={"image": b64url(blob)})
            if accepted:
                assert r.status_code == 200, (name, how, r.status_code, r.text[:300])
                preds = r.json()["predictions"]
                assert len(preds) == 1 and preds[0], (name, preds)
                out[name] = preds[0][0]["class"]
            else:
                detail = check_4xx(r, (name, how))
                assert r.status_code == 422, (name, how, r.status_code)
                assert "image 0" in detail, (name, how, detail)
                out[name] = detail[:120]
    # Images that decode mean the same digit, whatever their encoding.
    for name in ("16-bit PNG", "animated GIF", "RGBA PNG", "palette PNG"):
        assert out[name] == top, (name, out[name], top)
    results["predict images"] = out


def test_base64_that_is_not_base64(ready, digits, traffic):
    http, asm = ready.http, ready.ids["assembly"]
    url = f"/api/v1/assemblies/{asm}/predict"
    good = base64.b64encode(digits["3"]).decode()
    cases = {
        "symbols": "%%%not base64%%%",
        "spaces only": "   ",
        "empty": "",
        "one char": "A",
        "five chars": "AAAAA",
        "unicode": "ünïcødé",
        "NUL bytes": "AAAA\x00AAAA",
        "data URL of text": "data:text/plain,hello",
        "valid base64 of nothing useful": base64.b64encode(b"\x00" * 64).decode(),
        "base64 cut short": good[:-7],
        "base64 with junk appended": good + "!!",
        "huge random": base64.b64encode(bytes(range(256)) * 2000).decode(),
    }
    for name, text in cases.items():
        for how in ("query", "json", "form field"):
            if how == "query" and len(text) > 4000:
                continue  # longer than a URL may be (the client refuses to send it)
            if how == "query":
                r = http.get(url, params={"image": text})
            elif how == "json":
                r = http.post(url, json={"images": [text]})
            else:
                r = http.post(url, data={"images": text}, files=[("other", ("x", b"x"))])

            check_4xx(r, (name, how))


def _body_cases(a: int, b: int, ds: int) -> dict[str, tuple[str, str, object]]:
    """name -> (method, url, JSON body or raw bytes)."""
    src = {"model_id": a, "classes": ["0"]}
    asm = "/api/v1/assemblies"
    loc = f"/api/v1/models/{a}/locate"
    return {
        # wrong types
        "assembly: source_classes a string": ("POST", asm, {"source_classes": "x"}),
        "assembly: model_id a string": (
            "POST",
            asm,
            {"source_classes": [{"model_id": "abc", "classes": [0]}]},
        ),
        "assembly: classes an object": (
            "POST",
            asm,
            {"source_classes": [{"model_id": a, "classes": {"0": 1}}]},
        ),
        "assembly: class a float": (
            "POST",
            asm,
            {"source_classes": [{"model_id": a, "classes": [1.5]}]},
        ),
        "assembly: class a bool": (
            "POST",
            asm,
            {"source_classes": [{"model_id": a, "classes": [True]}]},
        ),
        "assembly: class null": (
            "POST",
            asm,
            {"source_classes": [{"model_id": a, "classes": [None]}]},
        ),
        "assembly: name a number": ("POST", asm, {"source_classes": [src], "name": 123}),
        "assembly: name 10k chars": ("POST", asm, {"source_classes": [src], "name": "n" * 10_000}),
        "assembly: eval ids strings": (
            "POST",
            asm,
            {"source_classes": [src], "eval_dataset_ids": ["x"]},
        ),
        "assembly: options a list": ("POST", asm, {"source_classes": [src], "options": []}),
        "assembly: form a number": ("POST", asm, {"source_classes": [src], "options": {"form": 3}}),
        "assembly: body a list": ("POST", asm, [src]),
        "assembly: body null": ("POST", asm, None),
        "assembly: body a string": ("POST", asm, "source_classes"),
        # huge numbers
        "assembly: model_id 10^30": (
            "POST",
            asm,
            {"source_classes": [{"model_id": HUGE, "classes": [0]}]},
        ),
        "assembly: model_id 2^63": (
            "POST",
            asm,
            {"source_classes": [{"model_id": BIG, "classes": [0]}]},
        ),
        "assembly: model_id -1": (
            "POST",
            asm,
            {"source_classes": [{"model_id": -1, "classes": [0]}]},
        ),
        "assembly: class index 10^30": (
            "POST",
            asm,
            {"source_classes": [{"model_id": a, "classes": [HUGE]}]},
        ),
        "assembly: class a 5000-digit string": (
            "POST",
            asm,
            {"source_classes": [{"model_id": a, "classes": ["9" * 5000]}]},
        ),
        "assembly: class a unicode digit": (
            "POST",
            asm,
            {"source_classes": [{"model_id": a, "classes": ["\u00b2"]}]},
        ),
        "assembly: class index -1": (
            "POST",
            asm,
            {"source_classes": [{"model_id": a, "classes": [-1]}]},
        ),
        "assembly: component_set_id 10^30": (
            "POST",
            asm,
            {"source_classes": [{"model_id": a, "classes": [0], "component_set_id": HUGE}]},
        ),
        "assembly: eval id 10^30": (
            "POST",
            asm,
            {"source_classes": [src], "eval_dataset_ids": [HUGE]},
        ),
        "assembly: model_id 1e308": (
            "POST",
            asm,
            b'{"source_classes":[{"model_id":1e308,"classes":[0]}]}',
        ),
        "assembly: model_id 1e999": (
            "POST",
            asm,
            b'{"source_classes":[{"model_id":1e999,"classes":[0]}]}',
        ),
        "assembly: model_id NaN": (
            "POST",
            asm,
            b'{"source_classes":[{"model_id":NaN,"classes":[0]}]}',
        ),
        "assembly: 100000-digit number": (
            "POST",
            asm,
            b'{"source_classes":[{"model_id":' + b"9" * 100_000 + b',"classes":[0]}]}',
        ),
        # unknown fields
        "assembly: unknown top-level field": ("POST", asm, {"source_classes": [src], "foo": 1}),
        "assembly: unknown source field": (
            "POST",
            asm,
            {"source_classes": [{**src, "weights": "x"}]},
        ),
        "assembly: unknown option": ("POST", asm, {"source_classes": [src], "options": {"lr": 1}}),
        # not JSON at all
        "assembly: truncated JSON": ("POST", asm, b'{"source_classes": [{"model_id": 1'),
        "assembly: invalid UTF-8": ("POST", asm, b'{"name": "\xff\xfe"}'),
        "assembly: empty body": ("POST", asm, b""),
        "assembly: 100000-deep nesting": ("POST", asm, b"[" * 100_000 + b"]" * 100_000),
        "assembly: 1000 sources": (
            "POST",
            asm,
            {"source_classes": [{"model_id": i, "classes": [0]} for i in range(1000)]},
        ),
        # locate
        "locate: dataset_id a string": ("POST", loc, {"dataset_id": "x"}),
        "locate: dataset_id 10^30": ("POST", loc, {"dataset_id": HUGE}),
        "locate: dataset_id 2^63": ("POST", loc, {"dataset_id": BIG}),
        "locate: samples 10^30": ("POST", loc, {"dataset_id": ds, "samples_per_class": HUGE}),
        "locate: alpha NaN": ("POST", loc, b'{"dataset_id": 1, "alpha": NaN}'),
        "locate: alpha Infinity": ("POST", loc, b'{"dataset_id": 1, "alpha": Infinity}'),
        "locate: beta -Infinity in a dict": (
            "POST",
            loc,
            b'{"dataset_id": 1, "beta": {"conv": -Infinity}}',
        ),
        "locate: alpha a list": ("POST", loc, {"dataset_id": ds, "alpha": [0.1]}),
        "locate: unknown field": ("POST", loc, {"dataset_id": ds, "gpu": True}),
        # predict (JSON)
        "predict: images a string": ("POST", "PREDICT", {"images": "abc"}),
        "predict: images numbers": ("POST", "PREDICT", {"images": [1, 2]}),
        "predict: images 10^30": ("POST", "PREDICT", {"images": [HUGE]}),
        "predict: images null": ("POST", "PREDICT", {"images": None}),
        "predict: unknown field": ("POST", "PREDICT", {"images": ["AAAA"], "model": "x"}),
        "predict: top_k 10^30": ("POST", "PREDICT", {"images": ["AAAA"], "top_k": HUGE}),
        "predict: top_k a string": ("POST", "PREDICT", {"images": ["AAAA"], "top_k": "all"}),
        "predict: top_k NaN": ("POST", "PREDICT", b'{"images": ["AAAA"], "top_k": NaN}'),
        "predict: 10000 images": ("POST", "PREDICT", {"images": ["AAAA"] * 10_000}),
        "predict: body a list": ("POST", "PREDICT", ["AAAA"]),
    }


def test_json_wrong_types_huge_numbers_unknown_fields(ready, traffic, results):
    http, ids = ready.http, ready.ids
    before = snapshot(ready.svc)
    predict = f"/api/v1/assemblies/{ids['assembly']}/predict"
    out = {}
    for name, (_method, url, body) in _body_cases(ids["a"], ids["b"], ids["dataset"]).items():
        url = predict if url == "PREDICT" else url
        if isinstance(body, bytes):
            r = http.post(url, content=body, headers={"content-type": "application/json"})
        else:
            r = http.post(
                url, content=json.dumps(body), headers={"content-type": "application/json"}
            )
        out[name] = f"{r.status_code} {check_4xx(r, name)[:100]}"
    assert snapshot(ready.svc) == before
    results["json bodies"] = out


def test_queries_paths_and_forms(ready, traffic, results, mnist_small):
    http, ids = ready.http, ready.ids
    before = snapshot(ready.svc)
    asm, a = ids["assembly"], ids["a"]
    out = {}
    for url in (
        f"/api/v1/models/{HUGE}",
        f"/api/v1/models/{BIG}",
        f"/api/v1/models/{2**31}",
        "/api/v1/models/-1",
        "/api/v1/models/abc",
        "/api/v1/models/1.5",
        "/api/v1/models/1e3",
        f"/api/v1/datasets/{HUGE}",
        f"/api/v1/jobs/{HUGE}",
        f"/api/v1/assemblies/{HUGE}",
        f"/api/v1/assemblies/{HUGE}/download",
        f"/api/v1/assemblies/{HUGE}/predict?image=AAAA",
        f"/api/v1/models/{HUGE}/components",
        f"/api/v1/models/{HUGE}/routes.svg",
        f"/api/v1/models/{a}/routes.svg?component_set_id={HUGE}",
        f"/api/v1/models/{a}/routes.svg?classes={HUGE}",
        f"/api/v1/models/{a}/routes.svg?classes={'x,' * 5000}",
        f"/api/v1/assemblies/{asm}/predict?image=AAAA&top_k={HUGE}",
        f"/api/v1/assemblies/{asm}/predict?image=AAAA&top_k=abc",
        f"/api/v1/assemblies/{asm}/predict?image=AAAA&top_k=-1",
        f"/api/v1/assemblies/{asm}/predict",
        "/api/v1/jobs?limit=-1",
        f"/api/v1/jobs?limit={HUGE}",
        "/api/v1/jobs?status=exploded",
        "/api/v1/jobs?status=queued%00",
    ):
        r = http.get(url)
        out[url[:90]] = f"{r.status_code} {check_4xx(r, url)[:100]}"
    for url in (f"/api/v1/models/{HUGE}", f"/api/v1/datasets/{HUGE}", f"/api/v1/assemblies/{BIG}"):
        r = http.delete(url)
        out["DELETE " + url] = f"{r.status_code} {check_4xx(r, url)[:100]}"
    spec = {"channels": 1, "height": 28, "width": 28, "mean": [0.1307], "std": [0.3081]}
    forms = {
        "model: dataset_id 10^30": {"dataset_id": str(HUGE)},
        "model: dataset_id abc": {"dataset_id": "abc"},
        "model: input_spec NaN mean": {"input_spec": json.dumps(dict(spec, mean=[math.nan]))},
        "model: input_spec Infinity std": {"input_spec": json.dumps(dict(spec, std=[math.inf]))},
        "model: input_spec huge channels": {"input_spec": json.dumps(dict(spec, channels=HUGE))},
        "model: input_spec 1e308 height": {"input_spec": json.dumps(dict(spec, height=1e308))},
        "model: input_spec a list": {"input_spec": "[1, 2, 3]"},
        "model: input_spec strings": {"input_spec": json.dumps(dict(spec, mean="abc"))},
        "model: input_spec unknown field": {"input_spec": json.dumps(dict(spec, gamma=2.2))},
        "model: class_names 10^30": {"class_names": json.dumps([HUGE] * 5)},
        "model: class_names nested": {"class_names": json.dumps([[1], [2], [3], [4], [5]])},
        "model: class_names 100000": {"class_names": json.dumps([str(i) for i in range(100_000)])},
        "model: name 10k chars": {"name": "n" * 10_000},
        "model: arch 10k chars": {"arch": "a" * 10_000},
    }
    weights = ready.root / "w.pt"
    if not weights.exists():
        import torch

        from lego_core import build_model
        from lego_core.spec import MNIST_SPEC

        torch.save(build_model("lenet", 5, MNIST_SPEC).state_dict(), weights)
    for name, over in forms.items():
        data = {
            "name": "m",
            "arch": "lenet",
            "class_names": json.dumps(list("abcde")),
            "input_spec": json.dumps(spec),
            **over,
        }
        r = http.post(
            "/api/v1/models", data=data, files={"weights": ("w.pt", weights.read_bytes())}
        )
        out[name] = f"{r.status_code} {check_4xx(r, name)[:100]}"
    for name, data in {
        "dataset: name empty": {"name": ""},
        "dataset: name 10k": {"name": "n" * 10_000},
        "dataset: path and archive": {"name": "x", "path": "mnist-test.tar.gz"},
    }.items():
        r = http.post(
            "/api/v1/datasets", data=data, files={"archive": ("m.tgz", io.BytesIO(mnist_small))}
        )
        out[name] = f"{r.status_code} {check_4xx(r, name)[:100]}"
    assert snapshot(ready.svc) == before
    results["queries, paths, forms"] = out


def test_zz_record(traffic, results, figures):
    s = traffic.summary()
    assert s["errors_5xx"] == 0, s
    figures.record(
        "hostile_input",
        **s,
        cases=sum(len(v) for v in results.values()),
        examples={k: dict(list(v.items())[:6]) for k, v in results.items()},
    )
