"""What one running API holds: settings, catalog, storage, job dispatch, model cache."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from fastapi import Request

from app.catalog import Catalog, Job, get_catalog, utcnow
from app.errors import ApiError
from app.predict import ModelCache
from app.settings import Settings
from app.storage import Storage
from worker.embedded import EmbeddedRunner
from worker.runtime import Env, Reaper

log = logging.getLogger("lego.api")


@dataclass
class Services:
    settings: Settings
    catalog: Catalog
    storage: Storage
    models: ModelCache
    runner: EmbeddedRunner | None = None
    reaper: Reaper | None = None
    background: bool = field(default=True)

    @classmethod
    def create(cls, settings: Settings, background: bool = True) -> Services:
        return cls(
            settings=settings,
            catalog=get_catalog(settings.resolved_database_url),
            storage=Storage(settings.resolved_storage_dir),
            models=ModelCache(settings.predict_cache_size),
            background=background,
        )

    @property
    def env(self) -> Env:
        return Env(self.settings, self.catalog, self.storage)

    def start(self) -> None:
        if not self.background:
            return
        self.storage.clean_tmp()  # what crashed writers left behind
        if self.settings.embedded_broker:
            self.runner = EmbeddedRunner(self.env).start()
        queue_empty = None
        if not self.settings.embedded_broker:
            from worker.celery_app import queue_empty as broker_queue_empty

            def queue_empty() -> bool:
                return broker_queue_empty(self.settings)

        self.reaper = Reaper(self.env, self.redispatch, queue_empty).start()

    def stop(self) -> None:
        if self.runner:
            self.runner.stop()
        if self.reaper:
            self.reaper.stop()
        self.models.clear()  # stops the models' batching threads

    def redispatch(self, job_id: int) -> None:
        if self.settings.embedded_broker:
            if self.runner:
                self.runner.wake()
        else:
            from worker.celery_app import send

            send(self.settings, job_id)

    def dispatch(self, job_id: int) -> None:
        """Hand a committed, queued job to whoever runs jobs; 503 if the broker is down."""
        try:
            self.redispatch(job_id)
        except Exception as exc:
            log.exception("could not dispatch job %s", job_id)
            with self.catalog.session() as s:
                job = s.get(Job, job_id)
                if job is not None and job.status == "queued":
                    job.status, job.finished_at = "failed", utcnow()
                    job.error = f"could not reach the job broker: {exc}"
            raise ApiError(
                503, "the job broker is unreachable; try again later", "broker-unavailable"
            ) from exc

    def broker_ok(self) -> tuple[bool, str]:
        if self.settings.embedded_broker:
            ok = self.runner is not None and self.runner.alive()
            return ok, "embedded runner " + ("running" if ok else "not running")
        from worker.celery_app import client

        try:
            with client(
                self.settings.broker_url, self.settings.cpu_queue
            ).connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=3)
            return True, "reachable"
        except Exception as exc:
            return False, f"unreachable: {exc}"


async def services(request: Request) -> Services:
    # async: FastAPI would run a plain def dependency in the thread pool (a hop per request)
    return request.app.state.services
