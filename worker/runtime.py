"""Job lifecycle shared by the Celery tasks and the embedded runner.

A job is a row in the catalog. Whoever runs it (a Celery worker process or the
API's embedded runner thread) calls `execute(env, job_id)`, which

1. claims the row with a conditional UPDATE (queued -> running), so a job runs
   once however many messages or runners ask for it;
2. keeps `heartbeat_at` fresh from a side thread while the job runs;
3. calls the handler for the job's kind (worker.tasks), which calls lego_core and
   reports progress;
4. records the outcome in one transaction that only applies while this runner
   still owns the job.

`request_cancel(session, job_id)` ends a queued job at once (`cancelled`); a running
job ends `cancelled` at its next progress point, and the artifacts it stored are
deleted unless another row uses them.

`reap(env)` finds running jobs whose heartbeat is older than `job_stale_s` (their
process died: SIGKILL, OOM, lost machine) and puts them back in the queue, or
marks them failed once they used `job_max_attempts` attempts.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from app.catalog import Catalog, Job, get_catalog, utcnow
from app.settings import Settings
from app.storage import Storage

log = logging.getLogger("lego.jobs")

try:  # Celery's soft time limit raises this inside the task.
    from billiard.exceptions import SoftTimeLimitExceeded
except ImportError:  # pragma: no cover

    class SoftTimeLimitExceeded(Exception):  # type: ignore[no-redef]
        pass


try:
    from redis.exceptions import ConnectionError as RedisConnectionError
except ImportError:  # pragma: no cover
    RedisConnectionError = ConnectionError  # type: ignore[misc,assignment]

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OperationalError,
    ConnectionError,
    TimeoutError,
    RedisConnectionError,
)


class Cancelled(Exception):
    """Raised at a progress point of a job whose cancellation was requested."""


class Deferred(Exception):
    """The job cannot run yet (it waits for another job); try again later."""

    def __init__(self, message: str, delay_s: float) -> None:
        super().__init__(message)
        self.delay_s = delay_s


@dataclass
class Env:
    """What a job needs: settings, the catalog and the artifact storage."""

    settings: Settings
    catalog: Catalog
    storage: Storage

    @classmethod
    def from_settings(cls, settings: Settings) -> Env:
        return cls(
            settings,
            get_catalog(settings.resolved_database_url),
            Storage(settings.resolved_storage_dir),
        )


@dataclass
class Outcome:
    state: str  # succeeded, failed, retry, busy, skipped
    retry_in: float | None = None


@dataclass
class Result:
    """What a handler returns: a JSON result and catalog changes applied on success."""

    data: dict[str, Any] = field(default_factory=dict)
    apply: Callable[[Session], dict[str, Any] | None] | None = None


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def resolve_device(setting: str) -> str:
    from lego_core.device import resolve_device as resolve

    return resolve(setting)


class JobContext:
    """Handed to a job handler: its payload, environment and progress reporting."""

    def __init__(self, env: Env, job: Job, worker: str) -> None:
        self.env = env
        self.job_id = job.id
        self.owner = job.owner
        self.kind = job.kind
        self.payload = dict(job.payload or {})
        self.worker = worker
        self.stored: list[str] = []  # artifacts stored by this run (removed if cancelled)
        self._last = 0.0

    @property
    def device(self) -> str:
        """Where the job's forward passes run (LEGO_DEVICE; an error inside the job when
        it names a GPU that is not there)."""
        return resolve_device(self.env.settings.device)

    @property
    def storage(self) -> Storage:
        return self.env.storage

    def session(self):
        return self.env.catalog.session()

    def store_file(self, path) -> tuple[str, int]:
        """storage.store_file, remembering the artifact (a cancelled run removes it)."""
        sha, size = self.storage.store_file(path)
        self.stored.append(sha)
        return sha, size

    def progress(self, fraction: float, message: str = "") -> None:
        """Record progress (at most a few writes a second); also a heartbeat. Raises
        Cancelled when the job's cancellation was requested."""
        now = time.monotonic()
        if fraction < 1.0 and now - self._last < 0.5:
            return
        self._last = now
        fraction = min(max(float(fraction), 0.0), 1.0)
        try:
            with self.session() as s:
                res = s.execute(
                    update(Job)
                    .where(
                        Job.id == self.job_id,
                        Job.status == "running",
                        Job.worker == self.worker,
                        Job.cancel_requested_at.is_(None),
                    )
                    .values(progress=fraction, message=message[:500], heartbeat_at=utcnow())
                )
                written = res.rowcount == 1
        except DBAPIError:  # progress is best effort; the heartbeat thread retries
            log.warning("job %s: could not record progress", self.job_id, exc_info=True)
            return
        if not written and cancel_requested(self.env, self.job_id):
            raise Cancelled(f"job {self.job_id} was cancelled")

    def sub(self, start: float, end: float) -> Callable[[float, str], None]:
        """A progress callback that maps 0..1 onto start..end of this job."""

        def cb(fraction: float, message: str = "") -> None:
            self.progress(start + (end - start) * min(max(float(fraction), 0.0), 1.0), message)

        return cb


