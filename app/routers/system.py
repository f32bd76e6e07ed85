"""Health, readiness and Prometheus metrics (no API key needed)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from app import metrics
from app.services import Services, services

router = APIRouter(tags=["system"])
Svc = Annotated[Services, Depends(services)]


@router.get("/healthz")
def healthz():
    """The process is alive."""
    return {"status": "ok"}


def _checks(svc: Services) -> dict[str, dict]:
    checks: dict[str, dict] = {}
    try:
        svc.catalog.ping()
        checks["database"] = {"ok": True, "detail": svc.catalog.engine.dialect.name}
    except Exception as exc:
        checks["database"] = {"ok": False, "detail": f"{type(exc).__name__}: {exc}"[:300]}
    ok, detail = svc.broker_ok()
    checks["broker"] = {"ok": ok, "detail": detail[:300]}
    if not svc.settings.embedded_broker:
        checks["workers"] = _workers_check(svc)
    try:
        svc.storage.check_writable()
        free, minimum = svc.storage.free_bytes(), svc.settings.min_free_disk_bytes
        detail = f"{svc.storage.root}: {free // 2**20} MiB free"
        if free < minimum:
            detail += f", under the {minimum // 2**20} MiB minimum (LEGO_MIN_FREE_DISK_BYTES)"
        checks["storage"] = {"ok": free >= minimum, "detail": detail, "free_bytes": free}
    except OSError as exc:
        checks["storage"] = {"ok": False, "detail": f"{exc}"[:300]}
    return checks


def _workers_check(svc: Services) -> dict:
    """Full stack: is any `lego worker` alive (its beacon in Redis not expired)?"""
    from worker.beacon import alive_workers, uses_redis

    if not uses_redis(svc.settings):
        return {"ok": True, "detail": "not checked (the broker is not Redis)"}
    try:
        alive = alive_workers(svc.settings)
    except Exception as exc:
        return {"ok": False, "detail": f"cannot read worker beacons: {exc}"[:300]}
    if not alive:
        return {"ok": False, "detail": "no worker is alive (start `lego worker`)", "alive": []}
    return {"ok": True, "detail": f"{len(alive)} alive", "alive": alive[:50]}


@router.get("/readyz", responses={503: {"description": "Not ready: the failing checks"}})
async def readyz(svc: Svc):
    """Database, broker and storage reachable, storage with enough free space and (full
    stack) at least one worker alive: 200, else 503 with what failed."""
    checks = await run_in_threadpool(_checks, svc)
    ready = all(c["ok"] for c in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "unavailable", "checks": checks},
        status_code=200 if ready else 503,
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
async def prometheus(svc: Svc):
    body, ctype = await run_in_threadpool(metrics.render, svc.catalog)
    return Response(body, media_type=ctype)
