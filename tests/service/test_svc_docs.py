"""The page and the API docs are served by the app itself, with nothing from a CDN,
and the OpenAPI document declares Bearer auth (so Swagger UI's Authorize works).
The browser tests (test_svc_web.py) check the same pages rendered in Chromium."""

from __future__ import annotations

import re


def test_openapi_declares_bearer_auth_on_every_api_operation(api):
    doc = api.client.get("/openapi.json").json()
    scheme = doc["components"]["securitySchemes"]["bearerAuth"]
    assert scheme == {**scheme, "type": "http", "scheme": "bearer"}
    ops = [
        (path, op)
        for path, item in doc["paths"].items()
        for op in item.values()
        if path.startswith("/api/")
    ]
    assert len(ops) > 10
    for path, op in ops:
        assert op.get("security") == [{"bearerAuth": []}], path
    for path in ("/healthz", "/readyz", "/metrics"):
        assert "security" not in doc["paths"][path]["get"], path
    # The page's own routes are not API operations.
    assert "/" not in doc["paths"] and "/docs" not in doc["paths"]


def test_docs_and_page_load_nothing_from_other_hosts(api):
    for url in ("/docs", "/redoc", "/"):
        r = api.client.get(url)
        assert r.status_code == 200, url
        assert "default-src 'self'" in r.headers["content-security-policy"]
        sources = re.findall(r'(?:src|href)="([^"]+)"', r.text)
        assert sources, url
        assert all(s.startswith(("/", "#", "data:")) for s in sources), (url, sources)
        for s in sources:
            if s.startswith("/") and not s.startswith("/openapi"):
                assert api.client.get(s).status_code == 200, s
    assert "swagger-ui-bundle.js" in api.client.get("/docs").text
    assert "redoc.standalone.js" in api.client.get("/redoc").text


def test_ui_config_and_model_size(api, trained_lenets):
    from service_helpers import Http, register

    cfg = api.client.get("/ui/config").json()
    assert "lenet" in cfg["arches"] and "branches" in cfg["forms"]
    assert "discriminant" in cfg["scaling_methods"]
    http = Http(api.client, api.alice)
    m = register(http, trained_lenets.low, "low", ["0", "1", "2", "3", "4"]).json()
    size = http.get(f"/api/v1/models/{m['id']}/size").json()
    # LeNet-5 for 5 classes: 6*25+6 + 16*6*25+16 + 400*120+120 + 120*84+84 + 84*5+5
    assert size == {"model_id": m["id"], "params": 61_281, "flops": size["flops"]}
    assert size["flops"] > 2 * 61_281
    assert Http(api.client, api.bob).get(f"/api/v1/models/{m['id']}/size").status_code == 404
    assert api.client.get(f"/api/v1/models/{m['id']}/size").status_code == 401
