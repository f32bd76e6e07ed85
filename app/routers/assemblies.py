"""Assemblies: new classifiers from chosen classes of several models; download; predict."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from pydantic import ValidationError
from sqlalchemy import bindparam, select
from sqlalchemy.exc import IntegrityError
from starlette.datastructures import UploadFile

from app import adapters
from app.auth import bearer_key, current_owner, hash_key, invalid_key
from app.catalog import (
    ACTIVE_STATES,
    JOB_STATES,
    MAX_ID,
    ApiKey,
    Assembly,
    AssemblySource,
    ComponentSet,
    Dataset,
    Job,
    Model,
)
from app.downloads import FORMATS, DownloadFormat, download_file
from app.errors import ApiError
from app.predict import Batcher, b64decode_image, decode_image, predict
from app.routers.common import (
    IdemKey,
    Limit,
    Offset,
    PathRef,
    aliases_of,
    check_name,
    drop_aliases,
    drop_artifacts,
    fingerprint,
    next_version,
    owned,
    page,
    remember,
    replayed,
    resolve,
    resolve_classes,
    set_aliases,
    unprocessable,
)
from app.schemas import AliasesIn, AssemblyIn, AssemblyOut, PredictIn, PredictOut, errors
from app.services import Services, services
from worker.runtime import create_job, resolve_device
from worker.tasks import locate_jobs_for, no_components_reason

router = APIRouter(prefix="/api/v1", tags=["assemblies"])
Owner = Annotated[str, Depends(current_owner)]
Key = Annotated[str, Depends(bearer_key)]  # checked by predict_artifact
Svc = Annotated[Services, Depends(services)]
TopK = Annotated[int, Query(ge=1, le=1000, description="classes per image")]


def check_options(body: AssemblyIn) -> dict:
    import lego_core

    opts = body.options.model_dump(exclude_none=True)
    for key, allowed in (("scaling", "SCALING_METHODS"), ("form", "FORMS")):
        valid = getattr(lego_core, allowed, None)
        if key in opts and valid is not None and opts[key] not in valid:
            raise unprocessable(
                f"options.{key}: {opts[key]!r} is not one of {', '.join(map(str, valid))}"
            )
    return opts


@router.post(
    "/assemblies",
    responses=errors(400, 401, 404, 409, 422, 503),
    status_code=202,
    response_model=AssemblyOut,
)
def create_assembly(
    body: AssemblyIn, owner: Owner, svc: Svc, response: Response, idempotency_key: IdemKey = None
):
    """Assemble a new classifier from chosen classes of registered models, without training
    (202: a job builds it; `Location` points at the assembly). Creating a name again adds
    its next version. Send an `Idempotency-Key` header to make retries safe."""
    opts = check_options(body)
    if body.name is not None:
        check_name(body.name)
    fp = fingerprint(body.model_dump(mode="json"))
    try:
        out = plan_assembly(svc, owner, body, opts, idempotency_key, fp)
    except IntegrityError:  # a concurrent request took the same name version or key
        raise ApiError(409, "a concurrent request conflicted; retry", "concurrent-update") from None
    if out.status == "queued":
        svc.dispatch(out.job_id)
    response.headers["Location"] = f"/api/v1/assemblies/{out.id}"
    return out


def plan_assembly(
    svc: Services, owner: str, body: AssemblyIn, opts: dict, key: str | None, fp: str
) -> AssemblyOut:
    with svc.catalog.session() as s:
        earlier = replayed(s, owner, "assembly", key, fp)
        if earlier is not None:
            return assemblies_out(s, owner, [owned(s, Assembly, earlier, owner, "assembly")])[0]
        planned, rows, seen = [], [], set()
        for n, src in enumerate(body.source_classes):
            m = owned(s, Model, src.model_id, owner, "model")
            if m.id in seen:
                raise unprocessable(
                    f"source_classes[{n}]: model {m.id} is listed twice; "
                    "give all its classes in one entry"
                )
            seen.add(m.id)
            indices = resolve_classes(m.class_names, src.classes, f"model {m.id}")
            if src.component_set_id is not None:
                cs = s.get(ComponentSet, src.component_set_id)
                if cs is None or cs.model_id != m.id:
                    raise HTTPException(
                        404, f"component set {src.component_set_id} of model {m.id} not found"
                    )
            elif not m.component_sets and not locate_jobs_for(s, owner, m.id, active=True):
                raise unprocessable(no_components_reason(s, owner, m.id))
            names = [m.class_names[i] for i in indices]
            rows.append(
                AssemblySource(
                    position=n,
                    model_id=m.id,
                    model_name=m.name,
                    model_version=m.version,
                    model_arch=m.arch,
                    weights_sha256=m.weights_sha256,
                    class_indices=indices,
                    class_names=names,
                    component_set_id=src.component_set_id,
                )
            )
            planned += [
                {
                    "index": len(planned) + k,
                    "name": c,
                    "source_model_id": m.id,
                    "source_model_name": m.name,
                    "source_model_version": m.version,
                    "source_weights_sha256": m.weights_sha256,
                    "source_class": c,
                    "source_class_index": i,
                }
                for k, (i, c) in enumerate(zip(indices, names, strict=True))
            ]
        for ds_id in body.eval_dataset_ids:
            owned(s, Dataset, ds_id, owner, "dataset")
        name = (
            body.name
            or re.sub(
                r"[/@]", "_", " + ".join(f"{r.model_name}:{','.join(r.class_names)}" for r in rows)
            )[:200]
        )
        a = Assembly(
            owner=owner,
            name=name,
            version=next_version(s, "assembly", owner, name),
            options=opts,
            eval_dataset_ids=list(body.eval_dataset_ids),
            classes=planned,
        )
        a.sources = rows
        s.add(a)
        s.flush()
        job = create_job(s, owner, "assemble", {"assembly_id": a.id}, svc.settings.job_max_attempts)
        a.job_id, a.job = job.id, job
        remember(s, owner, "assembly", key, fp, a.id)
        s.flush()
        return AssemblyOut.of(a)


def assemblies_out(s, owner: str, rows: list[Assembly]) -> list[AssemblyOut]:
    aliases = aliases_of(s, "assembly", owner, [a.id for a in rows])
    return [AssemblyOut.of(a, aliases[a.id]) for a in rows]


@router.get("/assemblies", responses=errors(401, 422, 503), response_model=list[AssemblyOut])
def list_assemblies(
    owner: Owner,
    svc: Svc,
    request: Request,
    response: Response,
    limit: Limit = 100,
    offset: Offset = 0,
    name: Annotated[str | None, Query(max_length=200, description="only this name")] = None,
    status: Annotated[
        str | None, Query(pattern="^(" + "|".join(JOB_STATES) + ")$", description="job status")
    ] = None,
    model_id: Annotated[
        int | None, Query(ge=1, le=MAX_ID, description="only those built from this model")
    ] = None,
):
    """The owner's assemblies, oldest first; filters `name`, `status`, `model_id` (built from that
    model); paged (`X-Total-Count`, `Link` rel="next")."""
    q = select(Assembly).where(Assembly.owner == owner).order_by(Assembly.id)
    if name is not None:
        q = q.where(Assembly.name == name)
    if status is not None:
        q = q.outerjoin(Job, Job.id == Assembly.job_id).where(Job.status == status)
    if model_id is not None:
        used = select(AssemblySource.assembly_id).where(AssemblySource.model_id == model_id)
        q = q.where(Assembly.id.in_(used))
    with svc.catalog.session() as s:
        return assemblies_out(s, owner, page(s, q, request, response, limit, offset))


def finished_artifact(svc: Services, owner: str, ref: str) -> tuple[int, str, str]:
    with svc.catalog.session() as s:
        a = resolve(s, Assembly, ref, owner, "assembly")
        sha = check_finished(a.id, a.job.status if a.job else None, a.artifact_sha256)
        return a.id, sha, a.name


def check_finished(assembly_id: int, status: str | None, sha: str | None) -> str:
    status = status or "failed"
    if status != "succeeded" or not sha:
        raise ApiError(409, f"assembly {assembly_id} is {status}, not succeeded", "not-succeeded")
    return sha


# The key's check and the assembly's lookup in one statement, built once (building a
# select costs more CPU than SQLite takes to run it).
PREDICT_LOOKUP = (
    select(ApiKey.owner, Assembly.owner, Assembly.artifact_sha256, Job.status)
    .select_from(ApiKey)
    .outerjoin(Assembly, Assembly.id == bindparam("assembly_id"))
    .outerjoin(Job, Job.id == Assembly.job_id)
    .where(ApiKey.key_hash == bindparam("key_hash"), ApiKey.revoked_at.is_(None))
)


def predict_artifact(svc: Services, key: str, ref: str) -> str:
    """The artifact to predict with, from one query for an id: predict is the hot path.
    Same answers as current_owner + finished_artifact: 401, 404, 409."""
    if not (ref.isascii() and ref.isdigit() and 1 <= int(ref) <= MAX_ID):
        with svc.catalog.session() as s:
            owner = s.scalar(
                select(ApiKey.owner).where(
                    ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None)
                )
            )
            if owner is None:
                raise invalid_key()
            return finished_artifact(svc, owner, ref)[1]
    assembly_id = int(ref)
    with svc.catalog.session() as s:
        params = {"assembly_id": assembly_id, "key_hash": hash_key(key)}
        row = s.execute(PREDICT_LOOKUP, params).first()
    if row is None:
        raise invalid_key()
    key_owner, assembly_owner, sha, status = row
    if assembly_owner != key_owner:
        raise HTTPException(404, f"assembly {assembly_id} not found")
    return check_finished(assembly_id, status, sha)


@router.get(
    "/assemblies/{ref:path}/download",
    response_class=FileResponse,
    responses={
        **errors(401, 404, 409, 422, 503),
        200: {"content": {media: {} for _, media in FORMATS.values()}},
        304: {"description": "Not Modified: If-None-Match named the file's ETag (sha256)"},
    },
)
def download_assembly(
    ref: PathRef,
    owner: Owner,
    svc: Svc,
    request: Request,
    format: Annotated[
        DownloadFormat,
        Query(description="pt (torch.export), onnx, or triton (a model repository zip)"),
    ] = "pt",
):
    """The assembled model: `pt` (torch.export, loads with plain PyTorch; `lego.json` inside
    holds class names, input spec and lineage), `onnx`, or `triton` (a model repository zip).
    `ETag` is the `.pt` file's sha256 plus the format; `If-None-Match` with it answers 304."""
    assembly_id, sha, name = finished_artifact(svc, owner, ref)
    # a strong validator: the content's sha256 (the other formats derive from it)
    etag = f'"{sha}"' if format == "pt" else f'"{sha}-{format}"'
    if etag_matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers={"ETag": etag})
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[:80] or "assembly"
    suffix, media_type = FORMATS[format]
    return FileResponse(
        download_file(svc.storage, sha, format, name),
        media_type=media_type,
        filename=f"assembly-{assembly_id}-{safe}{suffix}",
        headers={"ETag": etag},
    )


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an If-None-Match header names `etag` (weak comparison, as RFC 9110 asks)."""
    if not if_none_match:
        return False
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or etag in tags


def served_model(svc: Services, sha: str) -> Batcher:
    def load() -> Batcher:
        path = adapters.named_path(svc.storage, sha, ".pt")
        classifier = adapters.load_classifier(path, resolve_device(svc.settings.device))
        return Batcher(classifier, svc.settings.predict_batch_size)

    return svc.models.get(sha, load)


def run_predict(svc: Services, sha: str, blobs: list[bytes], top_k: int) -> PredictOut:
    return classify(svc, served_model(svc, sha), blobs, top_k)


def classify(svc: Services, model: Batcher, blobs: list[bytes], top_k: int) -> PredictOut:
    if len(blobs) > svc.settings.max_predict_images:
        raise HTTPException(
            413,
            f"{len(blobs)} images is over the limit of {svc.settings.max_predict_images} a request",
        )
    tensors = [
        decode_image(b, model.spec, svc.settings.max_image_pixels, i) for i, b in enumerate(blobs)
    ]
    return PredictOut(predictions=predict(model, tensors, top_k))


@router.get(
    "/assemblies/{ref:path}/predict",
    responses=errors(401, 404, 409, 413, 422, 503),
    response_model=PredictOut,
)
async def predict_get(
    ref: PathRef,
    key: Key,
    svc: Svc,
    image: Annotated[str, Query(description="base64url PNG or JPEG")],
    top_k: TopK = 3,
):
    """Classify one base64url PNG/JPEG image given in the query."""

    def lookup_and_predict() -> PredictOut:  # one thread-pool hop for the whole request
        sha = predict_artifact(svc, key, ref)
        return run_predict(svc, sha, [b64decode_image(image)], top_k)

    return await run_in_threadpool(lookup_and_predict)


PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "images": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                    "required": ["images"],
                }
            },
            "application/json": {"schema": PredictIn.model_json_schema()},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg", "application/octet-stream")


@router.post(
    "/assemblies/{ref:path}/predict",
    responses=errors(400, 401, 404, 409, 413, 415, 422, 503),
    response_model=PredictOut,
    openapi_extra=PREDICT_BODY,
)
async def predict_post(ref: PathRef, request: Request, key: Key, svc: Svc, top_k: TopK = 3):
    """Classify images sent as multipart `images` files, JSON `{"images": [base64]}`, or
    one raw PNG/JPEG body (`Content-Type: image/png`, as TorchServe and KServe take)."""
    # The body is read first (its size is bounded by BodyLimitMiddleware), so that the
    # key check, the lookup, decoding and the model call take one thread-pool hop.
    blobs, top_k = await read_images(request, svc, top_k)

    def lookup_and_predict() -> PredictOut:
        return run_predict(svc, predict_artifact(svc, key, ref), blobs, top_k)

    return await run_in_threadpool(lookup_and_predict)


async def read_images(request: Request, svc: Services, top_k: int) -> tuple[list[bytes], int]:
    """The images of a predict request (and its top_k, which a JSON body may set)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    blobs: list[bytes] = []
    if ctype == "multipart/form-data":
        limit = svc.settings.max_predict_images
        async with request.form(max_files=limit + 1, max_fields=limit + 10) as form:
            items = form.getlist("images")
            if not items:
                raise unprocessable("images: send one or more files in the `images` field")
            for i, item in enumerate(items):
                if isinstance(item, UploadFile):
                    blobs.append(await item.read())
                else:
                    blobs.append(b64decode_image(item, i))
    elif ctype == "application/json" or ctype.endswith("+json"):
        try:
            body = PredictIn.model_validate_json(await request.body())
        except ValidationError as exc:
            raise unprocessable(
                f'body must be {{"images": [base64, ...]}}: {exc.errors()[0]["msg"]}'
            ) from None
        blobs = [b64decode_image(x, i) for i, x in enumerate(body.images)]
        top_k = body.top_k or top_k
    elif ctype in IMAGE_TYPES:
        blobs = [await request.body()]
    else:
        raise HTTPException(
            415,
            'send multipart/form-data with `images` files, JSON {"images": [base64, ...]}, '
            "or one image/png or image/jpeg body",
        )
    return blobs, top_k


