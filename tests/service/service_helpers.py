"""Helpers and fixtures of the service tests: settings in tmp dirs, an embedded app, small datasets,
two tiny trained LeNets, and (for `fullstack`) a fresh PostgreSQL database and Redis DB."""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from processes import REPO, Proc, free_port  # noqa: F401 - re-exported to the tests

PG_ADMIN_URL = os.environ.get("LEGO_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_HOST = os.environ.get("LEGO_TEST_REDIS", "127.0.0.1:6379")
MNIST_SPEC_DICT = {"channels": 1, "height": 28, "width": 28, "mean": [0.1307], "std": [0.3081]}

# Keep lego_core's decoded-dataset cache out of the user's home.
os.environ.setdefault(
    "LEGO_CACHE_DIR", str(Path(os.environ.get("TMPDIR", "/tmp")) / "lego-test-cache")
)


def lego_core_has(*names: str) -> str | None:
    """None when lego_core exports every name, else the first missing one."""
    try:
        import lego_core
    except ImportError:
        return names[0]
    for n in names:
        mod, _, attr = n.rpartition(".")
        target = lego_core
        if mod:
            try:
                import importlib

                target = importlib.import_module(f"lego_core.{mod}")
            except ImportError:
                return n
        if not hasattr(target, attr):
            return n
    return None


def needs_lego(*names: str):
    missing = lego_core_has(*names)
    return pytest.mark.skipif(missing is not None, reason=f"waiting for lego_core.{missing}")


# --------------------------------------------------------------------------- data


def data_dir() -> Path:
    env = os.environ.get("LEGO_DATA_DIR")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = data_dir()
    if not (d / "mnist-test.tar.gz").is_file():
        pytest.skip(f"shared data not found in {d} (set LEGO_DATA_DIR)")
    return d


def pick_members(
    archive: Path, per_class: int, classes: set[str] | None = None, skip: int = 0
) -> dict[str, list[tuple[str, bytes]]]:
    """The first `per_class` images (after `skip`) of each class of an ImageFolder tar.gz."""
    out: dict[str, list[tuple[str, bytes]]] = {}
    seen: dict[str, int] = {}
    with tarfile.open(archive, "r:gz") as tf:
        for m in tf:
            if not m.isfile():
                continue
            parts = m.name.split("/")
            if len(parts) < 3:
                continue
            cls = parts[-2]
            if classes is not None and cls not in classes:
                continue
            n = seen.get(cls, 0)
            seen[cls] = n + 1
            if n < skip or len(out.get(cls, [])) >= per_class:
                continue
            out.setdefault(cls, []).append((parts[-1], tf.extractfile(m).read()))
    return out


def make_tar_gz(members: dict[str, list[tuple[str, bytes]]], top: str | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for cls in sorted(members):
            for name, blob in members[cls]:
                path = f"{top}/{cls}/{name}" if top else f"{cls}/{name}"
                info = tarfile.TarInfo(path)
                info.size = len(blob)
                info.mtime = 0
                tf.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


@pytest.fixture(scope="session")
def mnist_members(shared_data) -> dict[str, list[tuple[str, bytes]]]:
    """20 test images per digit (read once)."""
    return pick_members(shared_data / "mnist-test.tar.gz", 20)


@pytest.fixture(scope="session")
def mnist_small(mnist_members) -> bytes:
    """A tar.gz ImageFolder of 20 MNIST test images per digit."""
    return make_tar_gz(mnist_members, top="test")


@pytest.fixture(scope="session")
def digits(mnist_members) -> dict[str, bytes]:
    """One PNG test image of each digit."""
    return {c: imgs[0][1] for c, imgs in mnist_members.items()}


# --------------------------------------------------------------------------- models


@dataclass
class TrainedModels:
    low: Path  # digits 0-4
    high: Path  # digits 5-9


@pytest.fixture(scope="session")
def trained_lenets(shared_data, tmp_path_factory) -> TrainedModels:
    """Two LeNets trained one epoch on 300 MNIST training images a digit: 0-4 and 5-9."""
    missing = lego_core_has("build_model", "load_image_folder", "train.train")
    if missing:
        pytest.skip(f"waiting for lego_core.{missing}")
    import torch

    from lego_core import build_model, load_image_folder
    from lego_core.spec import MNIST_SPEC
    from lego_core.train import train

    out = tmp_path_factory.mktemp("lenets")
    paths = []
    for n, classes in enumerate((["0", "1", "2", "3", "4"], ["5", "6", "7", "8", "9"])):
        torch.manual_seed(n)
        data = load_image_folder(
            shared_data / "mnist-train.tar.gz", MNIST_SPEC, classes=classes, per_class_limit=300
        )
        model = build_model("lenet", 5, MNIST_SPEC)
        trained = train(model, data, MNIST_SPEC, epochs=1, seed=n)
        if isinstance(trained, torch.nn.Module):
            model = trained
        p = out / f"lenet-{n}.pt"
        torch.save(model.state_dict(), p)
        paths.append(p)
    return TrainedModels(*paths)


# --------------------------------------------------------------------------- app


def make_settings(root: Path, **over):
    from app.settings import Settings

    kw = dict(
        var_dir=root,
        database_url=f"sqlite:///{root / 'lego.db'}",
        broker_url="",
        storage_dir=root / "artifacts",
        job_heartbeat_s=0.2,
        job_stale_s=2.0,
        reaper_interval_s=0.3,
        runner_poll_s=0.05,
        job_retry_delay_s=0.1,
        device="cpu",
        min_free_disk_bytes=1 << 20,  # the shared test disk may run low; see test_readyz_*
    )
    kw.update(over)
    return Settings(**kw)


@dataclass
class Api:
    client: object
    svc: object
    alice: dict
    bob: dict

    def _h(self, who: str, kw: dict) -> dict:
        return {**getattr(self, who), **kw.pop("headers", {})}

    def get(self, url, who="alice", **kw):
        return self.client.get(url, headers=self._h(who, kw), **kw)

    def post(self, url, who="alice", **kw):
        return self.client.post(url, headers=self._h(who, kw), **kw)

    def delete(self, url, who="alice", **kw):
        return self.client.delete(url, headers=self._h(who, kw), **kw)

    def wait_job(self, job_id: int, who="alice", timeout: float = 180.0) -> dict:
        return wait_job(lambda: self.get(f"/api/v1/jobs/{job_id}", who).json(), timeout)


def wait_job(fetch, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = fetch()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job did not finish: {job}")
        time.sleep(0.1)


def add_keys(catalog) -> tuple[dict, dict]:
    from app.auth import create_key

    with catalog.session() as s:
        a = create_key(s, "alice")
        b = create_key(s, "bob")
    return {"Authorization": f"Bearer {a}"}, {"Authorization": f"Bearer {b}"}


@pytest.fixture
def settings(tmp_path, shared_data):
    return make_settings(tmp_path, data_dir=shared_data)


@pytest.fixture
def api(settings) -> Iterator[Api]:
    """An embedded-mode app (SQLite, local storage, in-process runner) and two keys."""
    from fastapi.testclient import TestClient

    from app.catalog import upgrade
    from app.main import create_app

    upgrade(settings.resolved_database_url)
    app = create_app(settings)
    svc = app.state.services
    alice, bob = add_keys(svc.catalog)
    with TestClient(app) as client:
        yield Api(client, svc, alice, bob)
    svc.catalog.dispose()


def snapshot(svc) -> tuple:
    """Row counts of every table and every file in storage (objects and temp files)."""
    from sqlalchemy import func, select

    from app.catalog import Base

    with svc.catalog.session() as s:
        counts = {
            t.name: s.scalar(select(func.count()).select_from(t))
            for t in Base.metadata.sorted_tables
        }
    files = sorted(
        str(p.relative_to(svc.storage.root))
        for p in svc.storage.root.rglob("*")
        if p.is_file() and "work" not in p.relative_to(svc.storage.root).parts
    )
    return counts, files


# --------------------------------------------------------------------------- full stack


@contextlib.contextmanager
def fresh_pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database `lego_test_<random>`, dropped afterwards."""
    try:
        import psycopg

        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3)
    except Exception as exc:
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}")
    name = f"lego_test_{secrets.token_hex(6)}"
    admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        from app.catalog import _catalogs

        for url in [u for u in _catalogs if u.endswith(f"/{name}")]:
            _catalogs.pop(url).dispose()
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@contextlib.contextmanager
def fresh_redis_db() -> Iterator[str]:
    """A Redis database number of its own, flushed before and after."""
    try:
        import redis

        host, port = REDIS_HOST.split(":")
        db = 1 + secrets.randbelow(15)
        r = redis.Redis(host=host, port=int(port), db=db, socket_connect_timeout=3)
        r.ping()
    except Exception as exc:
        pytest.skip(f"Redis not reachable at {REDIS_HOST}: {exc}")
    r.flushdb()
    try:
        yield f"redis://{REDIS_HOST}/{db}"
    finally:
        r.flushdb()
        r.close()


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_pg_database() as url:
        yield url


@pytest.fixture
def redis_url() -> Iterator[str]:
    with fresh_redis_db() as url:
        yield url


def service_env(**values) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEGO_")}
    env["LEGO_CACHE_DIR"] = os.environ["LEGO_CACHE_DIR"]
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    env.update({f"LEGO_{k.upper()}": str(v) for k, v in values.items()})
    return env


# --------------------------------------------------------------------------- the journey

JOURNEY_NEEDS = (
    "load_source_model",
    "locate",
    "Components",
    "Part",
    "assemble",
    "export_model",
    "load_exported",
    "evaluate_assembly",
    "render_routes",
    "train.train",
)


class Http:
    """get/post/delete with one key's header, over a TestClient or an httpx.Client."""

    def __init__(self, client, headers: dict) -> None:
        self.client, self.headers = client, headers

    def _h(self, kw: dict) -> dict:
        return {**self.headers, **kw.pop("headers", {})}

    def get(self, url, **kw):
        return self.client.get(url, headers=self._h(kw), **kw)

    def post(self, url, **kw):
        return self.client.post(url, headers=self._h(kw), **kw)

    def delete(self, url, **kw):
        return self.client.delete(url, headers=self._h(kw), **kw)

    def patch(self, url, **kw):
        return self.client.patch(url, headers=self._h(kw), **kw)

    def wait_job(self, job_id: int, timeout: float = 240.0) -> dict:
        return wait_job(lambda: self.get(f"/api/v1/jobs/{job_id}").json(), timeout)

    def wait_assembly(self, assembly_id: int, timeout: float = 240.0) -> dict:
        return wait_job(lambda: self.get(f"/api/v1/assemblies/{assembly_id}").json(), timeout)


def b64url(blob: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(blob).decode().rstrip("=")


def register(http: Http, weights: Path, name: str, classes: list[str], dataset_id=None):
    import json

    data = {
        "name": name,
        "arch": "lenet",
        "class_names": json.dumps(classes),
        "input_spec": json.dumps(MNIST_SPEC_DICT),
    }
    if dataset_id is not None:
        data["dataset_id"] = str(dataset_id)
    return http.post(
        "/api/v1/models", data=data, files={"weights": (weights.name, weights.read_bytes())}
    )


def run_journey(
    http: Http, lenets: TrainedModels, mnist_small: bytes, digits: dict, tmp: Path
) -> dict:
    """The user journey over HTTP; returns the ids it made. Asserts along the way."""

    r = http.post(
        "/api/v1/datasets",
        data={"name": "mnist-small"},
        files={"archive": ("mnist-small.tar.gz", mnist_small)},
    )
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["classes"] == {str(i): 20 for i in range(10)}

    # Model A locates at registration (dataset_id); model B through /locate.
    r = register(http, lenets.low, "lenet-0-4", ["0", "1", "2", "3", "4"], ds["id"])
    assert r.status_code == 201, r.text
    a = r.json()
    assert a["arch"] == "lenet" and a["class_names"] == ["0", "1", "2", "3", "4"]
    assert a["locate_job_id"]
    r = register(http, lenets.high, "lenet-5-9", ["5", "6", "7", "8", "9"])
    assert r.status_code == 201, r.text
    b = r.json()
    r = http.post(
        f"/api/v1/models/{b['id']}/locate", json={"dataset_id": ds["id"], "samples_per_class": 10}
    )
    assert r.status_code == 202, r.text
    b_job = r.json()["job_id"]
    for job_id in (a["locate_job_id"], b_job):
        job = http.wait_job(job_id)
        assert job["status"] == "succeeded", job
        assert job["progress"] == 1.0 and job["started_at"] and job["finished_at"]

    comps = http.get(f"/api/v1/models/{a['id']}/components").json()
    assert [c["class_name"] for c in comps["classes"]] == ["0", "1", "2", "3", "4"]
    first = comps["classes"][0]
    assert first["layers"] and first["params"] > 0 and first["flops"] > 0
    assert first["dataset_id"] == ds["id"] and "samples_per_class" in first["parameters"]
    for kept, total in first["layers"].values():
        assert 0 <= kept <= total
    comps_b = http.get(f"/api/v1/models/{b['id']}/components").json()
    assert comps_b["classes"][0]["parameters"]["samples_per_class"] == 10

    r = http.get(f"/api/v1/models/{a['id']}/routes.svg", params={"classes": "0,3"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("image/svg+xml") and "<svg" in r.text

    # Assemble classes 0 and 3 of A (by name and by index) with 7 and 9 of B.
    body = {
        "name": "digits-0379",
        "source_classes": [
            {"model_id": a["id"], "classes": ["0", 3]},
            {"model_id": b["id"], "classes": ["7", "9"]},
        ],
        "eval_dataset_ids": [ds["id"]],
    }
    r = http.post("/api/v1/assemblies", json=body)
    assert r.status_code == 202, r.text
    asm = r.json()
    assert asm["job_id"] and asm["status"] in ("queued", "running", "succeeded")
    asm = http.wait_assembly(asm["id"])
    assert asm["status"] == "succeeded", asm
    assert asm["progress"] == 1.0 and asm["error"] is None
    assert [(c["source_model_id"], c["source_class"]) for c in asm["classes"]] == [
        (a["id"], "0"),
        (a["id"], "3"),
        (b["id"], "7"),
        (b["id"], "9"),
    ]
    m = asm["metrics"]
    for key in ("accuracy", "base_accuracy", "params", "flops"):
        assert key in m, m
    # lego_core reports accuracies in percent (as the paper does).
    assert 50.0 <= m["accuracy"] <= 100.0 and m["params"] > 0 and m["flops"] > 0

    # Download; the file loads with plain torch in a process without this project.
    r = http.get(f"/api/v1/assemblies/{asm['id']}/download")
    assert r.status_code == 200
    model_file = tmp / "assembled.pt"
    model_file.write_bytes(r.content)
    code = (
        "import sys, torch; ep = torch.export.load(sys.argv[1]); "
        "out = ep.module()(torch.rand(2, 1, 28, 28)); print(tuple(out.shape))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    done = subprocess.run(
        [sys.executable, "-I", "-c", code, str(model_file)],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(2, 4)"

    names = [c["name"] for c in asm["classes"]]
    r = http.get(
        f"/api/v1/assemblies/{asm['id']}/predict", params={"image": b64url(digits["3"]), "top_k": 3}
    )
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 1 and len(preds[0]) == 3
    assert all(p["class"] in names for p in preds[0])
    probs = [p["probability"] for p in preds[0]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001

    files = [("images", (f"{d}.png", digits[d], "image/png")) for d in ("0", "7", "9")]
    r = http.post(f"/api/v1/assemblies/{asm['id']}/predict", files=files, params={"top_k": 2})
    assert r.status_code == 200, r.text
    assert [len(p) for p in r.json()["predictions"]] == [2, 2, 2]
    r = http.post(
        f"/api/v1/assemblies/{asm['id']}/predict",
        json={"images": [b64url(digits["0"]), b64url(digits["9"])]},
    )
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 2

    r = http.delete(f"/api/v1/models/{a['id']}")
    assert r.status_code == 409 and r.json()["code"] == "model-in-use"
    return {
        "dataset": ds["id"],
        "a": a["id"],
        "b": b["id"],
        "assembly": asm["id"],
        "body": body,
        "names": names,
        "assembly_job": asm["job_id"],
    }
