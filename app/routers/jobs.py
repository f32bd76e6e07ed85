"""Jobs: status, progress, timestamps and error of locate and assemble jobs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from sqlalchemy import select

from app.auth import current_owner
from app.catalog import JOB_STATES, Job
from app.errors import ApiError
from app.routers.common import Limit, Offset, PathId, owned, page
from app.schemas import JobOut, errors
from app.services import Services, services
from worker.runtime import request_cancel

router = APIRouter(prefix="/api/v1", tags=["jobs"])
Owner = Annotated[str, Depends(current_owner)]
Svc = Annotated[Services, Depends(services)]


@router.get("/jobs", responses=errors(401, 422, 503), response_model=list[JobOut])
def list_jobs(
    owner: Owner,
    svc: Svc,
    request: Request,
    response: Response,
    status: Annotated[str | None, Query(pattern="^(" + "|".join(JOB_STATES) + ")$")] = None,
    kind: Annotated[str | None, Query(pattern="^(locate|assemble)$")] = None,
    limit: Limit = 100,
    offset: Offset = 0,
):
    """The owner's jobs, newest first."""
    q = select(Job).where(Job.owner == owner).order_by(Job.id.desc())
    if status:
        q = q.where(Job.status == status)
    if kind:
        q = q.where(Job.kind == kind)
    with svc.catalog.session() as s:
        return [JobOut.of(j) for j in page(s, q, request, response, limit, offset)]


@router.get("/jobs/{job_id}", responses=errors(401, 404, 422, 503), response_model=JobOut)
def get_job(job_id: PathId, owner: Owner, svc: Svc):
    """One job: status, progress, message, timestamps, error or result."""
    with svc.catalog.session() as s:
        return JobOut.of(owned(s, Job, job_id, owner, "job"))


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=JobOut,
    responses={
        **errors(401, 404, 409, 422, 503),
        202: {"model": JobOut, "description": "running: it stops at its next step"},
    },
)
def cancel_job(job_id: PathId, owner: Owner, svc: Svc, response: Response):
    """Cancel a job. A queued job ends `cancelled` at once (200); a running one is asked
    to stop (202) and ends `cancelled` at its next progress point, the artifacts it
    stored removed. A job that already succeeded or failed: 409."""
    with svc.catalog.session() as s:
        j = owned(s, Job, job_id, owner, "job")
        if j.status in ("succeeded", "failed"):
            raise ApiError(409, f"job {j.id} already {j.status}", "job-finished")
        request_cancel(s, j.id)
        s.flush()
        s.refresh(j)
        if j.status == "running":
            response.status_code = 202
        response.headers["Location"] = f"/api/v1/jobs/{j.id}"
        return JobOut.of(j)


@router.delete(
    "/jobs/{job_id}",
    responses=errors(401, 404, 409, 422, 503),
    response_model=JobOut,
    include_in_schema=True,
)
def delete_job(job_id: PathId, owner: Owner, svc: Svc, response: Response):
    """Same as `POST /jobs/{job_id}/cancel` (jobs are kept as a record)."""
    return cancel_job(job_id, owner, svc, response)
