"""The Celery application of the full stack: `celery -A worker.celery_app worker` or `lego worker`.

The task is a thin wrapper: `worker.runtime.execute` claims the job row, runs it
and records the outcome; the same function runs jobs in the embedded mode.

Reliability settings: `acks_late` (the message is acknowledged after the job,
so a worker that dies mid-job leaves it in the broker) with
`reject_on_worker_lost` (a pool child killed mid-job puts its message back at
once); soft and hard time limits; retries with backoff for transient errors
(database or broker unreachable). Duplicate deliveries are harmless: a job row
can be claimed only once.
"""

from __future__ import annotations

import functools

from celery import Celery
from sqlalchemy.exc import OperationalError

from app.settings import Settings, get_settings
from worker.runtime import Env, execute

TASK_NAME = "lego.run_job"
BUSY_RETRIES = 20


def make_celery(settings: Settings) -> Celery:
    c = Celery(
        "lego", broker=settings.broker_url or "memory://", backend=settings.result_backend or None
    )
    queue = settings.worker_queues.split(",")[0].strip() or "lego"
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


@functools.lru_cache(maxsize=8)
def client(broker_url: str, queue: str) -> Celery:
    """A publishing client for the API (which may be configured apart from this module)."""
    return make_celery(Settings(broker_url=broker_url, worker_queues=queue))


def send(settings: Settings, job_id: int) -> None:
    queue = settings.worker_queues.split(",")[0].strip() or "lego"
    client(settings.broker_url, queue).send_task(TASK_NAME, args=[job_id], queue=queue)


def queue_empty(settings: Settings) -> bool:
    """Whether the broker holds no message for the first queue (a missing queue is empty)."""
    from kombu.exceptions import ChannelError

    queue = settings.worker_queues.split(",")[0].strip() or "lego"
    with client(settings.broker_url, queue).connection_for_read() as conn:
        conn.ensure_connection(max_retries=1, timeout=3)
        try:
            return conn.default_channel.queue_declare(queue=queue, passive=True).message_count == 0
        except ChannelError:
            return True
