"""Helpers of the reliability tests: figures written to a JSON report, request counting,
memory sampling, a catalog/storage audit, hostile images, an embedded app that holds an
assembled model, and the full stack (PostgreSQL + Redis + `lego serve` + `lego worker`)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import secrets
import statistics
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
from service_helpers import (
    REPO,
    Http,
    Proc,
    add_keys,
    free_port,
    fresh_redis_db,
    make_settings,
    register,
    service_env,
    wait_job,
)

FIGURES_FILE = Path(
    os.environ.get("LEGO_REL_FIGURES", str(REPO / ".cache" / "reliability" / "last_run.json"))
)


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


# --------------------------------------------------------------------------- figures


class Figures:
    """Figures of this run, by test; merged into FIGURES_FILE at the end of the session."""

    def __init__(self) -> None:
        self.sections: dict[str, dict] = {}
        self._lock = threading.Lock()

    def record(self, name: str, **values) -> dict:
        with self._lock:
            section = self.sections.setdefault(name, {})
            section.update(values)
            section["recorded_at"] = datetime.now(UTC).isoformat(timespec="seconds")
            return section

    def write(self) -> None:
        if not self.sections:
            return
        FIGURES_FILE.parent.mkdir(parents=True, exist_ok=True)
        try:
            old = json.loads(FIGURES_FILE.read_text())
        except (OSError, ValueError):
            old = {}
        old.update(self.sections)
        tmp = FIGURES_FILE.with_suffix(".tmp")
        tmp.write_text(json.dumps(dict(sorted(old.items())), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, FIGURES_FILE)


@pytest.fixture(scope="session")
def figures() -> Iterator[Figures]:
    f = Figures()
    yield f
    f.write()


class Traffic:
    """Counts the responses of httpx clients (TestClient included) by status."""

    def __init__(self) -> None:
        self.by_status: Counter[int] = Counter()
        self.latencies: list[float] = []
        self._lock = threading.Lock()

    def attach(self, client) -> None:
        client.event_hooks.setdefault("response", []).append(self._on_response)

    def detach(self, client) -> None:
        hooks = client.event_hooks.get("response", [])
        if self._on_response in hooks:
            hooks.remove(self._on_response)
        client.event_hooks["response"] = hooks

    def _on_response(self, response) -> None:
        self.add(response.status_code)

    def add(self, status: int, latency: float | None = None) -> None:
        with self._lock:
            self.by_status[status] += 1
            if latency is not None:
                self.latencies.append(latency)

    @property
    def requests(self) -> int:
        return sum(self.by_status.values())

    def summary(self) -> dict:
        with self._lock:
            out = {
                "requests": sum(self.by_status.values()),
                "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
                "errors_5xx": sum(v for k, v in self.by_status.items() if k >= 500),
            }
            if self.latencies:
                out.update(latency_summary(self.latencies))
            return out


def latency_summary(values: list[float]) -> dict:
    xs = sorted(values)

    def pct(p: float) -> float:
        return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]

    return {
        "latency_ms": {
            "p50": round(pct(50) * 1000, 1),
            "p90": round(pct(90) * 1000, 1),
            "p99": round(pct(99) * 1000, 1),
            "max": round(xs[-1] * 1000, 1),
            "mean": round(statistics.fmean(xs) * 1000, 1),
        }
    }


# --------------------------------------------------------------------------- memory


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of a process (this one by default), from /proc."""
    with open(f"/proc/{pid or 'self'}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class RssSampler:
    """Samples a process's RSS every `interval` seconds in a thread (peak and series)."""

    def __init__(self, pid: int | None = None, interval: float = 0.02) -> None:
        self.pid, self.interval = pid, interval
        self.baseline = rss_bytes(pid)
        self.peak = self.baseline
        self.series: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.monotonic()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, RuntimeError):
                v = rss_bytes(self.pid)
                self.peak = max(self.peak, v)
                self.series.append((time.monotonic() - self._t0, v))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


MiB = 1024 * 1024


# --------------------------------------------------------------------------- audit