class Heartbeat:
    """A thread that refreshes the job's heartbeat until stopped."""

    def __init__(self, env: Env, job_id: int, worker: str) -> None:
        self.env, self.job_id, self.worker = env, job_id, worker
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.env.settings.job_heartbeat_s):
            try:
                with self.env.catalog.session() as s:
                    s.execute(
                        update(Job)
                        .where(
                            Job.id == self.job_id,
                            Job.status == "running",
                            Job.worker == self.worker,
                        )
                        .values(heartbeat_at=utcnow())
                    )
            except Exception:  # keep beating; the reaper decides when it is too late
                log.warning("job %s: heartbeat failed", self.job_id, exc_info=True)


# --------------------------------------------------------------------------- submit


def create_job(session: Session, owner: str, kind: str, payload: dict, max_attempts: int) -> Job:
    job = Job(
        owner=owner,
        kind=kind,
        status="queued",
        payload=payload,
        max_attempts=max_attempts,
        progress=0.0,
        message="queued",
        attempts=0,
    )
    session.add(job)
    session.flush()
    return job


# --------------------------------------------------------------------------- execute


def request_cancel(session: Session, job_id: int) -> None:
    """Cancel a job: a queued one ends `cancelled` now; a running one is asked to stop
    (it ends `cancelled` at its next progress point). Finished jobs are left alone."""
    now = utcnow()
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .values(
            status="cancelled",
            cancel_requested_at=now,
            finished_at=now,
            message="cancelled",
            worker=None,
        )
    )
    if res.rowcount != 1:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "running", Job.cancel_requested_at.is_(None))
            .values(cancel_requested_at=now, message="cancelling")
        )


def cancel_requested(env: Env, job_id: int) -> bool:
    with env.catalog.session() as s:
        return s.scalar(select(Job.cancel_requested_at).where(Job.id == job_id)) is not None


def _cancel(env: Env, ctx: JobContext) -> Outcome:
    """End a running job `cancelled`, deleting the artifacts it stored (unless in use)."""
    from app.catalog import artifact_in_use

    now = utcnow()
    ok = _finish(
        env,
        ctx.job_id,
        ctx.worker,
        {"status": "cancelled", "finished_at": now, "message": "cancelled", "error": None},
    )
    with env.catalog.session() as s:
        for sha in ctx.stored:
            if not artifact_in_use(s, sha):
                env.storage.delete(sha)
    log.info("job %s cancelled%s", ctx.job_id, "" if ok else " (outcome dropped)")
    return Outcome("cancelled")


