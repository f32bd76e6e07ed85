"""The job machinery without lego_core: claim once, progress, failures, retries, the
embedded runner, and the reaper that ends jobs whose worker died."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from service_helpers import make_settings, wait_job
from sqlalchemy.exc import OperationalError

from app.catalog import Job, upgrade, utcnow
from lego_core.errors import LegoError
from worker import tasks
from worker.embedded import EmbeddedRunner
from worker.runtime import Deferred, Env, Result, create_job, execute, reap, request_cancel


@pytest.fixture
def env(tmp_path):
    settings = make_settings(tmp_path)
    upgrade(settings.resolved_database_url)
    e = Env.from_settings(settings)
    yield e
    e.catalog.dispose()


@pytest.fixture
def handlers(monkeypatch):
    """Register test-only job kinds."""
    registry = dict(tasks.HANDLERS)
    monkeypatch.setattr(tasks, "HANDLERS", registry)
    return registry


def submit(env, kind="test", payload=None, max_attempts=2) -> int:
    with env.catalog.session() as s:
        return create_job(s, "alice", kind, payload or {}, max_attempts).id


def job(env, job_id) -> Job:
    with env.catalog.session() as s:
        return s.get(Job, job_id)


def test_success_records_progress_result_and_apply(env, handlers):
    seen = []

    def ok(ctx):
        ctx.progress(0.5, "half way")
        seen.append(job(env, ctx.job_id).message)
        return Result({"answer": 42}, apply=lambda s: {"applied": True})

    handlers["test"] = ok
    jid = submit(env)
    assert execute(env, jid).state == "succeeded"
    j = job(env, jid)
    assert j.status == "succeeded" and j.progress == 1.0 and j.attempts == 1
    assert j.result == {"answer": 42, "applied": True}
    assert seen == ["half way"]
    assert j.started_at <= j.finished_at
    # A second delivery of the same job does nothing.
    assert execute(env, jid).state == "skipped"


def test_lego_error_fails_with_its_message(env, handlers):
    def bad(ctx):
        raise LegoError("class 'zebra' is unknown")

    handlers["test"] = bad
    jid = submit(env)
    assert execute(env, jid).state == "failed"
    j = job(env, jid)
    assert j.status == "failed" and j.error == "class 'zebra' is unknown"


def test_unexpected_error_fails_and_unknown_kind(env, handlers):
    handlers["test"] = lambda ctx: 1 / 0
    jid = submit(env)
    execute(env, jid)
    assert job(env, jid).error.startswith("internal error: ZeroDivisionError")
    jid = submit(env, kind="nope")
    execute(env, jid)
    assert job(env, jid).error == "unknown job kind 'nope'"


def test_transient_error_is_retried_then_gives_up(env, handlers):
    calls = []

    def flaky(ctx):
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("SELECT 1", {}, Exception("connection reset"))
        return Result({"ok": True})

    handlers["test"] = flaky
    jid = submit(env)
    out = execute(env, jid)
    assert out.state == "retry" and out.retry_in is not None
    assert job(env, jid).status == "queued"
    assert execute(env, jid).state == "succeeded"
    assert job(env, jid).attempts == 2

    handlers["test"] = lambda ctx: (_ for _ in ()).throw(ConnectionError("broker gone"))
    jid = submit(env, max_attempts=1)
    assert execute(env, jid).state == "failed"
    assert "gave up after 1 attempts" in job(env, jid).error


def test_deferred_does_not_count_an_attempt(env, handlers):
    state = {"ready": False}

    def waits(ctx):
        if not state["ready"]:
            raise Deferred("waiting for another job", delay_s=0.0)
        return Result()

    handlers["test"] = waits
    jid = submit(env, max_attempts=1)
    for _ in range(3):
        assert execute(env, jid).state == "retry"
    state["ready"] = True
    assert execute(env, jid).state == "succeeded"
    assert job(env, jid).attempts == 1


def test_a_job_is_claimed_once(env, handlers):
    gate = threading.Event()
    runs = []

    def slow(ctx):
        runs.append(ctx.worker)
        gate.wait(10)
        return Result()

    handlers["test"] = slow
    jid = submit(env)
    t = threading.Thread(target=execute, args=(env, jid, "w1"))
    t.start()
    while job(env, jid).status != "running":
        time.sleep(0.01)
    assert execute(env, jid, "w2").state == "busy"
    gate.set()
    t.join()
    assert runs == ["w1"] and job(env, jid).status == "succeeded"


def test_heartbeat_keeps_a_long_job_alive(env, handlers):
    def slow(ctx):
        time.sleep(env.settings.job_stale_s + 1)
        return Result()

    handlers["test"] = slow
    jid = submit(env)
    t = threading.Thread(target=execute, args=(env, jid))
    t.start()
    time.sleep(env.settings.job_stale_s + 0.5)
    assert reap(env) == {"requeued": [], "failed": []}
    t.join()
    assert job(env, jid).status == "succeeded"


def _make_stale(env, jid, worker="dead-host:1", attempts=1):
    with env.catalog.session() as s:
        j = s.get(Job, jid)
        j.status, j.worker, j.attempts = "running", worker, attempts
        j.heartbeat_at = utcnow() - timedelta(seconds=env.settings.job_stale_s + 5)


def test_reaper_requeues_then_fails_dead_jobs(env, handlers):
    handlers["test"] = lambda ctx: Result({"done": True})
    jid = submit(env, max_attempts=2)
    _make_stale(env, jid, attempts=1)
    dispatched = []
    assert reap(env, dispatched.append) == {"requeued": [jid], "failed": []}
    assert dispatched == [jid] and job(env, jid).status == "queued"
    # The requeued job runs again and succeeds.
    assert execute(env, jid).state == "succeeded"

    jid = submit(env, max_attempts=2)
    _make_stale(env, jid, attempts=2)
    assert reap(env) == {"requeued": [], "failed": [jid]}
    j = job(env, jid)
    assert j.status == "failed" and "dead-host:1 stopped responding" in j.error
    # A late result from the dead worker is dropped.
    handlers["test"] = lambda ctx: Result()
    assert execute(env, jid).state == "skipped"


def test_embedded_runner_runs_queued_jobs_in_order(env, handlers):
    order = []

    def record(ctx):
        order.append(ctx.payload["n"])
        return Result()

    handlers["test"] = record
    runner = EmbeddedRunner(env).start()
    try:
        ids = [submit(env, payload={"n": n}) for n in range(3)]
        runner.wake()
        for jid in ids:
            wait_job(lambda jid=jid: {"status": job(env, jid).status}, timeout=30)
        assert order == [0, 1, 2]
        assert runner.alive()
    finally:
        runner.stop()


def test_cancel_a_queued_job_ends_it_at_once(env, handlers):
    handlers["test"] = lambda ctx: Result()
    jid = submit(env)
    with env.catalog.session() as s:
        request_cancel(s, jid)
    j = job(env, jid)
    assert j.status == "cancelled" and j.finished_at and j.cancel_requested_at
    assert execute(env, jid).state == "skipped"  # a message still in the queue: nothing
    assert job(env, jid).status == "cancelled"


def _stored(ctx, tmp_path, text: str) -> str:
    f = tmp_path / f"{text}.bin"
    f.write_text(text)
    return ctx.store_file(f)[0]


def test_cancel_stops_a_running_job_at_its_next_progress_point(env, handlers, tmp_path):
    steps, shas = [], []

    def slow(ctx):
        shas.append(_stored(ctx, tmp_path, "partial"))
        for i in range(400):
            ctx.progress(i / 400, f"step {i}")
            steps.append(i)
            time.sleep(0.02)
        return Result()

    handlers["test"] = slow
    jid = submit(env)
    outcome = []
    t = threading.Thread(target=lambda: outcome.append(execute(env, jid)))
    t.start()
    wait_job(lambda: {"status": "succeeded" if len(steps) > 5 else "running"}, timeout=30)
    with env.catalog.session() as s:
        request_cancel(s, jid)
    t.join(timeout=30)
    assert outcome[0].state == "cancelled" and len(steps) < 400
    j = job(env, jid)
    assert j.status == "cancelled" and j.finished_at and j.error is None
    assert not env.storage.exists(shas[0])  # its partial artifact is gone


def test_cancel_after_the_last_progress_point_still_cancels(env, handlers, tmp_path):
    stored, go, shas = threading.Event(), threading.Event(), []

    def finishing(ctx):
        shas.append(_stored(ctx, tmp_path, "whole"))
        stored.set()
        go.wait(30)
        return Result({"artifact": shas[0]})

    handlers["test"] = finishing
    jid = submit(env)
    outcome = []
    t = threading.Thread(target=lambda: outcome.append(execute(env, jid)))
    t.start()
    assert stored.wait(30)
    with env.catalog.session() as s:
        request_cancel(s, jid)
    go.set()
    t.join(timeout=30)
    assert outcome[0].state == "cancelled" and job(env, jid).status == "cancelled"
    assert not env.storage.exists(shas[0])


def test_reaper_ends_a_dead_job_that_was_being_cancelled(env, handlers):
    jid = submit(env)
    with env.catalog.session() as s:
        j = s.get(Job, jid)
        j.status, j.worker, j.attempts = "running", "dead-host:1", 1
        j.heartbeat_at = utcnow() - timedelta(seconds=60)
        j.cancel_requested_at = utcnow()
    assert reap(env)["cancelled"] == [jid]
    assert job(env, jid).status == "cancelled"