def audit(catalog, storage) -> dict:
    """Consistency of the catalog and the artifact directory.

    orphan_files: objects no row references; missing_artifacts: rows whose artifact is
    gone; corrupt_objects: objects whose content does not match their name (a partial
    write); tmp_files: files left in tmp/; jobs: jobs by status; stuck_jobs: jobs still
    queued or running; failed_without_reason: failed jobs with no error text.
    """
    from sqlalchemy import func, select

    from app.catalog import Assembly, ComponentSet, Dataset, Job, Model

    with catalog.session() as s:
        refs: dict[str, str] = {}
        for col, what in (
            (Model.weights_sha256, "model"),
            (Dataset.archive_sha256, "dataset"),
            (ComponentSet.artifact_sha256, "component_set"),
            (Assembly.artifact_sha256, "assembly"),
        ):
            for sha in s.scalars(select(col).where(col.is_not(None))):
                refs[sha] = what
        jobs = dict(s.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        failed_no_reason = s.scalar(
            select(func.count()).select_from(Job).where(Job.status == "failed", Job.error.is_(None))
        )
        succeeded_no_artifact = 0
        for a in s.scalars(select(Assembly)):
            if a.job is not None and a.job.status == "succeeded" and not a.artifact_sha256:
                succeeded_no_artifact += 1
    objects = {p.name: p for p in storage.objects.glob("*/*") if p.is_file()}
    corrupt = 0
    for name, p in objects.items():
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        corrupt += h.hexdigest() != name
    return {
        "rows_referencing_artifacts": len(refs),
        "objects": len(objects),
        "orphan_files": len(set(objects) - set(refs)),
        "missing_artifacts": len(set(refs) - set(objects)),
        "corrupt_objects": corrupt,
        "tmp_files": sum(1 for p in storage.tmp.iterdir() if not p.name.endswith(".probe")),
        "jobs": {k: int(v) for k, v in sorted(jobs.items())},
        "stuck_jobs": int(jobs.get("queued", 0) + jobs.get("running", 0)),
        "failed_without_reason": int(failed_no_reason or 0),
        "succeeded_without_artifact": succeeded_no_artifact,
    }


def assert_consistent(report: dict, allow_tmp: bool = False) -> None:
    assert report["orphan_files"] == 0, report
    assert report["missing_artifacts"] == 0, report
    assert report["corrupt_objects"] == 0, report
    assert report["stuck_jobs"] == 0, report
    assert report["failed_without_reason"] == 0, report
    assert report["succeeded_without_artifact"] == 0, report
    if not allow_tmp:
        assert report["tmp_files"] == 0, report


# --------------------------------------------------------------------------- images


def png_bytes(mode: str = "L", size=(28, 28), color=128, **save) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG", **save)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height grey pixels, with one tiny data chunk:
    what a pixel bomb looks like before decoding (no pixel buffer is ever allocated)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def png_bomb(side: int = 12_000) -> bytes:
    """A small, valid PNG that decodes to side x side grey pixels (all zero)."""
    row = b"\x00" + b"\x00" * side
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")
    )