def claim(env: Env, job_id: int, worker: str) -> Job | None:
    now = utcnow()
    with env.catalog.session() as s:
        res = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "queued", Job.cancel_requested_at.is_(None))
            .values(
                status="running",
                attempts=Job.attempts + 1,
                worker=worker,
                started_at=now,
                heartbeat_at=now,
                error=None,
                message="started",
                run_after=None,
            )
        )
        if res.rowcount != 1:
            return None
    with env.catalog.session() as s:
        return s.get(Job, job_id)


def _finish(env: Env, job_id: int, worker: str, values: dict, apply=None) -> bool:
    """Write the outcome if this worker still owns the job (one transaction)."""
    with env.catalog.session() as s:
        res = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "running", Job.worker == worker)
            .values(**values)
        )
        if res.rowcount != 1:
            s.rollback()
            log.warning("job %s: no longer owned by %s; outcome dropped", job_id, worker)
            return False
        if apply is not None:
            extra = apply(s)
            if extra:
                job = s.get(Job, job_id)
                job.result = {**(job.result or {}), **extra}
        return True


def _fail(env: Env, job_id: int, worker: str, error: str) -> Outcome:
    _finish(
        env,
        job_id,
        worker,
        {"status": "failed", "error": error[:4000], "finished_at": utcnow(), "message": "failed"},
    )
    return Outcome("failed")


def _requeue(
    env: Env, job_id: int, worker: str, delay: float, message: str, count_attempt: bool
) -> Outcome:
    values: dict[str, Any] = {
        "status": "queued",
        "worker": None,
        "message": message[:500],
        "run_after": utcnow() + timedelta(seconds=delay),
    }
    if not count_attempt:
        values["attempts"] = Job.attempts - 1
    _finish(env, job_id, worker, values)
    with env.catalog.session() as s:  # cancelled while it ran: it ends here
        request_cancel_if_asked(s, job_id)
    return Outcome("retry", retry_in=delay)


def request_cancel_if_asked(session: Session, job_id: int) -> None:
    now = utcnow()
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued", Job.cancel_requested_at.is_not(None))
        .values(status="cancelled", finished_at=now, message="cancelled")
    )


def execute(env: Env, job_id: int, worker: str | None = None) -> Outcome:
    """Run one job to its end (or to a retry); see the module docstring."""
    from lego_core.errors import LegoError
    from worker.tasks import HANDLERS

    worker = worker or worker_name()
    job = claim(env, job_id, worker)
    if job is None:
        with env.catalog.session() as s:
            status = s.scalar(select(Job.status).where(Job.id == job_id))
        # Another runner has it (a duplicate message), or it is finished or gone.
        return Outcome("busy" if status == "running" else "skipped")

    ctx = JobContext(env, job, worker)
    log.info("job %s (%s) attempt %s started on %s", job.id, job.kind, job.attempts, worker)
    with Heartbeat(env, job.id, worker):
        try:
            if env.settings.debug_job_delay_s > 0:
                ctx.progress(0.0, "debug delay")
                time.sleep(env.settings.debug_job_delay_s)
            handler = HANDLERS.get(job.kind)
            if handler is None:
                raise LegoError(f"unknown job kind {job.kind!r}")
            result = handler(ctx)
            if cancel_requested(env, job.id):  # asked after its last progress point
                raise Cancelled(f"job {job.id} was cancelled")
        except Cancelled:
            return _cancel(env, ctx)
        except Deferred as exc:
            return _requeue(env, job.id, worker, exc.delay_s, str(exc), count_attempt=False)
        except LegoError as exc:
            return _fail(env, job.id, worker, str(exc))
        except SoftTimeLimitExceeded:
            return _fail(
                env, job.id, worker, f"time limit of {env.settings.job_time_limit_s} s exceeded"
            )
        except TRANSIENT_ERRORS as exc:
            if job.attempts < job.max_attempts:
                delay = env.settings.job_retry_delay_s * job.attempts
                log.warning("job %s: transient error, retry in %ss: %s", job.id, delay, exc)
                return _requeue(
                    env, job.id, worker, delay, f"retrying after: {exc}", count_attempt=True
                )
            return _fail(
                env,
                job.id,
                worker,
                f"gave up after {job.attempts} attempts: {type(exc).__name__}: {exc}",
            )
        except Exception as exc:
            if storage_full(env, exc):
                return _fail(env, job.id, worker, f"the artifact storage is full: {exc}")
            log.exception("job %s failed", job.id)
            return _fail(env, job.id, worker, f"internal error: {type(exc).__name__}: {exc}")
        except BaseException:
            # Shutdown (SystemExit, KeyboardInterrupt): hand the job back, do not count it.
            _requeue(env, job.id, worker, 0.0, "interrupted; queued again", count_attempt=False)
            raise
        ok = _finish(
            env,
            job.id,
            worker,
            {
                "status": "succeeded",
                "progress": 1.0,
                "message": "done",
                "result": result.data,
                "finished_at": utcnow(),
                "error": None,
            },
            apply=result.apply,
        )
    log.info("job %s finished: %s", job.id, "succeeded" if ok else "dropped")
    return Outcome("succeeded" if ok else "skipped")


