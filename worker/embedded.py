"""The embedded job runner: jobs without a broker (`LEGO_BROKER_URL` empty).

A thread in the API process takes queued jobs from the catalog, oldest first,
and runs them with the same `worker.runtime.execute` the Celery task calls.
Claiming is a conditional UPDATE, so several runners (or API processes sharing
one catalog) never run a job twice.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy import or_, select

from app.catalog import Job, utcnow
from worker.runtime import Env, execute

log = logging.getLogger("lego.embedded")


class EmbeddedRunner:
    def __init__(self, env: Env, threads: int = 1) -> None:
        self.env = env
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, name=f"lego-runner-{i}", daemon=True)
            for i in range(max(1, threads))
        ]

    def start(self) -> EmbeddedRunner:
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout=timeout)

    def alive(self) -> bool:
        return all(t.is_alive() for t in self._threads)

    def wake(self, _job_id: int | None = None) -> None:
        self._wake.set()

    def _next(self) -> int | None:
        with self.env.catalog.session() as s:
            return s.scalar(
                select(Job.id)
                .where(
                    Job.status == "queued", or_(Job.run_after.is_(None), Job.run_after <= utcnow())
                )
                .order_by(Job.id)
                .limit(1)
            )

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job_id = self._next()
                if job_id is None:
                    self._wake.wait(self.env.settings.runner_poll_s)
                    self._wake.clear()
                    continue
                execute(self.env, job_id)
            except Exception:
                log.exception("embedded runner: pass failed")
                self._stop.wait(self.env.settings.runner_poll_s)
