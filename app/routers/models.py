"""Source models: register, list, inspect, delete, locate components, draw routes."""

from __future__ import annotations

from collections import Counter
from typing import Annotated

from fastapi import (
    APIRouter,
    Depends,
    File,
    Form,
    HTTPException,
    Query,
    Request,
    Response,
    UploadFile,
)
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from app import adapters
from app.auth import current_owner
from app.catalog import MAX_ID, AssemblySource, ComponentSet, Dataset, Job, Model
from app.errors import ApiError
from app.predict import Batcher
from app.routers.assemblies import PREDICT_BODY, TopK, classify, read_images
from app.routers.common import (
    IdemKey,
    Limit,
    Offset,
    PathRef,
    aliases_of,
    check_name,
    drop_aliases,
    drop_artifacts,
    file_sha256,
    fingerprint,
    next_version,
    owned,
    page,
    parse_json_field,
    remember,
    replayed,
    resolve,
    resolve_classes,
    save_upload,
    set_aliases,
    unprocessable,
)
from app.schemas import (
    Accepted,
    AliasesIn,
    ComponentSetOut,
    ComponentsOut,
    JobOut,
    LocateIn,
    ModelOut,
    PredictOut,
    errors,
)
from app.services import Services, services
from worker.runtime import create_job
from worker.tasks import locate_jobs_for

router = APIRouter(prefix="/api/v1", tags=["models"])
Owner = Annotated[str, Depends(current_owner)]
Svc = Annotated[Services, Depends(services)]


def parse_class_names(raw: str) -> list[str]:
    names = parse_json_field(raw, "class_names")
    if not isinstance(names, list) or not names:
        raise unprocessable("class_names must be a non-empty JSON list of class names")
    out = []
    for n in names:
        if isinstance(n, bool) or not isinstance(n, str | int) or not str(n).strip():
            raise unprocessable(f"class_names: {n!r} is not a class name (a non-empty string)")
        out.append(str(n))
    dup = sorted(n for n, k in Counter(out).items() if k > 1)  # linear: lists may be long
    if dup:
        raise unprocessable(f"class_names lists {', '.join(map(repr, dup))} more than once")
    return out


def models_out(s, owner: str, rows: list[Model]) -> list[ModelOut]:
    """ModelOut with aliases and reverse lineage (the assemblies using each model)."""
    ids = [m.id for m in rows]
    aliases = aliases_of(s, "model", owner, ids)
    used: dict[int, list[int]] = {i: [] for i in ids}
    if ids:
        q = (
            select(AssemblySource.model_id, AssemblySource.assembly_id)
            .where(AssemblySource.model_id.in_(ids))
            .distinct()
            .order_by(AssemblySource.assembly_id)
        )
        for model_id, assembly_id in s.execute(q):
            used[model_id].append(assembly_id)
    return [ModelOut.of(m, aliases=aliases[m.id], used_by=used[m.id]) for m in rows]


def check_locate_input(m: Model, ds: Dataset) -> None:
    if not set(m.class_names) & set(ds.classes):
        raise unprocessable(
            f"dataset {ds.id} has none of model {m.id}'s classes "
            f"(model: {', '.join(m.class_names[:10])}; dataset: {', '.join(list(ds.classes)[:10])})"
        )


def start_locate(svc: Services, s, owner: str, m: Model, ds: Dataset, body: LocateIn) -> Job:
    check_locate_input(m, ds)
    payload = {
        "model_id": m.id,
        "dataset_id": ds.id,
        "samples_per_class": body.samples_per_class,
        "alpha": body.alpha,
        "beta": body.beta,
    }
    return create_job(s, owner, "locate", payload, svc.settings.job_max_attempts)