# --------------------------------------------------------------------------- reaper


def reap(
    env: Env,
    dispatch: Callable[[int], None] | None = None,
    queue_empty: Callable[[], bool] | None = None,
) -> dict[str, list[int]]:
    """Requeue or fail running jobs whose heartbeat stopped; returns the job ids.

    With `queue_empty` (a broker), also send again queued jobs whose message was lost.
    """
    stale_s = env.settings.job_stale_s
    cutoff = utcnow() - timedelta(seconds=stale_s)
    requeued: list[int] = []
    failed: list[int] = []
    cancelled: list[int] = []
    with env.catalog.session() as s:
        stale = s.execute(
            select(Job.id, Job.worker, Job.attempts, Job.max_attempts).where(
                Job.status == "running", Job.heartbeat_at < cutoff
            )
        ).all()
    for job_id, worker, attempts, max_attempts in stale:
        with env.catalog.session() as s:
            cond = update(Job).where(
                Job.id == job_id, Job.status == "running", Job.heartbeat_at < cutoff
            )
            res = s.execute(  # its cancellation was asked for: it ends here
                cond.where(Job.cancel_requested_at.is_not(None)).values(
                    status="cancelled", finished_at=utcnow(), message="cancelled"
                )
            )
            if res.rowcount == 1:
                cancelled.append(job_id)
                continue
            if attempts < max_attempts:
                res = s.execute(
                    cond.values(
                        status="queued",
                        worker=None,
                        run_after=None,
                        heartbeat_at=utcnow(),  # for a queued job: when it was last sent
                        message=f"worker {worker} stopped responding; queued again",
                    )
                )
                if res.rowcount == 1:
                    requeued.append(job_id)
            else:
                res = s.execute(
                    cond.values(
                        status="failed",
                        finished_at=utcnow(),
                        message="failed",
                        error=(
                            f"worker {worker} stopped responding (no heartbeat for {stale_s:g} s) "
                            f"on attempt {attempts} of {max_attempts}"
                        ),
                    )
                )
                if res.rowcount == 1:
                    failed.append(job_id)
    if requeued or failed:
        log.warning("reaper: requeued %s, failed %s", requeued, failed)
    for job_id in requeued:
        if dispatch is not None:
            try:
                dispatch(job_id)
            except Exception:
                log.exception("reaper: could not dispatch job %s", job_id)
    out = {"requeued": requeued, "failed": failed}
    if cancelled:
        out["cancelled"] = cancelled
    if dispatch is not None and queue_empty is not None:
        resent = resend_lost(env, dispatch, queue_empty)
        if resent:
            out["resent"] = resent
    return out


