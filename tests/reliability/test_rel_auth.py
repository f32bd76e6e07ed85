"""API keys on every route of the API (enumerated from the app, so a new route is covered):
missing, malformed, revoked and another owner's keys. A key is never logged, never
returned after its creation, and never stored in clear."""

from __future__ import annotations

import json
import logging
from collections import Counter

import pytest
from fastapi.routing import APIRoute
from rel_helpers import Traffic
from service_helpers import JOURNEY_NEEDS, MNIST_SPEC_DICT, needs_lego

pytestmark = [needs_lego(*JOURNEY_NEEDS), pytest.mark.slow]

PUBLIC = {"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect"}
PUBLIC |= {"/redoc", "/v2", "/v2/health/live", "/v2/health/ready"}
PUBLIC |= {"/", "/ui/config"}  # the web page and what its forms offer


def routes(app) -> list[tuple[str, str]]:
    """(method, path) of every operation, from the app's OpenAPI schema and its routers."""
    out = {
        (m.upper(), p)
        for p, ops in app.openapi()["paths"].items()
        for m in ops
        if m != "parameters"
    }

    def walk(items):
        for r in items:
            if isinstance(r, APIRoute):
                path = r.path.replace(":path}", "}")  # {ref:path} is {ref} in OpenAPI
                out.update((m, path) for m in r.methods - {"HEAD", "OPTIONS"})
            elif hasattr(r, "routes"):
                walk(r.routes)

    walk(app.routes)
    return sorted(out)


