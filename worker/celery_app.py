"""The Celery application of the full stack: `celery -A worker.celery_app worker` or `lego worker`.

The task is a thin wrapper: `worker.runtime.execute` claims the job row, runs it
and records the outcome; the same function runs jobs in the embedded mode.

Reliability settings: `acks_late` (the message is acknowledged after the job,
so a worker that dies mid-job leaves it in the broker) with
`reject_on_worker_lost` (a pool child killed mid-job puts its message back at
once); soft and hard time limits; retries with backoff for transient errors
(database or broker unreachable). Duplicate deliveries are harmless: a job row
can be claimed only once.

Queues: CPU workers consume `LEGO_CPU_QUEUE` (default `lego`), GPU workers
`LEGO_GPU_QUEUE` (default `lego-gpu`). `send` puts a job on the GPU queue while a
worker consumes it (asked with Celery's remote control, `inspect().active_queues()`,
and remembered for `LEGO_GPU_PROBE_TTL_S`), otherwise on the CPU queue. A job sent
to the GPU queue whose worker then went away is sent again by the reaper (its
queue counts as empty without a consumer), and so reaches a CPU worker.
"""

from __future__ import annotations

import functools
import threading
import time

from celery import Celery
from sqlalchemy.exc import OperationalError

from app.settings import Settings, get_settings
from worker.runtime import Env, execute
from worker.shards import SHARD_TASK, run_shard_task

TASK_NAME = "lego.run_job"
BUSY_RETRIES = 20
GPU_PROBE_TIMEOUT_S = 0.5


def make_celery(settings: Settings) -> Celery:
    c = Celery(
        "lego", broker=settings.broker_url or "memory://", backend=settings.result_backend or None
    )
    queue = settings.cpu_queue or "lego"
    c.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        task_ignore_result=not settings.result_backend,
        task_default_queue=queue,
        task_soft_time_limit=settings.job_time_limit_s,
        task_time_limit=settings.job_time_limit_s + 60,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        broker_transport_options={
            # Unacknowledged messages come back after this; longer than any job.
            "visibility_timeout": settings.job_time_limit_s + 600,
            "socket_timeout": 10,
            "socket_connect_timeout": 5,
        },
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 1,
        },
    )
    return c


celery = make_celery(get_settings())
app = celery


@functools.lru_cache
def _env() -> Env:
    return Env.from_settings(get_settings())


@celery.task(
    name=TASK_NAME,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=(OperationalError, ConnectionError),
    retry_backoff=True,
    retry_backoff_max=60,
    max_retries=5,
)
def run_job(self, job_id: int) -> str:
    outcome = execute(_env(), job_id)
    if outcome.state == "retry":
        raise self.retry(countdown=outcome.retry_in or 0, max_retries=None)
    if outcome.state == "busy":
        # Redelivered while another worker holds the job: look again once its
        # heartbeat would have gone stale; the reaper requeues it if it did.
        raise self.retry(countdown=_env().settings.job_stale_s, max_retries=BUSY_RETRIES)
    return outcome.state


@celery.task(
    name=SHARD_TASK,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=(OperationalError, ConnectionError),
    retry_backoff=True,
    max_retries=5,
)
def locate_shard(job_id: int, phase: str, k: int, count: int) -> str:
    """Shard k of a locate job split across workers (worker/shards.py)."""
    return run_shard_task(_env(), job_id, phase, k, count)


@functools.lru_cache(maxsize=8)
def client(broker_url: str, queue: str) -> Celery:
    """A publishing client for the API (which may be configured apart from this module)."""
    return make_celery(Settings(broker_url=broker_url, cpu_queue=queue))


def consumed_queues(settings: Settings, timeout: float = GPU_PROBE_TIMEOUT_S) -> set[str]:
    """The queues that live workers consume now (Celery remote control)."""
    c = client(settings.broker_url, settings.cpu_queue)
    replies = c.control.inspect(timeout=timeout).active_queues() or {}
    return {q.get("name") for queues in replies.values() for q in (queues or [])}


class GpuProbe:
    """Whether a worker consumes the GPU queue. The first look waits for the workers'
    answers (GPU_PROBE_TIMEOUT_S); afterwards a look older than `gpu_probe_ttl_s` is
    renewed in a background thread while the last answer is used, so that sending a
    job never waits for it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.up: bool | None = None
        self.at = 0.0
        self._lock = threading.Lock()
        self._refreshing = False

    def _look(self) -> None:
        try:
            up = self.settings.gpu_queue in consumed_queues(self.settings)
        except Exception:  # noqa: BLE001 - no answer: send to the CPU workers
            up = False
        with self._lock:
            self.up, self.at, self._refreshing = up, time.monotonic(), False

    def __call__(self) -> bool:
        if self.up is None:
            self._look()
        elif time.monotonic() - self.at > self.settings.gpu_probe_ttl_s:
            with self._lock:
                start, self._refreshing = not self._refreshing, True
            if start:
                threading.Thread(target=self._look, name="lego-gpu-probe", daemon=True).start()
        return bool(self.up)


_probes: dict[tuple, GpuProbe] = {}
_probes_lock = threading.Lock()


def gpu_worker_up(settings: Settings) -> bool:
    """Whether a worker consumes the GPU queue (see GpuProbe)."""
    if not settings.gpu_queue:
        return False
    key = (settings.broker_url, settings.cpu_queue, settings.gpu_queue, settings.gpu_probe_ttl_s)
    with _probes_lock:
        probe = _probes.setdefault(key, GpuProbe(settings))
    return probe()


def job_queue(settings: Settings) -> str:
    """Where a job goes: the GPU queue while a GPU worker is up, else the CPU queue."""
    return settings.gpu_queue if gpu_worker_up(settings) else settings.cpu_queue


def send(settings: Settings, job_id: int) -> str:
    """Sends the job to its queue; returns the queue."""
    queue = job_queue(settings)
    client(settings.broker_url, settings.cpu_queue).send_task(TASK_NAME, args=[job_id], queue=queue)
    return queue


def queue_empty(settings: Settings) -> bool:
    """Whether no queued message will be delivered: the CPU queue is empty, and so is
    the GPU queue unless no worker consumes it (a missing queue is empty)."""
    from kombu.exceptions import ChannelError

    queues = [settings.cpu_queue]
    if gpu_worker_up(settings):
        queues.append(settings.gpu_queue)
    with client(settings.broker_url, settings.cpu_queue).connection_for_read() as conn:
        conn.ensure_connection(max_retries=1, timeout=3)
        for queue in queues:
            try:
                if conn.default_channel.queue_declare(queue=queue, passive=True).message_count:
                    return False
            except ChannelError:
                continue
    return True