def resend_lost(
    env: Env, dispatch: Callable[[int], None], queue_empty: Callable[[], bool]
) -> list[int]:
    """Send again the queued jobs whose broker message was lost.

    A broker that restarts without persistence loses its queue, and a worker that dies
    holding a delayed retry takes that message with it; the catalog still says `queued`.
    Such a job has waited more than `job_stale_s` since it was queued, sent or due, while
    the broker's queue is empty (a worker holds only the messages of jobs it runs, so an
    empty queue means nobody will deliver it). Sending a duplicate is harmless: a job is
    claimed once. `heartbeat_at` of a queued job records when it was last sent.
    """
    cutoff = utcnow() - timedelta(seconds=env.settings.job_stale_s)
    waited = (
        Job.status == "queued",
        func.coalesce(Job.heartbeat_at, Job.created_at) < cutoff,
        Job.created_at < cutoff,
        or_(Job.run_after.is_(None), Job.run_after < cutoff),
    )
    with env.catalog.session() as s:
        candidates = list(s.scalars(select(Job.id).where(*waited).order_by(Job.id).limit(1000)))
    if not candidates:
        return []
    try:
        if not queue_empty():
            return []
    except Exception:  # the broker is down: nothing can be sent now anyway
        log.warning("reaper: cannot read the broker's queue", exc_info=True)
        return []
    resent: list[int] = []
    for job_id in candidates:
        with env.catalog.session() as s:  # one reaper wins each job
            res = s.execute(
                update(Job).where(Job.id == job_id, *waited).values(heartbeat_at=utcnow())
            )
            if res.rowcount != 1:
                continue
        try:
            dispatch(job_id)
        except Exception:
            log.exception("reaper: could not send job %s again", job_id)
            break
        resent.append(job_id)
    if resent:
        log.warning(
            "reaper: sent again %d queued jobs whose message was lost: %s", len(resent), resent
        )
    return resent


def storage_full(env: Env, exc: BaseException) -> bool:
    """Whether a job failed because the artifact disk is full: ENOSPC/EDQUOT anywhere in
    the exception's chain (torch's writers wrap it in a RuntimeError), or no space left."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(env.storage.root).free < 64 * 1024
    except OSError:
        return False


def sweep_orphans(env: Env) -> list[str]:
    """Delete artifacts that no row references and temp files, older than `orphan_grace_s`.

    A job that stored its artifact and then could not record it (its worker died, or the
    database went away) leaves an object nobody references; a killed writer leaves a temp
    file. Objects are written (or, when they exist, touched) just before the row that
    references them is committed, so an old unreferenced object is an orphan.
    """
    from app.catalog import artifact_in_use

    cutoff = time.time() - env.settings.orphan_grace_s
    removed: list[str] = []

    def old(p) -> bool:
        try:
            return p.is_file() and p.stat().st_mtime < cutoff
        except OSError:
            return False

    candidates = [p for p in env.storage.objects.glob("*/*") if old(p)]
    if candidates:
        with env.catalog.session() as s:
            for p in candidates:
                if not artifact_in_use(s, p.name) and old(p):
                    env.storage.delete(p.name)
                    removed.append(p.name)
    env.storage.clean_tmp(older_than_s=env.settings.orphan_grace_s)
    if removed:
        log.warning("reaper: deleted %d orphaned artifacts", len(removed))
    return removed


class Reaper:
    """A daemon thread that calls `reap` every `reaper_interval_s`."""

    def __init__(
        self,
        env: Env,
        dispatch: Callable[[int], None] | None,
        queue_empty: Callable[[], bool] | None = None,
    ) -> None:
        self.env, self.dispatch, self.queue_empty = env, dispatch, queue_empty
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lego-reaper", daemon=True)

    def start(self) -> Reaper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        last_sweep = time.monotonic()
        sweep_every = max(self.env.settings.orphan_grace_s / 4, self.env.settings.reaper_interval_s)
        while not self._stop.wait(self.env.settings.reaper_interval_s):
            try:
                reap(self.env, self.dispatch, self.queue_empty)
                if time.monotonic() - last_sweep >= sweep_every:
                    last_sweep = time.monotonic()
                    sweep_orphans(self.env)
            except Exception:
                log.warning("reaper pass failed", exc_info=True)
