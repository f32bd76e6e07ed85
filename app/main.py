"""The FastAPI application: `create_app(settings)`; `lego serve` runs it under uvicorn."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.errors import BodyLimitMiddleware, install_handlers
from app.metrics import MetricsMiddleware
from app.routers import assemblies, datasets, jobs, models, system, v2
from app.services import Services
from app.settings import Settings, get_settings
from app.web import install_web


def create_app(settings: Settings | None = None, background: bool = True) -> FastAPI:
    """The app for `settings` (default: the environment's).

    `background` starts the embedded job runner (when no broker is set) and the
    dead-job reaper with the app's lifespan.
    """
    settings = settings or get_settings()
    svc = Services.create(settings, background=background)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        svc.start()
        try:
            yield
        finally:
            svc.stop()

    app = FastAPI(
        title="Model LEGO",
        version="0.1.0",
        description="Register trained CNN classifiers, locate per-class components and "
        "assemble new classifiers from chosen classes, without training. "
        "Authenticate with `Authorization: Bearer <key>` (`lego keys create NAME`).",
        lifespan=lifespan,
        docs_url=None,  # served offline by app.web
        redoc_url=None,
    )
    app.state.services = svc
    app.state.catalog = svc.catalog
    install_handlers(app)
    install_web(app)  # first: its /models/{ref:path}/size must precede /models/{ref:path}
    for r in (models.router, datasets.router, assemblies.router, jobs.router):
        app.include_router(r)
    app.include_router(system.router)
    app.include_router(v2.router)
    app.add_middleware(BodyLimitMiddleware, settings=settings)
    app.add_middleware(MetricsMiddleware)
    logging.getLogger("lego").setLevel(logging.INFO)
    return app