def hostile_images(digit_png: bytes) -> dict[str, tuple[bytes, bool]]:
    """name -> (bytes, accepted?): accepted images decode (predict answers 200, a dataset
    is registered); the others are refused with a 4xx and a message."""
    from PIL import Image

    def save(img, fmt, **kw) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        return buf.getvalue()

    digit = Image.open(io.BytesIO(digit_png)).convert("L")
    frames = [digit, digit.transpose(Image.Transpose.FLIP_LEFT_RIGHT), digit.rotate(90)]
    import numpy as np

    sixteen = Image.fromarray(np.asarray(digit).astype(np.uint16) * 257)
    return {
        "truncated PNG": (digit_png[: len(digit_png) // 2], False),
        "PNG header only": (digit_png[:40], False),
        "1x1 pixel": (png_bytes("L", (1, 1), 200), True),
        "20000x20000 pixels (header)": (png_header_only(20_000, 20_000), False),
        "CMYK JPEG": (save(digit.convert("CMYK"), "JPEG"), True),
        "16-bit PNG": (save(sixteen, "PNG"), True),
        "animated GIF": (save(frames[0], "GIF", save_all=True, append_images=frames[1:]), True),
        "RGBA PNG": (save(digit.convert("RGBA"), "PNG"), True),
        "palette PNG": (save(digit.convert("P"), "PNG"), True),
        "zero bytes": (b"", False),
        "text": (b"this is not an image at all", False),
        "SVG": (b'<svg xmlns="http://www.w3.org/2000/svg" width="28" height="28"/>', False),
    }


# --------------------------------------------------------------------------- an embedded app


@dataclass
class Ready:
    """An embedded app (SQLite, local storage, in-process runner) with a dataset, two
    located LeNets (0-4, 5-9) and one assembled model of 0, 3, 7 and 9."""

    client: object
    svc: object
    http: Http
    bob: Http
    keys: dict[str, str]
    ids: dict
    root: Path
    traffic: Traffic = field(default_factory=Traffic)

    def settle(self, timeout: float = 300) -> None:
        """Wait until no job is queued or running."""
        from sqlalchemy import func, select

        from app.catalog import ACTIVE_STATES, Job

        def idle() -> bool:
            with self.svc.catalog.session() as s:
                q = select(func.count()).select_from(Job).where(Job.status.in_(ACTIVE_STATES))
                return s.scalar(q) == 0

        wait_until(idle, timeout, "the jobs to end", step=0.2)


def build_ready(root: Path, lenets, mnist_small: bytes, **settings_over) -> Iterator[Ready]:
    from fastapi.testclient import TestClient

    from app.catalog import upgrade
    from app.main import create_app

    settings = make_settings(root, **settings_over)
    upgrade(settings.resolved_database_url)
    app = create_app(settings)
    svc = app.state.services
    alice, bob = add_keys(svc.catalog)
    with TestClient(app, raise_server_exceptions=False) as client:
        http = Http(client, alice)
        ids = setup_journey(http, lenets, mnist_small)
        keys = {"alice": alice["Authorization"][7:], "bob": bob["Authorization"][7:]}
        yield Ready(client, svc, http, Http(client, bob), keys, ids, root)
    svc.catalog.dispose()


def setup_journey(http: Http, lenets, mnist_small: bytes, samples_per_class: int = 10) -> dict:
    """Dataset, two models located on it, one assembly (waits for all of it)."""
    r = http.post(
        "/api/v1/datasets", data={"name": "mnist-small"}, files={"archive": ("m.tgz", mnist_small)}
    )
    assert r.status_code == 201, r.text
    ds = r.json()["id"]
    models = []
    for path, classes in ((lenets.low, list("01234")), (lenets.high, list("56789"))):
        r = register(http, path, f"lenet-{classes[0]}-{classes[-1]}", classes)
        assert r.status_code == 201, r.text
        m = r.json()["id"]
        r = http.post(
            f"/api/v1/models/{m}/locate",
            json={"dataset_id": ds, "samples_per_class": samples_per_class},
        )
        assert r.status_code == 202, r.text
        job = http.wait_job(r.json()["job_id"])
        assert job["status"] == "succeeded", job
        models.append(m)
    body = assembly_body(models[0], ["0", "3"], models[1], ["7", "9"])
    r = http.post("/api/v1/assemblies", json=body)
    assert r.status_code == 202, r.text
    asm = http.wait_assembly(r.json()["id"])
    assert asm["status"] == "succeeded", asm
    return {
        "dataset": ds,
        "a": models[0],
        "b": models[1],
        "assembly": asm["id"],
        "assembly_job": asm["job_id"],
        "body": body,
    }


def assembly_body(a: int, a_classes, b: int, b_classes, name: str | None = None) -> dict:
    body = {
        "source_classes": [
            {"model_id": a, "classes": list(a_classes)},
            {"model_id": b, "classes": list(b_classes)},
        ]
    }
    if name:
        body["name"] = name
    return body


def distinct_bodies(a: int, b: int, n: int) -> list[dict]:
    """`n` assembly requests with different class sets (so different artifacts)."""
    import itertools

    subsets = [
        list(c) for k in range(1, 6) for c in itertools.combinations([str(i) for i in range(5)], k)
    ]
    out = []
    for sa, sb in itertools.product(subsets, subsets):
        out.append(
            assembly_body(
                a, sa, b, [str(int(x) + 5) for x in sb], name=f"a{''.join(sa)}-b{''.join(sb)}"
            )
        )
        if len(out) == n:
            return out
    raise ValueError(f"only {len(out)} distinct bodies")


@pytest.fixture(scope="session")
def ready(tmp_path_factory, trained_lenets, mnist_small, shared_data) -> Iterator[Ready]:
    yield from build_ready(
        tmp_path_factory.mktemp("ready"), trained_lenets, mnist_small, data_dir=shared_data
    )


# --------------------------------------------------------------------------- the full stack

KEY = "lego_reliability_soak_key_0123456789"
# The full stack sweeps orphaned artifacts older than this (production default: an hour).
ORPHAN_GRACE_S = 20.0


class Stack:
    """`lego serve` and `lego worker` processes over a PostgreSQL database, a Redis DB and
    an artifact directory of their own."""

    def __init__(self, root: Path, pg_url: str, redis_url: str, **settings) -> None:
        self.root, self.pg_url, self.redis_url = root, pg_url, redis_url
        self.port = free_port()
        self.common = dict(
            database_url=pg_url,
            broker_url=redis_url,
            storage_dir=root / "artifacts",
            var_dir=root,
            job_heartbeat_s=0.5,
            job_stale_s=4,
            reaper_interval_s=0.5,
            job_retry_delay_s=0.5,
            orphan_grace_s=ORPHAN_GRACE_S,
            device="cpu",
            min_free_disk_bytes=1 << 20,
        )
        self.common.update(settings)
        self.procs: dict[str, Proc] = {}
        self.api: Proc | None = None
        self.client = None
        self._n = 0

    # processes
    def start_api(self, **extra) -> Proc:
        self.api = Proc(
            ["serve", "--host", "127.0.0.1", "--port", str(self.port)],
            service_env(bootstrap_api_key=KEY, **{**self.common, **extra}),
            self.root / f"api-{self._next()}.log",
        )
        self.procs["api"] = self.api
        self.api.wait_for("Uvicorn running", timeout=120)
        return self.api

    def _next(self) -> int:
        self._n += 1
        return self._n

    def start_worker(self, name: str | None = None, wait: bool = True, **extra) -> Proc:
        name = name or f"worker-{self._next()}"
        w = Proc(
            ["worker", "--concurrency", "1", "--loglevel", "INFO"],
            service_env(**{**self.common, **extra}),
            self.root / f"{name}.log",
        )
        self.procs[name] = w
        if wait:
            w.wait_for("ready.", timeout=120)
        return w

    def workers(self) -> dict[str, Proc]:
        return {k: p for k, p in self.procs.items() if k != "api" and p.p.poll() is None}

    def http(self, timeout: float = 60) -> Http:
        import httpx

        if self.client is None:
            self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=timeout)
        return Http(self.client, {"Authorization": f"Bearer {KEY}"})

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        for p in self.procs.values():
            with contextlib.suppress(Exception):
                p.stop()

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.root.glob("*.log")))

    # catalog and storage, read directly
    def env(self):
        from app.settings import Settings
        from worker.runtime import Env

        return Env.from_settings(Settings(**self.common))

    def audit(self) -> dict:
        e = self.env()
        return audit(e.catalog, e.storage)

    def audit_after_sweep(self) -> dict:
        """The audit once the reapers' orphan sweep has had time to run."""
        time.sleep(ORPHAN_GRACE_S * 1.5 + 2)
        return self.audit()

    def job_rows(self) -> list:
        from sqlalchemy import select

        from app.catalog import Job

        with self.env().catalog.session() as s:
            return list(s.scalars(select(Job).order_by(Job.id)))

    def queue_depth(self) -> int:
        import redis

        r = redis.Redis.from_url(self.redis_url, socket_connect_timeout=2)
        try:
            return int(r.llen("lego"))
        finally:
            r.close()


