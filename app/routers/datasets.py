"""Datasets: ImageFolder archives (tar, tar.gz, zip) of `<class>/<image>`."""

from __future__ import annotations

import os
from pathlib import Path
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
from sqlalchemy import select

from app import adapters
from app.auth import current_owner
from app.catalog import ACTIVE_STATES, Assembly, ComponentSet, Dataset, Job
from app.errors import ApiError
from app.routers.common import (
    IdemKey,
    Limit,
    Offset,
    PathId,
    drop_artifacts,
    file_sha256,
    fingerprint,
    owned,
    page,
    remember,
    replayed,
    save_upload,
    unprocessable,
)
from app.schemas import DatasetOut, errors
from app.services import Services, services

router = APIRouter(prefix="/api/v1", tags=["datasets"])
Owner = Annotated[str, Depends(current_owner)]
Svc = Annotated[Services, Depends(services)]


def sniff_archive(path: Path) -> str | None:
    """The archive kind from its first bytes: .tar.gz, .zip, .tar, or None."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:2] == b"\x1f\x8b":
        return ".tar.gz"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return ".zip"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return ".tar"
    return None


def server_side_path(svc: Services, rel: str) -> Path:
    root = svc.settings.data_dir
    if root is None:
        raise unprocessable("path: server-side datasets are not enabled (set LEGO_DATA_DIR)")
    root = root.resolve()
    p = (root / rel).resolve()
    if not p.is_relative_to(root) or not p.is_file():
        raise unprocessable(f"path: {rel!r} is not an archive in the server's data directory")
    return p


def _inspect(path: Path, limits, label: str) -> dict[str, int]:
    from lego_core import inspect_image_folder
    from lego_core.errors import DatasetError, LegoError

    try:
        return inspect_image_folder(path, limits)
    except LegoError as exc:  # name the user's file, not our temp file
        raise type(exc)(str(exc).replace(path.name, label)) from None
    except Exception as exc:  # a broken archive makes tarfile/zipfile raise anything
        raise DatasetError(f"archive: unreadable ({type(exc).__name__}: {exc})") from None


@router.post(
    "/datasets",
    responses=errors(400, 401, 404, 409, 413, 422, 503, 507),
    status_code=201,
    response_model=DatasetOut,
)
def upload_dataset(
    owner: Owner,
    svc: Svc,
    response: Response,
    name: Annotated[str, Form(min_length=1, max_length=200)],
    archive: Annotated[
        UploadFile | None, File(description="ImageFolder tar, tar.gz or zip")
    ] = None,
    path: Annotated[
        str | None, Form(description="instead of `archive`: an archive under LEGO_DATA_DIR")
    ] = None,
    idempotency_key: IdemKey = None,
):
    """Upload an ImageFolder archive (tar, tar.gz or zip of class folders), or name one under
    LEGO_DATA_DIR with `path`. Send an `Idempotency-Key` header to make retries safe."""
    if (archive is None) == (path is None):
        raise unprocessable("send either an `archive` file or a server-side `path`")
    storage = svc.storage
    label = (archive.filename if archive is not None else path) or "archive"
    if archive is not None:
        tmp = save_upload(storage, archive, svc.settings.max_dataset_bytes, "archive")
    else:
        src = server_side_path(svc, path)
        if src.stat().st_size > svc.settings.max_dataset_bytes:
            raise HTTPException(
                413, f"path: {path!r} is over the limit of {svc.settings.max_dataset_bytes} bytes"
            )
        with open(src, "rb") as f:
            tmp = storage.put_stream(f)
    fp = fingerprint(name, path, file_sha256(tmp))
    if idempotency_key is not None:
        with svc.catalog.session() as s:
            earlier = replayed(s, owner, "dataset", idempotency_key, fp)
            if earlier is not None:
                tmp.unlink(missing_ok=True)
                response.headers["Location"] = f"/api/v1/datasets/{earlier}"
                return DatasetOut.of(owned(s, Dataset, earlier, owner, "dataset"))
    try:
        suffix = sniff_archive(tmp)
        if suffix is None:
            raise unprocessable("archive: not a tar, tar.gz or zip file")
        named = tmp.with_name(tmp.name + suffix)
        os.replace(tmp, named)
        tmp = named
        counts = _inspect(tmp, adapters.archive_limits(svc.settings), label)
        if not counts:
            raise unprocessable("archive: no class folders with images found")
        sha, size = storage.store_file(tmp)
    finally:
        tmp.unlink(missing_ok=True)
    try:
        with svc.catalog.session() as s:
            d = Dataset(
                owner=owner,
                name=name,
                classes={str(k): int(v) for k, v in counts.items()},
                archive_sha256=sha,
                archive_bytes=size,
                archive_suffix=suffix,
            )
            s.add(d)
            s.flush()
            remember(s, owner, "dataset", idempotency_key, fp, d.id)
            response.headers["Location"] = f"/api/v1/datasets/{d.id}"
            return DatasetOut.of(d)
    except BaseException:
        with svc.catalog.session() as s:
            drop_artifacts(s, storage, {sha})
        raise


@router.get("/datasets", responses=errors(401, 422, 503), response_model=list[DatasetOut])
def list_datasets(
    owner: Owner,
    svc: Svc,
    request: Request,
    response: Response,
    limit: Limit = 100,
    offset: Offset = 0,
    name: Annotated[str | None, Query(max_length=200, description="only this name")] = None,
):
    """The owner's datasets, oldest first (paged: `X-Total-Count`, `Link` rel="next")."""
    q = select(Dataset).where(Dataset.owner == owner).order_by(Dataset.id)
    if name is not None:
        q = q.where(Dataset.name == name)
    with svc.catalog.session() as s:
        return [DatasetOut.of(d) for d in page(s, q, request, response, limit, offset)]


@router.get(
    "/datasets/{dataset_id}", responses=errors(401, 404, 422, 503), response_model=DatasetOut
)
def get_dataset(dataset_id: PathId, owner: Owner, svc: Svc):
    """One dataset: its classes and image counts."""
    with svc.catalog.session() as s:
        return DatasetOut.of(owned(s, Dataset, dataset_id, owner, "dataset"))


@router.delete("/datasets/{dataset_id}", responses=errors(401, 404, 409, 422, 503), status_code=204)
def delete_dataset(dataset_id: PathId, owner: Owner, svc: Svc):
    """Delete a dataset and its archive (409 while components, an assembly or a job use it)."""
    with svc.catalog.session() as s:
        d = owned(s, Dataset, dataset_id, owner, "dataset")
        if s.scalar(select(ComponentSet.id).where(ComponentSet.dataset_id == d.id).limit(1)):
            raise ApiError(
                409,
                f"dataset {d.id} holds located components; delete their models first",
                "dataset-in-use",
            )
        evals = s.scalars(select(Assembly).where(Assembly.owner == owner))
        if any(d.id in (a.eval_dataset_ids or []) for a in evals):
            raise ApiError(
                409, f"dataset {d.id} is an evaluation set of an assembly", "dataset-in-use"
            )
        jobs = s.scalars(select(Job).where(Job.owner == owner, Job.status.in_(ACTIVE_STATES)))
        if any((j.payload or {}).get("dataset_id") == d.id for j in jobs):
            raise ApiError(409, f"dataset {d.id} is used by a job in progress", "job-in-progress")
        sha = d.archive_sha256
        s.delete(d)
        s.flush()
        drop_artifacts(s, svc.storage, {sha})
    return Response(status_code=204)