# The routes below take the whole rest of the path as the assembly's reference (it may
# be `name/version`), so they come after the routes with a suffix.


@router.get(
    "/assemblies/{ref:path}", responses=errors(401, 404, 422, 503), response_model=AssemblyOut
)
def get_assembly(ref: PathRef, owner: Owner, svc: Svc):
    """One assembly version by id, `name@alias`, `name/version` or `name` (its latest): status,
    classes and their sources (model name, version, weights sha256), metrics."""
    with svc.catalog.session() as s:
        return assemblies_out(s, owner, [resolve(s, Assembly, ref, owner, "assembly")])[0]


@router.patch(
    "/assemblies/{ref:path}",
    responses=errors(400, 401, 404, 409, 422, 503),
    response_model=AssemblyOut,
)
def update_assembly(ref: PathRef, body: AliasesIn, owner: Owner, svc: Svc):
    """Sets the aliases of this version: predict and download by `name@alias` follow them."""
    with svc.catalog.session() as s:
        a = resolve(s, Assembly, ref, owner, "assembly")
        set_aliases(s, "assembly", a, body.aliases)
        return assemblies_out(s, owner, [a])[0]


@router.delete("/assemblies/{ref:path}", responses=errors(401, 404, 409, 422, 503), status_code=204)
def delete_assembly(ref: PathRef, owner: Owner, svc: Svc):
    """Delete an assembly version and its file (409 while its job runs). Its id and version
    number are never given again."""
    with svc.catalog.session() as s:
        a = resolve(s, Assembly, ref, owner, "assembly")
        if a.job is not None and a.job.status in ACTIVE_STATES:
            raise ApiError(
                409, f"assembly {a.id} is {a.job.status}; wait until it ends", "job-in-progress"
            )
        sha = a.artifact_sha256
        drop_aliases(s, "assembly", a)
        s.delete(a)
        s.flush()
        drop_artifacts(s, svc.storage, {sha} if sha else set())
    return Response(status_code=204)
