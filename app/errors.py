"""Error handling: bad input is a 4xx with a message, never a 500.

Every error is an RFC 9457 problem (`application/problem+json`): `type`, `title`,
`status`, `detail` (a sentence), and `code`, a stable machine-readable name
(`not-found`, `validation-failed`, `model-in-use`, ...). A request that does not fit
the schema lists its problems in the `errors` extension member.

- lego_core's LegoError (a file that is not a model, an unknown class, ...) -> 422
- images that cannot be decoded -> 422
- bodies over the configured limits -> 413 (checked while the body streams in)
- the catalog unreachable -> 503
- the artifact disk full (ENOSPC, EDQUOT) -> 507
"""

from __future__ import annotations

import errno
import logging
import math
from http import HTTPStatus

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.predict import ImageError
from app.settings import Settings
from app.storage import UploadTooLarge

log = logging.getLogger("lego.api")

PROBLEM_JSON = "application/problem+json"
# The `code` of an error that names no more specific one, by status.
STATUS_CODES = {
    400: "bad-request",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    406: "not-acceptable",
    409: "conflict",
    412: "precondition-failed",
    413: "too-large",
    415: "unsupported-media-type",
    422: "invalid-input",
    429: "too-many-requests",
    500: "internal-error",
    503: "unavailable",
    507: "storage-full",
}


class ApiError(HTTPException):
    """An HTTPException with a stable `code` more specific than its status."""

    def __init__(self, status: int, detail: str, code: str, headers=None) -> None:
        super().__init__(status, detail, headers=headers)
        self.code = code


def problem(
    status: int, detail: str, code: str | None = None, headers=None, **extra
) -> JSONResponse:
    """An RFC 9457 problem details response."""
    code = code or STATUS_CODES.get(status, "error")
    body = {
        "type": f"urn:model-lego:problem:{code}",
        "title": HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else code,
        "status": status,
        "detail": detail,
        "code": code,
        **extra,
    }
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


def v2(request: Request, detail: str) -> dict:
    """The Open Inference Protocol's `error` member, on its routes (/v2/...)."""
    return {"error": detail} if request.url.path.startswith("/v2") else {}


def validation_detail(errors: list[dict]) -> str:
    parts = []
    for e in errors[:10]:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "request"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 10} more)" if len(errors) > 10 else ""
    return "; ".join(parts) + more


def install_handlers(app: FastAPI) -> None:
    from lego_core.errors import LegoError

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        code = getattr(exc, "code", None)
        return problem(exc.status_code, detail, code, exc.headers, **v2(request, detail))

    @app.exception_handler(LegoError)
    async def lego_error(request: Request, exc: LegoError) -> JSONResponse:
        code = LEGO_CODES.get(type(exc).__name__, "invalid-input")
        return problem(422, str(exc), code, **v2(request, str(exc)))

    @app.exception_handler(ImageError)
    async def image_error(_request: Request, exc: ImageError) -> JSONResponse:
        return problem(422, str(exc), "invalid-image")

    @app.exception_handler(UploadTooLarge)
    async def too_large(_request: Request, exc: UploadTooLarge) -> JSONResponse:
        return problem(413, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler fails (500) when an echoed input is NaN or Infinity.
        errors = json_safe(jsonable_encoder(exc.errors()))
        detail = validation_detail(errors)
        return problem(422, detail, "validation-failed", errors=errors, **v2(request, detail))

    @app.exception_handler(IntegrityError)
    async def conflict(_request: Request, exc: IntegrityError) -> JSONResponse:
        # Two requests raced for the same unique thing (a name's version, a key).
        log.warning("concurrent change: %s", exc)
        return problem(
            409, "a concurrent request changed the same thing; retry", "concurrent-update"
        )

    @app.exception_handler(OperationalError)
    async def db_down(_request: Request, exc: OperationalError) -> JSONResponse:
        log.error("catalog error: %s", exc)
        return problem(503, "the catalog database is unavailable", "catalog-unavailable")

    @app.exception_handler(OSError)
    async def os_error(_request: Request, exc: OSError) -> JSONResponse:
        if disk_full(exc):
            return storage_full(exc)
        raise exc

    @app.exception_handler(Exception)
    async def internal(_request: Request, exc: Exception) -> JSONResponse:
        if disk_full(exc):
            return storage_full(exc)
        log.exception("unhandled error", exc_info=exc)
        return problem(500, f"internal error: {type(exc).__name__}")


LEGO_CODES = {
    "ModelFileError": "invalid-model-file",
    "DatasetError": "invalid-dataset",
    "UnknownClassError": "unknown-class",
    "IncompatibleComponentsError": "incompatible-components",
}


def storage_full(exc: BaseException) -> JSONResponse:
    log.error("artifact storage is full: %s", exc)
    return problem(507, "the artifact storage is full; free space or try again later")


def disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is "no space left" or "quota exceeded"."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def json_safe(value):
    """NaN and infinities (not valid JSON) as strings, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


class BodyLimitMiddleware:
    """413 for request bodies over the limit of their route, before they are read.

    The declared Content-Length is checked first; the streamed body is counted
    too (chunked uploads), and reading stops at the limit.
    """

    SLACK = 1024 * 1024  # room for the form fields beside the file

    def __init__(self, app, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def limit_for(self, method: str, path: str) -> int:
        s = self.settings
        if method == "POST" and path.rstrip("/") == "/api/v1/models":
            return s.max_model_bytes + self.SLACK
        if method == "POST" and path.rstrip("/") == "/api/v1/datasets":
            return s.max_dataset_bytes + self.SLACK
        return s.max_request_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope["method"], scope["path"])
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            response = problem(
                413, f"request body of {int(declared)} bytes is over the limit of {limit} bytes"
            )
            return await response(scope, receive, send)
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, f"request body is over the limit of {limit} bytes")
            return message

        await self.app(scope, counting_receive, send)
