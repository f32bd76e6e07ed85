"""The web page at `/` (static files in app/static, no build step), the API docs at
`/docs` and `/redoc` served offline (Swagger UI and ReDoc from the pinned
fastapi-offline package), Bearer auth declared in the OpenAPI document, and the two
small read-only endpoints the page needs: `/ui/config` and a model's size."""

from __future__ import annotations

import threading
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from app import adapters
from app.auth import current_owner
from app.catalog import Model
from app.routers.common import PathRef, resolve
from app.schemas import errors
from app.services import Services, services

STATIC = Path(__file__).with_name("static")
DOCS_STATIC = Path(str(files("fastapi_offline") / "static"))
BEARER = "bearerAuth"

# Everything the page and the docs load comes from this server: a browser never asks
# another host (the docs work offline, and an injected script could not send the key out).
PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; worker-src 'self' blob:; font-src 'self' data:; object-src 'none'"
)

pages = APIRouter(include_in_schema=False)
api = APIRouter(prefix="/api/v1", tags=["models"])
Owner = Annotated[str, Depends(current_owner)]
Svc = Annotated[Services, Depends(services)]


@pages.get("/")
def index() -> FileResponse:
    # no-cache: the page is tiny and must match the API it talks to after an upgrade
    return FileResponse(
        STATIC / "index.html",
        headers={"Cache-Control": "no-cache", "Content-Security-Policy": PAGE_CSP},
    )


@pages.get("/ui/config")
def ui_config() -> dict[str, Any]:
    """What the page's forms offer: architectures, scaling methods, forms."""
    import lego_core

    return {
        "arches": list(adapters.known_arches()),
        "scaling_methods": list(lego_core.SCALING_METHODS),
        "forms": list(lego_core.FORMS),
    }


@pages.get("/docs")
def swagger_ui() -> HTMLResponse:
    page = get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="Model LEGO API",
        swagger_js_url="/docs-static/swagger-ui-bundle.js",
        swagger_css_url="/docs-static/swagger-ui.css",
        swagger_favicon_url="/docs-static/favicon.png",
    )
    return docs_page(page)


@pages.get("/redoc")
def redoc() -> HTMLResponse:
    page = get_redoc_html(
        openapi_url="/openapi.json",
        title="Model LEGO API",
        redoc_js_url="/docs-static/redoc.standalone.js",
        redoc_favicon_url="/docs-static/favicon.png",
        with_google_fonts=False,
    )
    return docs_page(page)


def docs_page(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = DOCS_CSP
    return page


class ModelSize(BaseModel):
    model_id: int
    params: int = Field(description="parameters of the whole source model")
    flops: int = Field(description="FLOPs of one forward pass on one image (multiply-add = 2)")


_size_lock = threading.Lock()


_sizes: dict[tuple, tuple[int, int]] = {}


def model_size(svc: Services, m: Model) -> tuple[int, int]:
    """Params and FLOPs of a source model, measured once per weights file and process
    (the same measures lego_core gives each class component, so shares compare)."""
    key = (m.weights_sha256, m.arch, tuple(m.class_names))
    with _size_lock:
        if key in _sizes:
            return _sizes[key]
    from lego_core.evaluate import count_flops

    source = adapters.load_model(svc.storage, m)
    out = (int(source.graph.param_count()), int(count_flops(source)))
    with _size_lock:
        _sizes[key] = out
    return out


@api.get("/models/{ref:path}/size", responses=errors(401, 404, 422, 503), response_model=ModelSize)
def get_model_size(ref: PathRef, owner: Owner, svc: Svc) -> ModelSize:
    """Params and FLOPs of the whole model: what each class component's share is
    measured against."""
    with svc.catalog.session() as s:
        m = resolve(s, Model, ref, owner, "model")
        s.expunge(m)
    params, flops = model_size(svc, m)
    return ModelSize(model_id=m.id, params=params, flops=flops)


def openapi_with_bearer(app: FastAPI):
    """`app.openapi` that declares the Bearer scheme and puts it on every /api/v1
    operation, so that Swagger UI's "Authorize" and "Try it out" send the key."""

    def build() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        schemes[BEARER] = {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key (`lego keys create NAME`, or the one `lego serve` prints)",
        }
        for path, ops in schema.get("paths", {}).items():
            if path.startswith("/api/"):
                for op in ops.values():
                    op["security"] = [{BEARER: []}]
        app.openapi_schema = schema
        return schema

    return build


def install_web(app: FastAPI) -> None:
    """Add the page, its static files, the offline docs and Bearer auth in OpenAPI.
    The app must be created with docs_url=None and redoc_url=None, and this called
    before the API routers: `/models/{ref:path}/size` must precede `/models/{ref:path}`."""
    app.include_router(pages)
    app.include_router(api)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/docs-static", StaticFiles(directory=DOCS_STATIC), name="docs-static")
    app.openapi = openapi_with_bearer(app)