@router.post(
    "/models",
    responses=errors(400, 401, 409, 413, 422, 503, 507),
    status_code=201,
    response_model=ModelOut,
)
def register_model(
    owner: Owner,
    svc: Svc,
    response: Response,
    weights: Annotated[
        UploadFile, File(description="state_dict .pt, ExportedProgram or TorchScript file")
    ],
    name: Annotated[str, Form(min_length=1, max_length=200)],
    arch: Annotated[str, Form(description="registry architecture, 'exported' or 'torchscript'")],
    class_names: Annotated[str, Form(description='JSON list, e.g. ["cat", "dog"]')],
    input_spec: Annotated[str, Form(description='JSON {"channels","height","width","mean","std"}')],
    dataset_id: Annotated[
        int | None, Form(ge=1, le=MAX_ID, description="locate on this dataset at once")
    ] = None,
    idempotency_key: IdemKey = None,
):
    """Register a trained classifier: a state_dict of a registry architecture, a torch.export
    ExportedProgram or a TorchScript file (never unpickled). Registering a name again adds
    its next version. `dataset_id` starts locating its components at once. Send an
    `Idempotency-Key` header to make retries safe."""
    check_name(name)
    names = parse_class_names(class_names)
    spec = adapters.parse_input_spec(parse_json_field(input_spec, "input_spec"))
    arches = adapters.known_arches()
    if arch not in arches:
        raise unprocessable(f"unknown arch {arch!r}; use one of {', '.join(arches)}")
    ds = None
    if dataset_id is not None:
        with svc.catalog.session() as s:
            ds = owned(s, Dataset, dataset_id, owner, "dataset")

    tmp = save_upload(
        svc.storage,
        weights,
        svc.settings.max_model_bytes,
        "weights",
        adapters.weights_suffix(arch),
    )
    fp = fingerprint(name, arch, names, spec.to_dict(), dataset_id, file_sha256(tmp))
    if idempotency_key is not None:
        with svc.catalog.session() as s:
            earlier = replayed(s, owner, "model", idempotency_key, fp)
            if earlier is not None:
                tmp.unlink(missing_ok=True)
                response.headers["Location"] = f"/api/v1/models/{earlier}"
                return models_out(s, owner, [owned(s, Model, earlier, owner, "model")])[0]
    try:
        from lego_core.errors import LegoError, ModelFileError

        label = weights.filename or "weights"
        try:
            adapters.load_source(tmp, arch, names, spec)
        except LegoError as exc:  # name the user's file, not our temp file
            raise type(exc)(str(exc).replace(tmp.name, label)) from None
        except Exception as exc:  # whatever a broken file makes torch raise
            raise ModelFileError(f"{label}: cannot be read as {arch}: {exc}") from None
        sha, size = svc.storage.store_file(tmp)
    finally:
        tmp.unlink(missing_ok=True)

    try:
        with svc.catalog.session() as s:
            m = Model(
                owner=owner,
                name=name,
                version=next_version(s, "model", owner, name),
                arch=arch,
                class_names=names,
                input_spec=spec.to_dict(),
                weights_sha256=sha,
                weights_bytes=size,
            )
            s.add(m)
            s.flush()
            job = None
            if ds is not None:
                job = start_locate(svc, s, owner, m, ds, LocateIn(dataset_id=ds.id))
            remember(s, owner, "model", idempotency_key, fp, m.id)
            s.flush()
            out = ModelOut.of(m, job.id if job else None)
    except IntegrityError:  # a concurrent registration took this version number or key
        with svc.catalog.session() as s:
            drop_artifacts(s, svc.storage, {sha})
        raise ApiError(
            409, f"model {name!r} was registered concurrently; retry", "concurrent-update"
        ) from None
    except BaseException:
        with svc.catalog.session() as s:
            drop_artifacts(s, svc.storage, {sha})
        raise
    if job is not None:
        svc.dispatch(job.id)
    response.headers["Location"] = f"/api/v1/models/{out.id}"
    return out


