"""Load against the full stack (`make soak`): `lego serve` (one uvicorn process) and two
`lego worker` processes (Celery, concurrency 1 each) over PostgreSQL and Redis.

1. `LEGO_SOAK_ASSEMBLIES` (default 200) different assemblies submitted at once: all finish,
   none duplicated (one job each, run once), none lost; queue depth and throughput.
2. The API's memory while predicting from `LEGO_SOAK_MEMORY_MODELS` (default 50) different
   assemblies in turn, `LEGO_SOAK_MEMORY_ROUNDS` (default 3) rounds: the model cache
   (LEGO_PREDICT_CACHE_SIZE=4) evicts, RSS stays bounded.
3. `LEGO_SOAK_CLIENTS` (default 32) clients predicting for `LEGO_SOAK_PREDICT_S` (default 60)
   seconds while 4 assemblies run (each replaced by a new one when it ends): no error;
   p50/p99 latency and throughput.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from rel_helpers import (
    KEY,
    MiB,
    Traffic,
    assert_consistent,
    distinct_bodies,
    env_float,
    env_int,
    full_stack,
    latency_summary,
    rss_bytes,
    setup_journey,
)
from service_helpers import JOURNEY_NEEDS, b64url, needs_lego

pytestmark = [needs_lego(*JOURNEY_NEEDS), pytest.mark.soak, pytest.mark.fullstack]

N_ASSEMBLIES = env_int("LEGO_SOAK_ASSEMBLIES", 200)
MEMORY_MODELS = env_int("LEGO_SOAK_MEMORY_MODELS", 50)
MEMORY_ROUNDS = env_int("LEGO_SOAK_MEMORY_ROUNDS", 3)
CLIENTS = env_int("LEGO_SOAK_CLIENTS", 32)
PREDICT_S = env_float("LEGO_SOAK_PREDICT_S", 60)
MEMORY_BOUND = 300 * MiB  # growth allowed after the first round (the cache is full by then)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, trained_lenets, mnist_small, shared_data):
    root = tmp_path_factory.mktemp("load")
    with full_stack(root, workers=2, data_dir=shared_data, predict_cache_size=4) as st:
        http = st.http(timeout=120)
        ids = setup_journey(http, trained_lenets, mnist_small)
        yield {"st": st, "http": http, "ids": ids, "created": []}


def test_200_assemblies_at_once(stack, figures):
    st, http, ids = stack["st"], stack["http"], stack["ids"]
    bodies = distinct_bodies(ids["a"], ids["b"], N_ASSEMBLIES + 1)[1:]  # [0] is the fixture's
    traffic = Traffic()
    depth: list[tuple[float, int, int, int]] = []  # t, broker queue, queued, running
    stop = threading.Event()
    t0 = time.monotonic()

    def sample():
        from sqlalchemy import func, select

        from app.catalog import Job

        cat = st.env().catalog
        while not stop.is_set():
            with cat.session() as s:
                rows = dict(s.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            depth.append(
                (
                    round(time.monotonic() - t0, 1),
                    st.queue_depth(),
                    rows.get("queued", 0),
                    rows.get("running", 0),
                )
            )
            stop.wait(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()

    def submit(body):
        with httpx.Client(base_url=st.url(), timeout=120) as c:
            t = time.monotonic()
            r = c.post("/api/v1/assemblies", json=body, headers={"Authorization": f"Bearer {KEY}"})
            traffic.add(r.status_code, time.monotonic() - t)
            return r

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(submit, bodies))
    submitted_s = time.monotonic() - t0
    assert all(r.status_code == 202 for r in answers), Counter(r.status_code for r in answers)
    created = [r.json() for r in answers]
    stack["created"] = created
    deadline = time.monotonic() + env_float("LEGO_SOAK_ASSEMBLY_TIMEOUT_S", 3600)
    while True:
        listed = {a["id"]: a for a in http.get("/api/v1/assemblies").json()}
        mine = [listed[a["id"]] for a in created]
        if all(a["status"] in ("succeeded", "failed") for a in mine):
            break
        assert time.monotonic() < deadline, Counter(a["status"] for a in mine)
        time.sleep(2)
    elapsed = time.monotonic() - t0
    stop.set()
    sampler.join(timeout=10)

    statuses = Counter(a["status"] for a in mine)
    ids_ = [a["id"] for a in mine]
    jobs = [a["job_id"] for a in mine]
    names = Counter(a["name"] for a in mine)
    # Runs per job, from the workers' logs: each job started exactly once.
    started = Counter(
        int(m) for m in re.findall(r"job (\d+) \(assemble\) attempt \d+ started", st.logs())
    )
    runs = Counter(started[j] for j in jobs)
    rows = {j.id: j for j in st.job_rows()}
    attempts = Counter(rows[j].attempts for j in jobs)
    shas = {a["artifact_sha256"] for a in mine if a["status"] == "succeeded"}
    report = st.audit()
    figures.record(
        "load_200_assemblies",
        assemblies=N_ASSEMBLIES,
        workers="2 x lego worker (Celery prefork, concurrency 1)",
        submit_seconds=round(submitted_s, 1),
        submit=traffic.summary(),
        seconds_to_all_done=round(elapsed, 1),
        throughput_per_minute=round(N_ASSEMBLIES / elapsed * 60, 1),
        statuses=dict(statuses),
        distinct_assemblies=len(set(ids_)),
        distinct_jobs=len(set(jobs)),
        distinct_artifacts=len(shas),
        runs_per_job=dict(runs),
        attempts_per_job=dict(attempts),
        max_broker_queue_depth=max((d[1] for d in depth), default=0),
        max_queued_in_catalog=max((d[2] for d in depth), default=0),
        max_running=max((d[3] for d in depth), default=0),
        queue_depth_series=depth[:: max(1, len(depth) // 40)],
        jobs_lost=N_ASSEMBLIES - statuses.get("succeeded", 0) - statuses.get("failed", 0),
        audit=report,
    )
    assert statuses == {"succeeded": N_ASSEMBLIES}, statuses
    assert len(set(ids_)) == len(set(jobs)) == N_ASSEMBLIES
    assert max(names.values()) == 1
    assert runs == {1: N_ASSEMBLIES}, runs  # none ran twice
    assert len(shas) == N_ASSEMBLIES
    assert_consistent(report)


def test_api_memory_bounded_while_predicting_from_50_assemblies(stack, digits, figures):
    st, http = stack["st"], stack["http"]
    done = [a for a in http.get("/api/v1/assemblies").json() if a["status"] == "succeeded"]
    assert len(done) >= MEMORY_MODELS, f"only {len(done)} assemblies; run the 200 first"
    chosen = done[:MEMORY_MODELS]
    pid = st.api.p.pid
    image = b64url(digits["3"])
    series: list[int] = []
    after_round: list[int] = []
    latencies: list[float] = []
    traffic = Traffic()
    start_rss = rss_bytes(pid)
    for _ in range(MEMORY_ROUNDS):
        for a in chosen:
            t = time.monotonic()
            r = http.get(f"/api/v1/assemblies/{a['id']}/predict", params={"image": image})
            latencies.append(time.monotonic() - t)
            traffic.add(r.status_code)
            assert r.status_code == 200, r.text
            series.append(rss_bytes(pid))
        after_round.append(rss_bytes(pid))
    growth = max(series[len(chosen) :] or series) - after_round[0]
    figures.record(
        "load_memory_50_assemblies",
        assemblies=len(chosen),
        rounds=MEMORY_ROUNDS,
        predict_cache_size=4,
        **traffic.summary(),
        **latency_summary(latencies),
        api_rss_mib_at_start=round(start_rss / MiB, 1),
        api_rss_mib_after_each_round=[round(x / MiB, 1) for x in after_round],
        api_rss_mib_peak=round(max(series) / MiB, 1),
        growth_after_first_round_mib=round(growth / MiB, 1),
        bound_mib=MEMORY_BOUND // MiB,
    )
    assert growth < MEMORY_BOUND, f"RSS grew {growth / MiB:.0f} MiB after the first round"


def test_32_clients_predict_while_4_assemblies_run(stack, digits, figures):
    st, http, ids = stack["st"], stack["http"], stack["ids"]
    big = http.post("/api/v1/datasets", data={"name": "mnist-test", "path": "mnist-test.tar.gz"})
    assert big.status_code == 201, big.text
    big_id = big.json()["id"]
    # Four new assemblies, evaluated on the 10,000 test images so that they run a while.
    bodies = distinct_bodies(ids["a"], ids["b"], N_ASSEMBLIES + 400)[N_ASSEMBLIES + 1 :]
    asm = ids["assembly"]
    image = b64url(digits["3"])
    traffic = Traffic()
    errors: list[str] = []
    stop = threading.Event()

    def client(i: int) -> None:
        with httpx.Client(base_url=st.url(), timeout=60) as c:
            h = {"Authorization": f"Bearer {KEY}"}
            while not stop.is_set():
                t = time.monotonic()
                try:
                    if i % 2:
                        r = c.get(
                            f"/api/v1/assemblies/{asm}/predict", params={"image": image}, headers=h
                        )
                    else:
                        r = c.post(
                            f"/api/v1/assemblies/{asm}/predict",
                            files=[("images", ("3.png", digits["3"], "image/png"))] * 4,
                            headers=h,
                        )
                    traffic.add(r.status_code, time.monotonic() - t)
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {r.text[:200]}")
                except httpx.HTTPError as exc:
                    traffic.add(599, time.monotonic() - t)
                    errors.append(f"client: {type(exc).__name__}: {exc}")

    submitted: list[int] = []

    def submit(body) -> None:
        r = http.post("/api/v1/assemblies", json=dict(body, eval_dataset_ids=[big_id]))
        assert r.status_code == 202, r.text
        submitted.append(r.json()["id"])

    for b in bodies[:4]:
        submit(b)
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    # Four assemblies in flight for the whole window: a new one replaces each that ends.
    running_at: list[tuple[float, int]] = []
    while time.monotonic() - t0 < PREDICT_S:
        states = [http.get(f"/api/v1/assemblies/{a}").json()["status"] for a in submitted]
        in_flight = sum(s in ("queued", "running") for s in states)
        running_at.append((round(time.monotonic() - t0, 1), in_flight))
        for _ in range(4 - in_flight):
            submit(bodies[len(submitted)])
        time.sleep(1)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    elapsed = time.monotonic() - t0
    final = [http.wait_assembly(a, timeout=600) for a in submitted]
    s = traffic.summary()
    figures.record(
        "load_32_clients_predict",
        clients=CLIENTS,
        seconds=round(elapsed, 1),
        images_per_request="1 (GET, half the clients) or 4 (POST multipart)",
        **s,
        throughput_requests_per_s=round(s["requests"] / elapsed, 1),
        errors=len(errors),
        error_examples=errors[:5],
        assemblies_run_during_load=len(final),
        assemblies_outcome=dict(Counter(a["status"] for a in final)),
        assemblies_in_flight_over_time=running_at[:: max(1, len(running_at) // 15)],
    )
    assert not errors, errors[:5]
    assert all(a["status"] == "succeeded" for a in final), final
