"""The full stack: a real `lego serve` (uvicorn) and real `lego worker` processes (Celery)
over a fresh PostgreSQL database and a Redis DB of their own.

1. The whole journey over HTTP.
2. A worker SIGKILLed in the middle of an assembly: the job does not stay `running`
   (the reaper requeues it and another worker finishes it, or it fails), and the same
   assembly can be submitted again.
"""

from __future__ import annotations

import time

import httpx
import pytest
from service_helpers import (
    JOURNEY_NEEDS,
    Http,
    Proc,
    free_port,
    fresh_pg_database,
    fresh_redis_db,
    needs_lego,
    run_journey,
    service_env,
    wait_job,
)

pytestmark = [pytest.mark.fullstack, pytest.mark.slow]
needs_algorithm = needs_lego(*JOURNEY_NEEDS)

KEY = "lego_fullstack_test_key"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with fresh_pg_database() as pg_url, fresh_redis_db() as redis_url:
        yield from _stack(tmp_path_factory, pg_url, redis_url)


def _stack(tmp_path_factory, pg_url, redis_url):
    root = tmp_path_factory.mktemp("fullstack")
    port = free_port()
    common = dict(
        database_url=pg_url,
        broker_url=redis_url,
        storage_dir=root / "artifacts",
        var_dir=root,
        job_heartbeat_s=0.5,
        job_stale_s=4,
        reaper_interval_s=0.5,
        device="cpu",
        min_free_disk_bytes=1 << 20,
    )
    api = Proc(
        ["serve", "--host", "127.0.0.1", "--port", str(port)],
        service_env(bootstrap_api_key=KEY, **common),
        root / "api.log",
    )
    procs = {"api": api}

    def start_worker(name: str, **extra) -> Proc:
        w = Proc(
            ["worker", "--concurrency", "1", "--loglevel", "INFO"],
            service_env(**common, **extra),
            root / f"{name}.log",
        )
        procs[name] = w
        w.wait_for("ready.", timeout=120)
        return w

    try:
        api.wait_for("Uvicorn running", timeout=120)
        start_worker("worker")
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        assert client.get("/readyz").status_code == 200, client.get("/readyz").text
        yield {
            "http": Http(client, {"Authorization": f"Bearer {KEY}"}),
            "root": root,
            "procs": procs,
            "start_worker": start_worker,
            "settings": common,
        }
        client.close()
    finally:
        for p in procs.values():
            p.stop()


def stop_workers(procs) -> None:
    for name, p in procs.items():
        if name != "api":
            p.stop()


def test_dead_worker_plumbing(stack):
    """Without lego_core's algorithm: a job's message goes through Redis to a worker
    process; a worker SIGKILLed mid-job leaves the job to the reaper, which queues it
    again for the next worker."""
    from app.catalog import Job
    from app.settings import Settings
    from worker.celery_app import send
    from worker.runtime import Env, create_job

    settings = Settings(**stack["settings"])
    env = Env.from_settings(settings)

    def job_row(job_id):
        with env.catalog.session() as s:
            return s.get(Job, job_id)

    def submit():
        with env.catalog.session() as s:
            job_id = create_job(s, "nobody", "no-such-kind", {}, 2).id
        send(settings, job_id)
        return job_id

    jid = submit()
    wait_job(lambda: {"status": job_row(jid).status}, timeout=60)
    assert job_row(jid).error == "unknown job kind 'no-such-kind'"

    stop_workers(stack["procs"])
    slow = stack["start_worker"]("plumbing-slow", debug_job_delay_s=600)
    jid = submit()
    deadline = time.monotonic() + 60
    while job_row(jid).status != "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    slow.kill()
    stack["start_worker"]("plumbing-next")
    wait_job(lambda: {"status": job_row(jid).status}, timeout=120)
    row = job_row(jid)
    assert row.attempts == 2 and row.error == "unknown job kind 'no-such-kind'"
    env.catalog.dispose()


@pytest.fixture(scope="module")
def journey(stack, trained_lenets, mnist_small, digits):
    return run_journey(stack["http"], trained_lenets, mnist_small, digits, stack["root"])


@needs_algorithm
def test_journey_full_stack(stack, journey):
    http = stack["http"]
    asm = http.get(f"/api/v1/assemblies/{journey['assembly']}").json()
    assert asm["status"] == "succeeded"
    # The job ran in a worker process, not in the API.
    job = http.get(f"/api/v1/jobs/{journey['assembly_job']}").json()
    assert job["status"] == "succeeded" and job["worker"]
    assert not job["worker"].endswith(f":{stack['procs']['api'].p.pid}")
    metrics = http.client.get("/metrics").text
    assert 'lego_jobs{kind="assemble",state="succeeded"}' in metrics


@needs_algorithm
def test_worker_killed_mid_job(stack, journey):
    http, procs = stack["http"], stack["procs"]
    stop_workers(procs)
    # This worker holds every job for a long time before working on it.
    slow = stack["start_worker"]("slow-worker", debug_job_delay_s=600)
    r = http.post("/api/v1/assemblies", json=journey["body"])
    assert r.status_code == 202, r.text
    asm_id, job_id = r.json()["id"], r.json()["job_id"]
    deadline = time.monotonic() + 120
    while http.get(f"/api/v1/jobs/{job_id}").json()["status"] != "running":
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.2)

    slow.kill()  # SIGKILL, worker and pool children
    stack["start_worker"]("worker-2")
    job = http.wait_job(job_id, timeout=240)
    assert job["status"] in ("succeeded", "failed"), job
    if job["status"] == "failed":
        assert "stopped responding" in job["error"]
    else:
        assert job["attempts"] == 2
    assert http.get(f"/api/v1/assemblies/{asm_id}").json()["status"] == job["status"]

    # The same assembly can be submitted again.
    r = http.post("/api/v1/assemblies", json=journey["body"])
    assert r.status_code == 202
    again = http.wait_assembly(r.json()["id"], timeout=240)
    assert again["status"] == "succeeded", again
    assert http.get(f"/api/v1/assemblies/{again['id']}/download").status_code == 200
