"""Health, readiness, metrics, OpenAPI, API keys and the CLI's key commands."""

from __future__ import annotations

from fastapi.testclient import TestClient
from service_helpers import make_settings

from app.catalog import upgrade
from app.cli import main
from app.main import create_app


def test_health_ready_metrics_docs(api):
    c = api.client
    assert c.get("/healthz").json() == {"status": "ok"}
    r = c.get("/readyz")
    assert r.status_code == 200, r.text
    assert set(r.json()["checks"]) == {"database", "broker", "storage"}
    api.get("/api/v1/models")
    text = c.get("/metrics").text
    for series in (
        'lego_http_requests_total{method="GET",route="/api/v1/models",status="200"}',
        'lego_http_request_duration_seconds_bucket{le="0.005",method="GET",route="/api/v1/models"}',
        'lego_jobs{kind="locate",state="queued"} 0.0',
        "lego_predict_batch_size_bucket",
    ):
        assert series in text, series
    assert c.get("/docs").status_code == 200
    paths = c.get("/openapi.json").json()["paths"]
    for p in (
        "/api/v1/models",
        "/api/v1/datasets",
        "/api/v1/assemblies",
        "/api/v1/assemblies/{ref}/predict",
        "/api/v1/jobs/{job_id}",
        "/api/v1/models/{ref}/routes.svg",
    ):
        assert p in paths


def test_readyz_503_when_broker_unreachable(tmp_path):
    settings = make_settings(tmp_path, broker_url="redis://127.0.0.1:1/0")
    upgrade(settings.resolved_database_url)
    with TestClient(create_app(settings, background=False)) as c:
        r = c.get("/readyz")
        assert r.status_code == 503
        body = r.json()
        assert body["checks"]["broker"]["ok"] is False
        assert body["checks"]["database"]["ok"] is True


def test_readyz_503_when_disk_nearly_full(tmp_path):
    settings = make_settings(tmp_path, min_free_disk_bytes=1 << 62)  # more than any disk has
    upgrade(settings.resolved_database_url)
    with TestClient(create_app(settings, background=False)) as c:
        r = c.get("/readyz")
        assert r.status_code == 503
        storage = r.json()["checks"]["storage"]
        assert storage["ok"] is False and "under the" in storage["detail"]
        assert storage["free_bytes"] > 0


def test_readyz_503_when_database_unreachable(tmp_path):
    settings = make_settings(tmp_path, database_url="postgresql+psycopg://nobody@127.0.0.1:1/none")
    with TestClient(create_app(settings, background=False)) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["database"]["ok"] is False
        # Requests that need the catalog say so instead of failing with a 500.
        r = c.get("/api/v1/models", headers={"Authorization": "Bearer x"})
        assert r.status_code == 503