@contextlib.contextmanager
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database, dropped afterwards over a new connection (so that a
    test may restart PostgreSQL in between)."""
    import psycopg
    from service_helpers import PG_ADMIN_URL

    try:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3) as admin:
            name = f"lego_rel_{secrets.token_hex(6)}"
            admin.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}")
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    url = f"{base}/{name}"
    try:
        yield url
    finally:
        from app.catalog import _catalogs

        if url in _catalogs:
            _catalogs.pop(url).dispose()
        deadline = time.monotonic() + 60
        while True:
            try:
                with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3) as admin:
                    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)


@contextlib.contextmanager
def full_stack(root: Path, workers: int = 1, **settings) -> Iterator[Stack]:
    with pg_database() as pg, fresh_redis_db() as rd:
        st = Stack(root, pg, rd, **settings)
        try:
            st.start_api()
            for _ in range(workers):
                st.start_worker(wait=False)
            for p in st.workers().values():
                p.wait_for("ready.", timeout=180)
            yield st
        finally:
            st.stop()
        # The API key is never logged, by the API or by a worker.
        assert KEY not in st.logs(), "the API key appears in a log"


def wait_until(cond: Callable[[], bool], timeout: float, what: str, step: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(step)


def wait_all(fetch: Callable[[], list[dict]], timeout: float) -> list[dict]:
    """Poll until every item is succeeded or failed."""
    deadline = time.monotonic() + timeout
    while True:
        items = fetch()
        if all(i["status"] in ("succeeded", "failed") for i in items):
            return items
        if time.monotonic() > deadline:
            left = [i for i in items if i["status"] not in ("succeeded", "failed")]
            raise AssertionError(f"{len(left)} did not finish: {left[:3]}")
        time.sleep(0.5)


__all__ = ["wait_job"]