@router.get("/models", responses=errors(401, 422, 503), response_model=list[ModelOut])
def list_models(
    owner: Owner,
    svc: Svc,
    request: Request,
    response: Response,
    limit: Limit = 100,
    offset: Offset = 0,
    name: Annotated[str | None, Query(max_length=200, description="only this name")] = None,
    arch: Annotated[str | None, Query(max_length=64, description="only this arch")] = None,
):
    """The owner's models (every version), oldest first; `X-Total-Count` gives the total and
    `Link: <...>; rel="next"` the next page."""
    q = select(Model).where(Model.owner == owner).order_by(Model.id)
    if name is not None:
        q = q.where(Model.name == name)
    if arch is not None:
        q = q.where(Model.arch == arch)
    with svc.catalog.session() as s:
        return models_out(s, owner, page(s, q, request, response, limit, offset))


@router.post(
    "/models/{ref:path}/locate",
    responses=errors(400, 401, 404, 422, 503),
    status_code=202,
    response_model=Accepted,
)
def locate_components(
    ref: PathRef,
    body: LocateIn,
    owner: Owner,
    svc: Svc,
    response: Response,
    idempotency_key: IdemKey = None,
):
    """Start a job that locates every class's component on a dataset (202 with the job;
    `Location` points at it)."""
    fp = fingerprint(ref, body.model_dump(mode="json"))
    with svc.catalog.session() as s:
        earlier = replayed(s, owner, "locate", idempotency_key, fp)
        if earlier is not None:
            response.headers["Location"] = f"/api/v1/jobs/{earlier}"
            job = owned(s, Job, earlier, owner, "job")
            return Accepted(job_id=job.id, job=JobOut.of(job))
        m = resolve(s, Model, ref, owner, "model")
        ds = owned(s, Dataset, body.dataset_id, owner, "dataset")
        job = start_locate(svc, s, owner, m, ds, body)
        s.flush()
        remember(s, owner, "locate", idempotency_key, fp, job.id)
        out = Accepted(job_id=job.id, job=JobOut.of(job))
    svc.dispatch(out.job_id)
    response.headers["Location"] = f"/api/v1/jobs/{out.job_id}"
    return out


@router.get(
    "/models/{ref:path}/components",
    responses=errors(401, 404, 422, 503),
    response_model=ComponentsOut,
)
def list_components(ref: PathRef, owner: Owner, svc: Svc):
    """The located components: per class, the kept/total channels of each layer, params and
    FLOPs, from the latest set; every set; jobs still locating."""
    with svc.catalog.session() as s:
        m = resolve(s, Model, ref, owner, "model")
        sets = []
        for c in sorted(m.component_sets, key=lambda c: c.id, reverse=True):
            ds = s.get(Dataset, c.dataset_id)
            sets.append(ComponentSetOut.of(c, ds.name if ds else None))
        pending = [j.id for j in locate_jobs_for(s, owner, m.id, active=True)]
        return ComponentsOut(
            model_id=m.id,
            classes=sets[0].classes if sets else [],
            component_sets=sets,
            pending_job_ids=pending,
        )


@router.get(
    "/models/{ref:path}/routes.svg",
    response_class=Response,
    responses={**errors(401, 404, 409, 422, 503), 200: {"content": {"image/svg+xml": {}}}},
)
def routes_svg(
    ref: PathRef,
    owner: Owner,
    svc: Svc,
    classes: Annotated[
        str | None, Query(description="comma-separated class names or indices (default: all)")
    ] = None,
    component_set_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
):
    """An SVG of the classes' routes through the network (needs located components)."""
    with svc.catalog.session() as s:
        m = resolve(s, Model, ref, owner, "model")
        if component_set_id is not None:
            cs = s.get(ComponentSet, component_set_id)
            if cs is None or cs.model_id != m.id:
                raise HTTPException(404, f"component set {component_set_id} not found")
        else:
            cs = m.component_sets[-1] if m.component_sets else None
        if cs is None:
            raise ApiError(
                409,
                f"model {m.id} has no located components yet; "
                f"POST /api/v1/models/{m.id}/locate first",
                "no-components",
            )
        s.expunge(m)
        sha = cs.artifact_sha256
    wanted = [c.strip() for c in classes.split(",") if c.strip()] if classes else []
    indices = (
        resolve_classes(m.class_names, wanted, f"model {m.id}")
        if wanted
        else list(range(len(m.class_names)))
    )
    from lego_core import Components, render_routes

    source = adapters.load_model(svc.storage, m)
    comps = Components.load(svc.storage.require(sha))
    svg = render_routes(source, comps, indices, name=m.name)
    return Response(svg, media_type="image/svg+xml")


