"""Open Inference Protocol (KServe v2, as Triton speaks it) over the owner's assemblies.

A model here is an assembly: `{name}` is its name (or id, or `name@alias`) and
`/versions/{version}` picks a version (default: the latest). The one input is an FP32
tensor [B, C, H, W] of raw images in [0, 1] at the assembly's input spec; the one
output, `probabilities`, is FP32 [B, classes] (softmax), the class names being in the
model metadata (`parameters.class_names`). JSON tensors only (no binary extension).
Health endpoints need no key; model endpoints take `Authorization: Bearer <key>`.
Errors are problem details with the v2 protocol's `error` member too.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from app.auth import current_owner
from app.catalog import Assembly
from app.errors import ApiError
from app.routers.assemblies import check_finished, served_model
from app.routers.common import resolve
from app.routers.system import _checks
from app.schemas import errors
from app.services import Services, services

router = APIRouter(prefix="/v2", tags=["inference protocol v2"])
Owner = Annotated[str, Depends(current_owner)]
Svc = Annotated[Services, Depends(services)]
Name = Annotated[str, Path(min_length=1, max_length=320, description="assembly name, id or alias")]
Version = Annotated[str, Path(pattern=r"^[0-9]{1,9}$", description="assembly version")]
INPUT, OUTPUT = "input", "probabilities"


class TensorIn(BaseModel):
    name: str
    shape: list[int] = Field(min_length=4, max_length=4)
    datatype: str
    data: list[Any]
    parameters: dict[str, Any] | None = None


class InferIn(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "inputs": [
                    {
                        "name": INPUT,
                        "shape": [1, 1, 2, 2],
                        "datatype": "FP32",
                        "data": [0.0, 0.5, 1.0, 0.25],
                    }
                ]
            }
        }
    )

    id: str | None = None
    inputs: list[TensorIn] = Field(min_length=1, max_length=1)
    outputs: list[dict[str, Any]] | None = None
    parameters: dict[str, Any] | None = None


class TensorOut(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float]


class InferOut(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[TensorOut]


class TensorMeta(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMeta(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMeta]
    outputs: list[TensorMeta]
    parameters: dict[str, Any] = {}


@router.get("/health/live")
def live():
    """The server is alive."""
    return {"live": True}


@router.get("/health/ready")
async def ready(svc: Svc):
    """The server can serve (database, broker and storage checks, as /readyz)."""
    checks = await run_in_threadpool(_checks, svc)
    return {"ready": all(c["ok"] for c in checks.values())}


@router.get("")
def server_metadata(request: Request):
    return {"name": "model-lego", "version": request.app.version, "extensions": []}


def _assembly(svc: Services, owner: str, name: str, version: str | None) -> tuple[Assembly, str]:
    with svc.catalog.session() as s:
        a = resolve(s, Assembly, name, owner, "assembly")  # a name, id or name@alias
        if version is not None and a.version != int(version):
            a = resolve(s, Assembly, f"{a.name}/{int(version)}", owner, "assembly")
        sha = check_finished(a.id, a.job.status if a.job else None, a.artifact_sha256)
        versions = [
            str(v)
            for v in s.scalars(
                select(Assembly.version)
                .where(Assembly.owner == owner, Assembly.name == a.name)
                .order_by(Assembly.version)
            )
        ]
        s.expunge(a)
    a.versions = versions  # type: ignore[attr-defined]
    return a, sha


def _metadata(svc: Services, owner: str, name: str, version: str | None) -> ModelMeta:
    a, _ = _assembly(svc, owner, name, version)
    spec = a.input_spec or {}
    shape = [-1, spec.get("channels", -1), spec.get("height", -1), spec.get("width", -1)]
    classes = [c.get("name") for c in a.classes or []]
    return ModelMeta(
        name=a.name,
        versions=a.versions,  # type: ignore[attr-defined]
        platform="pytorch_torchexport",
        inputs=[TensorMeta(name=INPUT, datatype="FP32", shape=shape)],
        outputs=[TensorMeta(name=OUTPUT, datatype="FP32", shape=[-1, len(classes)])],
        parameters={"class_names": classes, "version": a.version, "id": a.id},
    )


@router.get("/models/{name}", responses=errors(401, 404, 409, 422, 503), response_model=ModelMeta)
def model_metadata(name: Name, owner: Owner, svc: Svc):
    """Model metadata (v2): input and output tensors, versions, class names."""
    return _metadata(svc, owner, name, None)


@router.get(
    "/models/{name}/versions/{version}",
    responses=errors(401, 404, 409, 422, 503),
    response_model=ModelMeta,
)
def model_version_metadata(name: Name, version: Version, owner: Owner, svc: Svc):
    """Model metadata (v2) of one version."""
    return _metadata(svc, owner, name, version)


@router.get("/models/{name}/ready", responses=errors(401, 404, 409, 422, 503))
def model_ready(name: Name, owner: Owner, svc: Svc):
    """Ready when the assembly succeeded (404 when there is none, 409 while it builds)."""
    a, _ = _assembly(svc, owner, name, None)
    return {"name": a.name, "ready": True}


@router.get("/models/{name}/versions/{version}/ready", responses=errors(401, 404, 409, 422, 503))
def model_version_ready(name: Name, version: Version, owner: Owner, svc: Svc):
    """Ready when this version succeeded."""
    a, _ = _assembly(svc, owner, name, version)
    return {"name": a.name, "version": str(a.version), "ready": True}


def _infer(svc: Services, owner: str, name: str, version: str | None, body: InferIn) -> InferOut:
    import torch

    a, sha = _assembly(svc, owner, name, version)
    model = served_model(svc, sha)
    x = body.inputs[0]
    spec = model.spec
    want = [spec.channels, spec.height, spec.width]
    if x.datatype != "FP32":
        raise ApiError(400, f"input {x.name}: datatype {x.datatype}; use FP32", "bad-tensor")
    if x.shape[1:] != want or not 1 <= x.shape[0] <= svc.settings.max_predict_images:
        raise ApiError(
            400,
            f"input {x.name}: shape {x.shape}; use [B, {', '.join(map(str, want))}] with "
            f"1 <= B <= {svc.settings.max_predict_images}",
            "bad-tensor",
        )
    try:
        t = torch.tensor(x.data, dtype=torch.float32).reshape(x.shape)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ApiError(
            400, f"input {x.name}: data does not fit its shape: {exc}", "bad-tensor"
        ) from None
    if not torch.isfinite(t).all():
        raise ApiError(400, f"input {x.name}: data has NaN or infinite values", "bad-tensor")
    probs = model.probabilities(list(t.clamp_(0.0, 1.0)))
    return InferOut(
        model_name=a.name,
        model_version=str(a.version),
        id=body.id,
        outputs=[
            TensorOut(
                name=OUTPUT,
                shape=list(probs.shape),
                datatype="FP32",
                data=probs.flatten().tolist(),
            )
        ],
    )


@router.post(
    "/models/{name}/infer",
    responses=errors(400, 401, 404, 409, 413, 422, 503),
    response_model=InferOut,
    response_model_exclude_none=True,
)
async def infer(name: Name, body: InferIn, owner: Owner, svc: Svc):
    """Inference (v2): FP32 input [B, C, H, W] in [0, 1] -> `probabilities` FP32 [B, classes]."""
    return await run_in_threadpool(_infer, svc, owner, name, None, body)


@router.post(
    "/models/{name}/versions/{version}/infer",
    responses=errors(400, 401, 404, 409, 413, 422, 503),
    response_model=InferOut,
    response_model_exclude_none=True,
)
async def infer_version(name: Name, version: Version, body: InferIn, owner: Owner, svc: Svc):
    """Inference (v2) with one version."""
    return await run_in_threadpool(_infer, svc, owner, name, version, body)
