"""The job machinery's answers to lost broker messages and a full disk (no lego_core work:
test-only job kinds). The soak tests show the same on the real stack."""

from __future__ import annotations

import errno
from datetime import timedelta

import pytest
from service_helpers import make_settings

from app.catalog import Job, upgrade, utcnow
from worker import tasks
from worker.runtime import Env, Result, create_job, execute, reap


@pytest.fixture
def env(tmp_path):
    settings = make_settings(tmp_path)
    upgrade(settings.resolved_database_url)
    e = Env.from_settings(settings)
    yield e
    e.catalog.dispose()


def _queued(env, age_s: float, **values) -> int:
    with env.catalog.session() as s:
        j = create_job(s, "alice", "test", {}, 2)
        j.created_at = utcnow() - timedelta(seconds=age_s)
        for k, v in values.items():
            setattr(j, k, v)
        return j.id


def test_queued_jobs_whose_message_was_lost_are_sent_again(env):
    stale = env.settings.job_stale_s
    old = _queued(env, stale + 5)
    fresh = _queued(env, 0)
    waiting = _queued(env, stale + 5, run_after=utcnow() + timedelta(seconds=60))
    sent: list[int] = []
    # The broker still holds messages: nothing is lost yet.
    assert "resent" not in reap(env, sent.append, lambda: False)
    assert sent == []
    # The broker's queue is empty (it restarted): the old job is sent again, once.
    assert reap(env, sent.append, lambda: True)["resent"] == [old]
    assert "resent" not in reap(env, sent.append, lambda: True)
    assert sent == [old]

    # A broker that cannot be read: nothing is sent, nothing breaks.
    def down() -> bool:
        raise ConnectionError("broker down")

    with env.catalog.session() as s:
        s.get(Job, fresh).created_at = utcnow() - timedelta(seconds=stale + 5)
    assert "resent" not in reap(env, sent.append, down)
    assert reap(env, sent.append, lambda: True)["resent"] == [fresh]
    assert waiting not in sent


def test_a_full_disk_fails_the_job_with_a_reason(env, monkeypatch):
    registry = dict(tasks.HANDLERS)
    monkeypatch.setattr(tasks, "HANDLERS", registry)

    def full(ctx) -> Result:
        raise OSError(errno.ENOSPC, "No space left on device")

    registry["test"] = full
    jid = _queued(env, 0)
    assert execute(env, jid).state == "failed"
    with env.catalog.session() as s:
        assert s.get(Job, jid).error.startswith("the artifact storage is full")