def test_keys_are_required_and_checked(api):
    c = api.client
    assert c.get("/api/v1/models").status_code == 401
    r = c.get("/api/v1/models", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["detail"] == "invalid or revoked API key"
    assert c.get("/api/v1/models", headers={"Authorization": "Basic abc"}).status_code == 401
    assert api.get("/api/v1/models").json() == []
    assert api.get("/api/v1/jobs/12345").status_code == 404


def test_cli_keys_create_list_revoke(tmp_path, monkeypatch, capsys):
    from app.settings import get_settings

    monkeypatch.setenv("LEGO_VAR_DIR", str(tmp_path))
    monkeypatch.delenv("LEGO_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    try:
        assert main(["keys", "create", "carol"]) == 0
        key = capsys.readouterr().out.strip()
        assert key.startswith("lego_")
        settings = make_settings(tmp_path, database_url="")
        with TestClient(create_app(settings)) as c:
            h = {"Authorization": f"Bearer {key}"}
            assert c.get("/api/v1/models", headers=h).status_code == 200
            assert main(["keys", "list"]) == 0
            listing = capsys.readouterr().out
            assert "carol" in listing and key not in listing
            assert main(["keys", "revoke", key]) == 0
            assert c.get("/api/v1/models", headers=h).status_code == 401
            assert main(["keys", "revoke", key]) == 1
    finally:
        get_settings.cache_clear()


def test_lego_serve_embedded_prints_url_and_key(tmp_path):
    """`lego serve` on a fresh machine: migrations, a key printed once, the API up."""
    import httpx
    from service_helpers import Proc, free_port, service_env

    port = free_port()
    env = service_env(var_dir=tmp_path / "var")
    proc = Proc(["serve", "--port", str(port)], env, tmp_path / "serve.log")
    try:
        proc.wait_for("Uvicorn running", timeout=120)
        out = proc.output()
        assert f"http://127.0.0.1:{port}" in out
        key = out.split("API key (created now, shown once): ")[1].split()[0]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
            assert c.get("/readyz").status_code == 200
            r = c.get("/api/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200 and r.json() == []
    finally:
        proc.stop()
    assert (tmp_path / "var" / "lego.db").is_file()
    # A second start keeps the catalog and prints no new key.
    again = Proc(["serve", "--port", str(port)], env, tmp_path / "serve2.log")
    try:
        again.wait_for("Uvicorn running", timeout=120)
        assert "API key" not in again.output()
    finally:
        again.stop()


def test_streamed_body_over_the_limit_is_413(api):
    """A chunked upload (no Content-Length) is counted while it streams in."""
    api.svc.settings.max_request_bytes = 10_000
    chunks = (b'{"source_classes": [' + b" " * 1000 for _ in range(20))
    r = api.post("/api/v1/assemblies", content=chunks, headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert "limit" in r.json()["detail"]
    r = api.post(
        "/api/v1/assemblies", content=b"x" * 20_000, headers={"content-type": "application/json"}
    )
    assert r.status_code == 413


def test_every_error_is_a_problem_details_document(api):
    """RFC 9457: type, title, status, a human-readable detail and a stable code."""
    cases = [
        (api.get("/api/v1/models/999"), 404, "not-found"),
        (api.client.get("/api/v1/models"), 401, "unauthorized"),
        (api.client.get("/nowhere"), 404, "not-found"),
        (api.client.put("/api/v1/jobs", headers=api.alice), 405, "method-not-allowed"),
        (api.post("/api/v1/assemblies", json={"source_classes": [{}]}), 422, "validation-failed"),
        (api.get("/api/v1/models", params={"limit": 0}), 422, "validation-failed"),
        (api.get("/api/v1/models/a@b@c"), 404, "not-found"),
    ]
    for r, status, code in cases:
        assert r.status_code == status, r.text
        assert r.headers["content-type"] == "application/problem+json"
        body = r.json()
        assert body["status"] == status and body["code"] == code, body
        assert body["type"] == f"urn:model-lego:problem:{code}" and body["title"]
        assert isinstance(body["detail"], str) and body["detail"]
    assert cases[1][0].headers["www-authenticate"] == "Bearer"
    invalid = cases[4][0].json()
    assert "source_classes.0.model_id: Field required" in invalid["detail"]
    assert {tuple(e["loc"]) for e in invalid["errors"]} >= {
        ("body", "source_classes", 0, "model_id"),
        ("body", "source_classes", 0, "classes"),
    }


def test_openapi_documents_each_operation_and_its_own_errors(api):
    doc = api.client.get("/openapi.json").json()
    ops = [
        (path, method, op)
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if path.startswith(("/api/v1", "/v2/models"))
    ]
    assert len(ops) > 25
    for path, method, op in ops:
        assert op.get("tags") and op.get("description"), (method, path)
        assert "401" in op["responses"], (method, path)
    responses = {(p, m): set(op["responses"]) for p, m, op in ops}
    assert responses[("/api/v1/models", "get")] == {"200", "401", "422", "503"}
    assert {"413", "507"} <= responses[("/api/v1/models", "post")]
    assert "404" not in responses[("/api/v1/models", "post")]
    assert "415" in responses[("/api/v1/assemblies/{ref}/predict", "post")]
    problem = doc["components"]["schemas"]["Problem"]
    assert {"type", "title", "status", "detail", "code"} <= set(problem["required"])
    out = doc["components"]["schemas"]["AssemblyOut"]["properties"]
    assert out["options"] == {"$ref": "#/components/schemas/AssemblyOptions"}
    assert out["classes"]["items"] == {"$ref": "#/components/schemas/AssemblyClass"}
    assert "AssemblyMetrics" in str(out["metrics"])
    assert "example" in doc["components"]["schemas"]["AssemblyIn"]


def test_readyz_reports_whether_a_worker_is_alive(tmp_path, redis_url, capsys):
    """Full stack: /readyz is 503 until a worker's beacon is in Redis, and `lego workers`
    (the worker container's healthcheck) says the same."""
    from worker.beacon import Beacon, this_host

    settings = make_settings(tmp_path, broker_url=redis_url)
    upgrade(settings.resolved_database_url)
    with TestClient(create_app(settings, background=False)) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["broker"]["ok"] is True
        assert "no worker is alive" in r.json()["checks"]["workers"]["detail"]
        beacon = Beacon(settings).start()
        try:
            r = c.get("/readyz")
            assert r.status_code == 200, r.text
            assert r.json()["checks"]["workers"]["alive"] == [beacon.key.split(":", 2)[2]]
        finally:
            beacon.stop()
    env = {"LEGO_BROKER_URL": redis_url, "LEGO_VAR_DIR": str(tmp_path)}
    with _env(env):
        assert main(["workers", "--this-host"]) == 0
        assert this_host() in capsys.readouterr().out


def test_cli_uses_the_checkouts_catalog_from_any_folder(tmp_path, monkeypatch, capsys):
    """`lego keys create` run elsewhere writes to the catalog `make run` serves (var/ of
    the checkout, not ./var), and says which catalog it wrote to."""
    from pathlib import Path

    from app.settings import Settings

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LEGO_VAR_DIR", raising=False)
    monkeypatch.delenv("LEGO_DATABASE_URL", raising=False)
    checkout = Path(__file__).resolve().parents[2]
    assert Settings().resolved_database_url == f"sqlite:///{checkout / 'var' / 'lego.db'}"
    with _env({"LEGO_VAR_DIR": str(tmp_path / "elsewhere")}):
        assert main(["keys", "create", "dave"]) == 0
    err = capsys.readouterr().err
    assert f"in catalog sqlite:///{tmp_path / 'elsewhere' / 'lego.db'}" in err
    assert not (tmp_path / "var").exists()


def _env(values: dict):
    import contextlib
    import os

    from app.settings import get_settings

    @contextlib.contextmanager
    def cm():
        old = {k: os.environ.get(k) for k in values}
        os.environ.update(values)
        get_settings.cache_clear()
        try:
            yield
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            get_settings.cache_clear()

    return cm()
