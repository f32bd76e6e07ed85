"""Request and response bodies of the HTTP API (and their conversion from catalog rows)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

from app.catalog import MAX_ID, Assembly, ComponentSet, Dataset, Job, Model

# A catalog id in a JSON body: an integer (not a bool, float or string) in the range the
# id columns hold, so that a huge number is a 422 and never reaches the database driver.
DbId = Annotated[int, Field(strict=True, ge=1, le=MAX_ID)]

# --------------------------------------------------------------------------- requests


class LocateIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"example": {"dataset_id": 1, "samples_per_class": 50}}
    )

    dataset_id: DbId
    samples_per_class: int | None = Field(None, ge=1, le=100_000)
    alpha: float | dict[str, float] | None = Field(
        None,
        description='a number in [0, 1) or {"conv": x, "linear": y}. With alpha and beta '
        "both left out, the defaults are used and loosened step by step where the located "
        "components lose the model's decisions (result.check); given ones are kept",
    )
    beta: float | dict[str, float] | None = Field(
        None, description='a number in [0, 1) or {"conv": x, "linear": y} (see alpha)'
    )

    @field_validator("alpha", "beta")
    @classmethod
    def _threshold(cls, v):
        values = v.values() if isinstance(v, dict) else [] if v is None else [v]
        if isinstance(v, dict) and set(v) - {"conv", "linear"}:
            raise ValueError("keys must be 'conv' and/or 'linear'")
        if any(not 0.0 <= x < 1.0 for x in values):
            raise ValueError("must be in [0, 1)")
        return v


class SourceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_id: DbId
    classes: list[StrictInt | StrictStr] = Field(min_length=1, description="class names or indices")
    component_set_id: DbId | None = Field(
        None, description="Which located components to use (default: the latest)."
    )


class OptionsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scaling: str | None = Field(
        None,
        description="gaussian (default: a decision stage on the components' features), "
        "discriminant, calibrated, reference or none",
    )
    form: str | None = Field(None, description="branches or padded")
    compensate: bool | None = Field(
        None,
        description="fold removed channels' mean contribution into biases at disassembly "
        "(default true)",
    )
    calibration_per_class: int | None = Field(
        None,
        ge=1,
        le=5000,
        description="images per class of each part's locating dataset used to fit scaling "
        "and the decision stage (default: the server's setting)",
    )


class AssemblyIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": {
                "name": "digits-0379",
                "source_classes": [
                    {"model_id": 1, "classes": ["0", 3]},
                    {"model_id": 2, "classes": ["7", "9"]},
                ],
                "eval_dataset_ids": [2],
            }
        },
    )

    source_classes: list[SourceIn] = Field(min_length=1)
    name: str | None = Field(None, max_length=200)
    eval_dataset_ids: list[DbId] = Field(default_factory=list)
    options: OptionsIn = Field(default_factory=OptionsIn)


class AliasesIn(BaseModel):
    """PATCH body of a model or assembly version: the aliases that name it from now on
    (each moves here from whichever version of the same name had it)."""

    model_config = ConfigDict(extra="forbid")

    aliases: list[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.-]{0,99}$")]] = Field(
        max_length=50, examples=[["champion"]]
    )


class PredictIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"example": {"images": ["iVBORw0KGgo..."], "top_k": 3}}
    )

    images: list[str] = Field(min_length=1, description="base64 (or base64url) PNG/JPEG images")
    top_k: int | None = Field(None, ge=1, le=1000)


# --------------------------------------------------------------------------- responses


class Problem(BaseModel):
    """Every 4xx and 5xx answer: RFC 9457 problem details (application/problem+json)."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "type": "urn:model-lego:problem:not-found",
                "title": "Not Found",
                "status": 404,
                "detail": "model 7 not found",
                "code": "not-found",
            }
        }
    )

    type: str = Field(description="urn:model-lego:problem:<code>")
    title: str = Field(description="the HTTP status phrase")
    status: int
    detail: str = Field(description="what is wrong, as a sentence")
    code: str = Field(
        description="stable machine-readable name: not-found, validation-failed, "
        "model-in-use, not-succeeded, job-in-progress, job-finished, idempotency-key-reused, "
        "concurrent-update, unknown-class, invalid-model-file, invalid-dataset, invalid-image, "
        "bad-tensor, too-large, storage-full, catalog-unavailable, broker-unavailable, ..."
    )
    errors: list[dict[str, Any]] | None = Field(
        None, description="validation-failed only: one {loc, msg, type} per problem"
    )
    error: str | None = Field(None, description="/v2 routes only: the detail again (v2 protocol)")