@router.post(
    "/models/{ref:path}/predict",
    responses=errors(400, 401, 404, 413, 415, 422, 503),
    response_model=PredictOut,
    openapi_extra=PREDICT_BODY,
)
async def predict_model(
    ref: PathRef, request: Request, owner: Owner, svc: Svc, top_k: TopK = 3
) -> PredictOut:
    """Classify images with a registered source model (same bodies as assembly predict)."""
    blobs, top_k = await read_images(request, svc, top_k)

    def lookup_and_predict() -> PredictOut:
        with svc.catalog.session() as s:
            m = resolve(s, Model, ref, owner, "model")
            s.expunge(m)

        def load() -> Batcher:
            source = adapters.SourceClassifier(adapters.load_model(svc.storage, m))
            return Batcher(source, svc.settings.predict_batch_size)

        # Rows never change and ids are never reused: the id names the served model.
        return classify(svc, svc.models.get(f"model:{m.id}", load), blobs, top_k)

    return await run_in_threadpool(lookup_and_predict)


# The routes below take the whole rest of the path as the model's reference (it may be
# `name/version`), so they come after the routes with a suffix.


@router.get("/models/{ref:path}", responses=errors(401, 404, 422, 503), response_model=ModelOut)
def get_model(ref: PathRef, owner: Owner, svc: Svc):
    """One model version by id, `name@alias`, `name/version` or `name` (its latest version),
    with its aliases and the assemblies that use it (`used_by`)."""
    with svc.catalog.session() as s:
        return models_out(s, owner, [resolve(s, Model, ref, owner, "model")])[0]


@router.patch(
    "/models/{ref:path}", responses=errors(400, 401, 404, 409, 422, 503), response_model=ModelOut
)
def update_model(ref: PathRef, body: AliasesIn, owner: Owner, svc: Svc):
    """Sets the aliases of this version; `GET /models/{name}@{alias}` then finds it."""
    with svc.catalog.session() as s:
        m = resolve(s, Model, ref, owner, "model")
        set_aliases(s, "model", m, body.aliases)
        return models_out(s, owner, [m])[0]


@router.delete("/models/{ref:path}", responses=errors(401, 404, 409, 422, 503), status_code=204)
def delete_model(ref: PathRef, owner: Owner, svc: Svc):
    """Delete a model version, its components and their files (409 while an assembly uses it or
    a locate job runs). Its id and version number are never given again."""
    with svc.catalog.session() as s:
        m = resolve(s, Model, ref, owner, "model")
        users = s.scalars(
            select(AssemblySource.assembly_id).where(AssemblySource.model_id == m.id).distinct()
        ).all()
        if users:
            raise ApiError(
                409,
                f"model {m.id} is used by assemblies {', '.join(map(str, users))}; "
                "delete those first",
                "model-in-use",
            )
        if locate_jobs_for(s, owner, m.id, active=True):
            raise ApiError(409, f"model {m.id} has a locate job in progress", "job-in-progress")
        shas = {m.weights_sha256} | {c.artifact_sha256 for c in m.component_sets}
        drop_aliases(s, "model", m)
        s.delete(m)
        s.flush()
        drop_artifacts(s, svc.storage, shas)
    return Response(status_code=204)
