"""Jobs: status, progress, timestamps and error of locate and assemble jobs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from sqlalchemy import select

from app.auth import current_owner
from app.catalog import JOB_STATES, Job
from app.routers.common import PathId, owned
from app.schemas import JobOut
from app.services import Services, services

router = APIRouter(prefix="/api/v1", tags=["jobs"])
Owner = Annotated[str, Depends(current_owner)]
Svc = Annotated[Services, Depends(services)]


@router.get("/jobs", response_model=list[JobOut])
def list_jobs(
    owner: Owner,
    svc: Svc,
    status: Annotated[str | None, Query(pattern="^(" + "|".join(JOB_STATES) + ")$")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
):
    with svc.catalog.session() as s:
        q = select(Job).where(Job.owner == owner).order_by(Job.id.desc()).limit(limit)
        if status:
            q = q.where(Job.status == status)
        return [JobOut.of(j) for j in s.scalars(q)]


@router.get("/jobs/{job_id}", response_model=JobOut)
def get_job(job_id: PathId, owner: Owner, svc: Svc):
    with svc.catalog.session() as s:
        return JobOut.of(owned(s, Job, job_id, owner, "job"))