def request_for(ready, method: str, path: str, owner_ids: dict) -> dict:
    """A request that would succeed for the owner (so only the key decides)."""
    ref = owner_ids["assembly_id"] if path.startswith("/api/v1/assemblies") else None
    url = path.format(**owner_ids, ref=ref or owner_ids["model_id"])
    kw: dict = {}
    if path.endswith("/predict"):
        if method == "GET":
            kw["params"] = {"image": "AAAA"}
        else:
            kw["json"] = {"images": ["AAAA"]}
    elif method == "PATCH":
        kw["json"] = {"aliases": []}
    elif path.endswith("/infer"):
        kw["json"] = {"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                  "data": [0.0] * 784}]}  # fmt: skip
    elif path.endswith("/locate"):
        kw["json"] = {"dataset_id": owner_ids["dataset_id"]}
    elif path == "/api/v1/assemblies" and method == "POST":
        kw["json"] = {"source_classes": [{"model_id": owner_ids["model_id"], "classes": [0]}]}
    elif path == "/api/v1/models" and method == "POST":
        kw["data"] = {
            "name": "m",
            "arch": "lenet",
            "class_names": json.dumps(list("abcde")),
            "input_spec": json.dumps(MNIST_SPEC_DICT),
            "dataset_id": str(owner_ids["dataset_id"]),
        }
        kw["files"] = {"weights": ("w.pt", b"not a model")}
    elif path == "/api/v1/datasets" and method == "POST":
        kw["data"] = {"name": "d"}
        kw["files"] = {"archive": ("d.tgz", b"not an archive")}
    return {"method": method, "url": url, **kw}


@pytest.fixture(scope="module")
def setup(ready):
    from app.auth import create_key, revoke_key

    with ready.svc.catalog.session() as s:
        revoked = create_key(s, "alice-old", "alice")
    with ready.svc.catalog.session() as s:
        assert revoke_key(s, "alice-old") == 1
    ids = {
        "model_id": ready.ids["a"],
        "dataset_id": ready.ids["dataset"],
        "assembly_id": ready.ids["assembly"],
        "job_id": ready.ids["assembly_job"],
        "name": ready.ids["assembly"],  # v2 {name}: an id works too
        "version": 1,
    }
    return {"revoked": revoked, "ids": ids}


def test_every_route_checks_the_key(ready, setup, figures, caplog):
    caplog.set_level(logging.DEBUG)
    app = ready.client.app
    all_routes = routes(app)
    api_routes = [(m, p) for m, p in all_routes if p not in PUBLIC]
    assert len(api_routes) >= 17, api_routes
    assert all(p.startswith(("/api/v1/", "/v2/models/")) for _, p in api_routes)
    keys = ready.keys
    valid = keys["alice"]
    malformed = {
        "no header": None,
        "empty": "",
        "Bearer only": "Bearer",
        "Bearer and spaces": "Bearer    ",
        "Basic scheme": "Basic " + valid,
        "Token scheme": "Token " + valid,
        "key without scheme": valid,
        "key with junk after": f"Bearer {valid}x",
        "key cut short": f"Bearer {valid[:-1]}",
        "two keys": f"Bearer {valid} {valid}",
        "10 KB key": "Bearer " + "k" * 10_000,
        "revoked": f"Bearer {setup['revoked']}",
        "made-up lego key": "Bearer lego_" + "A" * 43,
    }
    traffic = Traffic()
    traffic.attach(ready.client)
    seen_bodies: list[str] = []
    try:
        for method, path in api_routes:
            req = request_for(ready, method, path, setup["ids"])
            for name, header in malformed.items():
                headers = {} if header is None else {"Authorization": header}
                r = ready.client.request(headers=headers, **req)
                assert r.status_code == 401, (method, path, name, r.status_code, r.text[:200])
                assert r.headers.get("www-authenticate") == "Bearer", (method, path, name)
                seen_bodies.append(r.text + json.dumps(dict(r.headers)))
            # another owner: 404 for alice's resources, empty lists, nothing of hers
            r = ready.client.request(headers={"Authorization": f"Bearer {keys['bob']}"}, **req)
            seen_bodies.append(r.text + json.dumps(dict(r.headers)))
            if "{" in path or path.endswith("/locate"):
                assert r.status_code == 404, (method, path, r.status_code, r.text[:200])
            elif method == "GET":
                assert r.status_code == 200 and r.json() == [], (path, r.text[:200])
            elif path in ("/api/v1/assemblies", "/api/v1/models"):
                assert r.status_code == 404, (method, path, r.status_code, r.text[:200])
            else:  # POST /datasets: bob's own (bad) upload
                assert r.status_code == 422, (method, path, r.status_code, r.text[:200])
            if method == "DELETE":
                continue  # the owner's key would delete the fixture's resources
            # the owner, for contrast: never a 401
            r = ready.client.request(headers={"Authorization": f"Bearer {valid}"}, **req)
            seen_bodies.append(r.text + json.dumps(dict(r.headers)))
            assert r.status_code not in (401, 403, 404), (method, path, r.status_code, r.text)
    finally:
        traffic.detach(ready.client)
    ready.settle()

    # Keys are never returned, logged or stored in clear.
    secrets = [keys["alice"], keys["bob"], setup["revoked"]]
    for text in seen_bodies:
        for k in secrets:
            assert k not in text
    logged = "\n".join(r.getMessage() for r in caplog.records) + caplog.text
    for k in secrets:
        assert k not in logged
    from sqlalchemy import text as sql

    with ready.svc.catalog.session() as s:
        dump = json.dumps([list(map(str, row)) for row in s.execute(sql("SELECT * FROM api_keys"))])
    for k in secrets:
        assert k not in dump
    s = traffic.summary()
    figures.record(
        "auth",
        routes=len(api_routes),
        key_variants=len(malformed) + 2,
        **s,
        keys_found_in_responses_logs_or_catalog=0,
        by_route={f"{m} {p}": len(malformed) + 2 for m, p in api_routes},
    )
    assert s["errors_5xx"] == 0


def test_cli_never_shows_a_key_again(ready, tmp_path, monkeypatch, capsys):
    from app.cli import main
    from app.settings import get_settings

    monkeypatch.setenv("LEGO_VAR_DIR", str(tmp_path))
    monkeypatch.delenv("LEGO_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    try:
        assert main(["keys", "create", "carol"]) == 0
        key = capsys.readouterr().out.strip()
        assert main(["keys", "list"]) == 0
        listing = capsys.readouterr().out
        assert "carol" in listing and key not in listing and key[:12] in listing
        assert main(["keys", "revoke", "carol"]) == 0
        out = capsys.readouterr()
        assert key not in out.out + out.err
    finally:
        get_settings.cache_clear()
    assert Counter(key)  # a real key was printed once
