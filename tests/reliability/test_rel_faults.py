"""Faults against the full stack (`make soak`): PostgreSQL, Redis, a real `lego serve` and
real `lego worker` (Celery) processes.

1. Workers SIGKILLed in the middle of locating and of assembling, `LEGO_SOAK_KILLS` times
   (default 10, alternating): every job ends `succeeded` (after a retry) or `failed` with a
   reason, none stays queued or running, and no partial artifact is ever visible (every
   stored object matches its sha256; downloads are complete).
2. Redis, then PostgreSQL, restarted while requests and jobs are in flight: the API answers
   503 (never 500) while a dependency is down, recovers by itself, and no acknowledged
   upload or assembly is lost.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter

import pytest
from rel_helpers import (
    KEY,
    Traffic,
    assembly_body,
    assert_consistent,
    distinct_bodies,
    env_float,
    env_int,
    full_stack,
    setup_journey,
    wait_until,
)
from service_helpers import JOURNEY_NEEDS, Http, b64url, make_tar_gz, needs_lego

pytestmark = [needs_lego(*JOURNEY_NEEDS), pytest.mark.soak, pytest.mark.fullstack]

KILLS = env_int("LEGO_SOAK_KILLS", 10)
PG_VERSION = os.environ.get("LEGO_TEST_PG_VERSION") or (
    sorted(os.listdir("/etc/postgresql"))[-1] if os.path.isdir("/etc/postgresql") else ""
)


# --------------------------------------------------------------------------- 1. kills


def job_row(st, job_id):
    from app.catalog import Job

    with st.env().catalog.session() as s:
        return s.get(Job, job_id)


def kill_job_worker(st, job) -> str:
    """SIGKILL the worker process group that runs `job` (main process and pool child)."""
    pid = int(job.worker.rsplit(":", 1)[1])
    pgid = os.getpgid(pid)
    os.killpg(pgid, signal.SIGKILL)
    for name, p in list(st.workers().items()):
        if p.p.pid == pgid:
            p.p.wait(timeout=30)
            return name
    return f"pgid {pgid}"


# Where a job is "in the middle of its work": its progress once the work proper started
# (locate: 0.1 "locating components" up to 0.96 "saving components"; assemble: 0.3
# "assembling" up to 0.95 "exporting"), before it ends. Messages in between are lego_core's.
PHASES = {"locate": (0.1, 0.99), "assemble": (0.3, 0.99)}


def test_workers_killed_mid_locate_and_mid_assembly(
    tmp_path, trained_lenets, mnist_small, shared_data, figures
):
    traffic = Traffic()
    kills: list[dict] = []
    with full_stack(tmp_path, workers=2, data_dir=shared_data, calibration_per_class=500) as st:
        http = st.http(timeout=120)
        traffic.attach(st.client)
        ids = setup_journey(http, trained_lenets, mnist_small)
        # A larger dataset (the 10,000 MNIST test images, server-side) makes the work long
        # enough to be caught in the middle.
        r = http.post("/api/v1/datasets", data={"name": "mnist-test", "path": "mnist-test.tar.gz"})
        assert r.status_code == 201, r.text
        big = r.json()["id"]
        bodies = distinct_bodies(ids["a"], ids["b"], KILLS + 5)
        jobs: list[tuple[str, int]] = []
        attempt = 0
        rng = random.Random(0)
        while len(kills) < KILLS and attempt < KILLS * 4:
            attempt += 1
            kind = "locate" if len(kills) % 2 == 0 else "assemble"
            if kind == "locate":
                r = http.post(
                    f"/api/v1/models/{ids['b']}/locate",
                    json={"dataset_id": big, "samples_per_class": 400 + attempt},
                )
                assert r.status_code == 202, r.text
                job_id = r.json()["job_id"]
            else:
                body = dict(bodies[attempt], eval_dataset_ids=[big])
                r = http.post("/api/v1/assemblies", json=body)
                assert r.status_code == 202, r.text
                job_id = r.json()["job_id"]
            jobs.append((kind, job_id))
            # Wait until it is in the middle of its work, then kill its worker.
            deadline = time.monotonic() + 180
            caught = None
            while time.monotonic() < deadline:
                j = job_row(st, job_id)
                if j.status in ("succeeded", "failed"):
                    break
                low, high = PHASES[kind]
                if j.status == "running" and j.worker and low <= j.progress < high:
                    time.sleep(rng.uniform(0, 0.3))
                    caught = job_row(st, job_id)
                    if caught.status == "running" and caught.worker:
                        break
                    caught = None
                time.sleep(0.02)
            if caught is None:
                continue  # finished before it could be caught: not counted
            victim = kill_job_worker(st, caught)
            kills.append(
                {
                    "kind": kind,
                    "job": job_id,
                    "phase": caught.message,
                    "progress": round(caught.progress, 2),
                    "attempt": caught.attempts,
                    "worker": victim,
                }
            )
            st.start_worker(wait=False)  # keep two workers
            # Every running job ends: wait for this one before the next kill.
            j = wait_terminal(st, job_id, timeout=300)
            kills[-1]["outcome"] = j.status
            kills[-1]["attempts"] = j.attempts
            if j.status == "failed":
                assert j.error, j
                kills[-1]["error"] = j.error[:160]
        assert len(kills) == KILLS, f"caught only {len(kills)} jobs mid-work in {attempt} tries"
        outcomes = {job: wait_terminal(st, job, timeout=300) for _kind, job in jobs}
        for job, j in outcomes.items():
            assert j.status in ("succeeded", "failed"), (job, j.status)
            if j.status == "failed":
                assert j.error and "stopped responding" in j.error, (job, j.error)
        for k in kills:
            if k["outcome"] == "succeeded":
                assert k["attempts"] == k["attempt"] + 1, k
        # No partial artifact is visible: downloads match their sha256 and the stored objects
        # match their names; every assembly that succeeded downloads whole.
        for a in http.get("/api/v1/assemblies").json():
            if a["status"] == "succeeded":
                r = http.get(f"/api/v1/assemblies/{a['id']}/download")
                assert r.status_code == 200
                assert hashlib.sha256(r.content).hexdigest() == a["artifact_sha256"]
        first = st.audit()
        report = st.audit_after_sweep()
        assert_consistent(report)
        traffic.detach(st.client)
        by_outcome = Counter(k["outcome"] for k in kills)
        figures.record(
            "faults_worker_kills",
            kills=len(kills),
            kills_by_kind=dict(Counter(k["kind"] for k in kills)),
            kills_by_phase=dict(Counter(f"{k['kind']}: {k['phase']}" for k in kills)),
            tries=attempt,
            jobs=len(jobs),
            outcomes_of_killed_jobs=dict(by_outcome),
            jobs_lost=0,
            jobs_stuck=report["stuck_jobs"],
            **traffic.summary(),
            audit_at_end=first,
            audit_after_orphan_sweep=report,
            detail=kills,
        )


def wait_terminal(st, job_id, timeout):
    deadline = time.monotonic() + timeout
    while True:
        j = job_row(st, job_id)
        if j.status in ("succeeded", "failed"):
            return j
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {j.status} after {timeout} s: {j.message}")
        time.sleep(0.2)


# --------------------------------------------------------------------------- 2. restarts


def redis_down() -> None:
    subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", "6379", "shutdown", "nosave"])


def redis_up() -> None:
    subprocess.run(
        [
            "redis-server",
            "--daemonize",
            "yes",
            "--bind",
            "127.0.0.1",
            "-::1",
            "--port",
            "6379",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            "/var/lib/redis",
            "--logfile",
            "/var/log/redis/ci.log",
        ],
        check=True,
    )
    wait_until(redis_ok, 30, "Redis to answer")


def redis_ok() -> bool:
    return (
        subprocess.run(["redis-cli", "-h", "127.0.0.1", "ping"], capture_output=True).stdout.strip()
        == b"PONG"
    )


def pg(action: str) -> None:
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", PG_VERSION, "main", action],
        check=True,
        capture_output=True,
    )
    if action == "start":
        wait_until(pg_ok, 60, "PostgreSQL to answer")


def pg_ok() -> bool:
    return subprocess.run(["pg_isready", "-h", "127.0.0.1", "-p", "5432", "-q"]).returncode == 0


class Load:
    """Client threads: list models, predict, upload datasets, submit assemblies. Records
    each answer by phase, and what was acknowledged (201/202)."""

    def __init__(self, st, ids, bodies, digit: bytes, members) -> None:
        self.st, self.ids, self.bodies, self.digit, self.members = st, ids, bodies, digit, members
        self.phase = "normal"
        self.by_phase: dict[str, Counter] = {}
        self.errors: list[str] = []
        self.acked_assemblies: list[int] = []
        self.acked_datasets: list[int] = []
        self.refused_assemblies = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._n = 0
        self.threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(4)
        ]

    def _next(self) -> int:
        with self._lock:
            self._n += 1
            return self._n

    def _run(self, i: int) -> None:
        import httpx

        with httpx.Client(base_url=self.st.url(), timeout=60) as c:
            http = Http(c, {"Authorization": f"Bearer {KEY}"})
            rng = random.Random(i)
            while not self._stop.is_set():
                action = rng.choice(["list", "predict", "predict", "upload", "assemble"])
                phase = self.phase
                try:
                    if action == "list":
                        r = http.get("/api/v1/models")
                    elif action == "predict":
                        r = http.get(
                            f"/api/v1/assemblies/{self.ids['assembly']}/predict",
                            params={"image": b64url(self.digit)},
                        )
                    elif action == "upload":
                        n = self._next()
                        two = {k: self.members[k][n % 5 : n % 5 + 2] for k in ("1", "7")}
                        two["1"] = [(f"u{n}-{k}.png", b) for k, (_, b) in enumerate(two["1"])]
                        r = http.post(
                            "/api/v1/datasets",
                            data={"name": f"load-{n}"},
                            files={"archive": ("d.tgz", make_tar_gz(two))},
                        )
                        if r.status_code == 201:
                            with self._lock:
                                self.acked_datasets.append(r.json()["id"])
                    else:
                        body = self.bodies[self._next() % len(self.bodies)]
                        r = http.post("/api/v1/assemblies", json=body)
                        if r.status_code == 202:
                            with self._lock:
                                self.acked_assemblies.append(r.json()["id"])
                        elif r.status_code == 503:
                            self.refused_assemblies += 1
                    status = str(r.status_code)
                except httpx.HTTPError as exc:
                    status = f"client error: {type(exc).__name__}"
                with self._lock:
                    self.by_phase.setdefault(phase, Counter())[f"{action} {status}"] += 1
                    if status.startswith("5") and status != "503":
                        self.errors.append(f"{phase} {action} {status} {r.text[:200]}")
                time.sleep(0.05)

    def start(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(timeout=120)


def test_redis_and_postgres_restarts_under_load(
    tmp_path, trained_lenets, mnist_small, mnist_members, digits, figures
):
    if not PG_VERSION:
        pytest.skip("no local PostgreSQL cluster to restart")
    down_s = env_float("LEGO_SOAK_DOWN_S", 10)
    calm_s = env_float("LEGO_SOAK_CALM_S", 15)
    timeline: list[tuple[float, str]] = []
    recovery: dict[str, float] = {}
    with full_stack(tmp_path, workers=2) as st:
        http = st.http(timeout=120)
        ids = setup_journey(http, trained_lenets, mnist_small)
        bodies = distinct_bodies(ids["a"], ids["b"], 60)
        load = Load(st, ids, bodies, digits["3"], mnist_members).start()
        t0 = time.monotonic()

        def mark(phase: str) -> None:
            load.phase = phase
            timeline.append((round(time.monotonic() - t0, 1), phase))

        def ready_again(what: str) -> None:
            start = time.monotonic()
            wait_until(lambda: st.client.get("/readyz").status_code == 200, 120, "readyz")
            recovery[what] = round(time.monotonic() - start, 1)

        try:
            mark("normal")
            time.sleep(calm_s)
            mark("redis down")
            redis_down()
            time.sleep(down_s)
            readyz_redis_down = st.client.get("/readyz").status_code
            redis_up()
            mark("after redis")
            ready_again("redis")
            time.sleep(calm_s)
            mark("postgres down")
            pg("stop")
            time.sleep(down_s)
            readyz_pg_down = st.client.get("/readyz").status_code
            pg("start")
            mark("after postgres")
            ready_again("postgres")
            time.sleep(calm_s)
            mark("stopped")
        finally:
            load.stop()
            if not redis_ok():
                redis_up()
            if not pg_ok():
                pg("start")
        assert not load.errors, load.errors[:10]
        assert readyz_redis_down == 503 and readyz_pg_down == 503
        # Every acknowledged assembly ends, and succeeds; every acknowledged upload is there.
        final = {}
        for a in load.acked_assemblies:
            deadline = time.monotonic() + 600
            while True:
                x = http.get(f"/api/v1/assemblies/{a}").json()
                if x["status"] in ("succeeded", "failed") or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            final[a] = x
        lost = [a for a, x in final.items() if x["status"] not in ("succeeded", "failed")]
        failed = {a: x["error"] for a, x in final.items() if x["status"] == "failed"}
        missing = [
            d for d in load.acked_datasets if http.get(f"/api/v1/datasets/{d}").status_code != 200
        ]
        # Work submitted after the restarts runs too (the workers reconnected by themselves).
        r = http.post("/api/v1/assemblies", json=assembly_body(ids["a"], ["2"], ids["b"], ["6"]))
        after = http.wait_assembly(r.json()["id"], timeout=300)
        first = st.audit()
        report = st.audit_after_sweep()
        figures.record(
            "faults_dependency_restarts",
            down_seconds=down_s,
            timeline=timeline,
            answers_by_phase={k: dict(sorted(v.items())) for k, v in load.by_phase.items()},
            requests=sum(sum(v.values()) for v in load.by_phase.values()),
            errors_500=len(load.errors),
            readyz_while_redis_down=readyz_redis_down,
            readyz_while_postgres_down=readyz_pg_down,
            seconds_to_ready_after_restart=recovery,
            acknowledged_assemblies=len(load.acked_assemblies),
            acknowledged_assemblies_succeeded=sum(
                1 for x in final.values() if x["status"] == "succeeded"
            ),
            acknowledged_assemblies_failed=failed,
            assemblies_refused_with_503=load.refused_assemblies,
            acknowledged_uploads=len(load.acked_datasets),
            jobs_lost=len(lost),
            uploads_lost=len(missing),
            assembly_after_recovery=after["status"],
            audit_at_end=first,
            audit_after_orphan_sweep=report,
        )
        assert not lost and not missing, (lost, missing)
        assert not failed, failed
        assert after["status"] == "succeeded", after
        assert_consistent(report)