ERROR_TEXT = {
    400: "A body that cannot be parsed (v2 protocol: a tensor that does not fit the model)",
    401: "Missing, malformed, unknown or revoked API key",
    404: "Not found (or another owner's)",
    409: "Conflicts with the resource's state (code names which)",
    413: "Body over the configured limit",
    415: "Unsupported content type",
    422: "Bad input, with a message naming the problem",
    503: "A dependency (catalog database, job broker) is unavailable; try again later",
    507: "The artifact storage is full",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` documenting the error statuses an operation can answer."""
    return {
        c: {
            "model": Problem,
            "description": ERROR_TEXT[c],
            "content": {
                "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
            },
        }
        for c in codes
    }


class JobOut(BaseModel):
    id: int
    kind: str
    status: str
    progress: float
    message: str
    error: str | None
    attempts: int
    max_attempts: int
    worker: str | None = Field(None, description="host:pid that ran (or runs) it")
    result: dict[str, Any] | None
    model_id: int | None = None
    assembly_id: int | None = None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    cancel_requested: bool = Field(
        False, description="cancellation was asked for (a running job stops at its next step)"
    )

    @classmethod
    def of(cls, j: Job) -> JobOut:
        p = j.payload or {}
        return cls(
            id=j.id,
            kind=j.kind,
            status=j.status,
            progress=j.progress,
            message=j.message,
            error=j.error,
            attempts=j.attempts,
            max_attempts=j.max_attempts,
            worker=j.worker,
            result=j.result,
            model_id=p.get("model_id"),
            assembly_id=p.get("assembly_id"),
            created_at=j.created_at,
            started_at=j.started_at,
            finished_at=j.finished_at,
            heartbeat_at=j.heartbeat_at,
            cancel_requested=j.cancel_requested_at is not None,
        )


class ComponentSetBrief(BaseModel):
    id: int
    dataset_id: int
    parameters: dict[str, Any]
    created_at: datetime


class ModelOut(BaseModel):
    id: int
    name: str
    version: int = Field(description="1 for the first registration of its name, then 2, 3, ...")
    aliases: list[str] = Field([], description="aliases naming this version (`name@alias`)")
    arch: str
    class_names: list[str]
    input_spec: dict[str, Any]
    weights_sha256: str
    weights_bytes: int
    created_at: datetime
    component_sets: list[ComponentSetBrief] = []
    locate_job_id: int | None = None
    used_by: list[int] = Field([], description="ids of the assemblies built from this model")

    @classmethod
    def of(
        cls,
        m: Model,
        locate_job_id: int | None = None,
        aliases: list[str] | None = None,
        used_by: list[int] | None = None,
    ) -> ModelOut:
        return cls(
            id=m.id,
            name=m.name,
            version=m.version,
            aliases=aliases or [],
            used_by=used_by or [],
            arch=m.arch,
            class_names=list(m.class_names),
            input_spec=m.input_spec,
            weights_sha256=m.weights_sha256,
            weights_bytes=m.weights_bytes,
            created_at=m.created_at,
            component_sets=[
                ComponentSetBrief(
                    id=c.id,
                    dataset_id=c.dataset_id,
                    parameters=c.parameters,
                    created_at=c.created_at,
                )
                for c in m.component_sets
            ],
            locate_job_id=locate_job_id,
        )


class DatasetOut(BaseModel):
    id: int
    name: str
    classes: dict[str, int]
    num_classes: int
    num_images: int
    archive_sha256: str
    archive_bytes: int
    created_at: datetime

    @classmethod
    def of(cls, d: Dataset) -> DatasetOut:
        return cls(
            id=d.id,
            name=d.name,
            classes=d.classes,
            num_classes=len(d.classes),
            num_images=sum(d.classes.values()),
            archive_sha256=d.archive_sha256,
            archive_bytes=d.archive_bytes,
            created_at=d.created_at,
        )


class ClassComponent(BaseModel):
    class_index: int
    class_name: str
    layers: dict[str, list[int]] = Field(description="layer -> [channels kept, channels total]")
    params: int
    flops: int
    samples: int
    component_set_id: int
    dataset_id: int
    parameters: dict[str, Any]


class ComponentSetOut(BaseModel):
    id: int
    dataset_id: int
    dataset_name: str | None
    parameters: dict[str, Any]
    job_id: int | None
    created_at: datetime
    classes: list[ClassComponent]

    @classmethod
    def of(cls, c: ComponentSet, dataset_name: str | None) -> ComponentSetOut:
        return cls(
            id=c.id,
            dataset_id=c.dataset_id,
            dataset_name=dataset_name,
            parameters=c.parameters,
            job_id=c.job_id,
            created_at=c.created_at,
            classes=[
                ClassComponent(
                    class_index=x.class_index,
                    class_name=x.class_name,
                    layers=x.layers,
                    params=x.params,
                    flops=x.flops,
                    samples=x.samples,
                    component_set_id=c.id,
                    dataset_id=c.dataset_id,
                    parameters=c.parameters,
                )
                for x in c.components
            ],
        )


class ComponentsOut(BaseModel):
    model_id: int
    classes: list[ClassComponent] = Field(description="Per class, from the latest set")
    component_sets: list[ComponentSetOut]
    pending_job_ids: list[int] = []


class SourceOut(BaseModel):
    model_id: int
    model_name: str | None = Field(description="the source model's name when assembled")
    model_version: int | None
    model_arch: str | None
    weights_sha256: str | None = Field(description="sha256 of the source weights used")
    classes: list[str]
    class_indices: list[int]
    component_set_id: int | None


class AssemblyOptions(BaseModel):
    scaling: str | None = Field(None, description="how branch logits were scaled")
    form: str | None = Field(None, description="branches or padded")


class AssemblyMetrics(BaseModel):
    """Accuracy on the evaluation datasets (percent, as in the paper) and the size."""

    model_config = ConfigDict(extra="allow")

    accuracy: float | None = Field(None, description="the assembled model's accuracy (%)")
    base_accuracy: float | None = Field(
        None, description="mean accuracy of the source models on their own classes (%)"
    )
    per_class: dict[str, Any] | None = None
    images: int | None = Field(None, description="evaluation images")
    params: int | None = None
    flops: int | None = None


class AssemblyClass(BaseModel):
    """One output class of an assembly and where it comes from."""

    index: int = Field(description="position in the assembled model's output")
    name: str
    source_model_id: int | None
    source_model_name: str | None
    source_model_version: int | None = None
    source_weights_sha256: str | None = None
    source_class: str | None
    source_class_index: int | None


class AssemblyOut(BaseModel):
    id: int
    name: str
    version: int = Field(description="1 for the first assembly of its name, then 2, 3, ...")
    aliases: list[str] = []
    status: str
    progress: float
    error: str | None
    job_id: int | None
    classes: list[AssemblyClass]
    sources: list[SourceOut]
    options: AssemblyOptions
    eval_dataset_ids: list[int]
    metrics: AssemblyMetrics | None
    input_spec: dict[str, Any] | None
    artifact_sha256: str | None
    download_url: str | None
    created_at: datetime

    @classmethod
    def of(cls, a: Assembly, aliases: list[str] | None = None) -> AssemblyOut:
        j = a.job
        status = j.status if j else "failed"
        return cls(
            id=a.id,
            name=a.name,
            version=a.version,
            aliases=aliases or [],
            status=status,
            progress=j.progress if j else 0.0,
            error=j.error if j else "its job was removed",
            job_id=a.job_id,
            classes=a.classes,
            sources=[
                SourceOut(
                    model_id=s.model_id,
                    model_name=s.model_name,
                    model_version=s.model_version,
                    model_arch=s.model_arch,
                    weights_sha256=s.weights_sha256,
                    classes=s.class_names,
                    class_indices=s.class_indices,
                    component_set_id=s.component_set_id,
                )
                for s in a.sources
            ],
            options=a.options or {},
            eval_dataset_ids=a.eval_dataset_ids or [],
            metrics=a.metrics,
            input_spec=a.input_spec,
            artifact_sha256=a.artifact_sha256,
            download_url=(
                f"/api/v1/assemblies/{a.id}/download"
                if status == "succeeded" and a.artifact_sha256
                else None
            ),
            created_at=a.created_at,
        )


class Accepted(BaseModel):
    job_id: int
    job: JobOut


class Prediction(BaseModel):
    class_: str = Field(alias="class", description="class name")
    probability: float


class PredictOut(BaseModel):
    predictions: list[list[Prediction]] = Field(description="per image, the top-k classes")
