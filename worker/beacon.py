"""Which Celery workers are alive: each `lego worker` keeps a key with a short expiry in
the broker's Redis (`lego:worker:<host>:<pid>`), refreshed from a thread; the API's
/readyz and the worker's container healthcheck (`lego workers --this-host`) read them.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from app.settings import Settings

log = logging.getLogger("lego.jobs")
PREFIX = "lego:worker:"


def _redis(settings: Settings):
    import redis

    return redis.Redis.from_url(
        settings.broker_url, socket_timeout=3, socket_connect_timeout=3, decode_responses=True
    )


def uses_redis(settings: Settings) -> bool:
    return settings.broker_url.startswith(("redis://", "rediss://", "unix://"))


def ttl_s(settings: Settings) -> int:
    return int(max(settings.job_stale_s, 3 * settings.job_heartbeat_s, 3))


def this_host() -> str:
    return socket.gethostname()


class Beacon:
    """A daemon thread that says "alive" every job_heartbeat_s seconds."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.key = f"{PREFIX}{this_host()}:{os.getpid()}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lego-beacon", daemon=True)

    def beat(self) -> None:
        _redis(self.settings).set(self.key, str(time.time()), ex=ttl_s(self.settings))

    def start(self) -> Beacon:
        if uses_redis(self.settings):
            try:
                self.beat()
            except Exception:
                log.warning("worker beacon: Redis unreachable", exc_info=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(max(self.settings.job_heartbeat_s, 0.5)):
            try:
                self.beat()
            except Exception:  # keep trying; readiness shows the gap meanwhile
                log.warning("worker beacon: could not beat", exc_info=True)


def alive_workers(settings: Settings) -> list[str]:
    """host:pid of every worker whose beacon has not expired (raises when Redis is down)."""
    r = _redis(settings)
    return sorted(k.removeprefix(PREFIX) for k in r.scan_iter(match=PREFIX + "*", count=1000))
