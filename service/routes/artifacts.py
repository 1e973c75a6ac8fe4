"""Downloads of a succeeded job's files: one file at a time (with Range) or everything as a tar stream."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import StreamingResponse

from adapter_merge.core.jobs import JobRecord, JobStatus
from adapter_merge.core.problems import Problem, Problems
from adapter_merge.service.deps import JobDep, ServicesDep
from adapter_merge.service.files import file_response, tar_stream
from adapter_merge.service.schemas import problem_responses

router = APIRouter(prefix="/jobs/{job_id}", tags=["artifacts"])

_FILE_RESPONSES = {
    200: {"description": "The whole file.", "content": {"application/octet-stream": {}}},
    206: {"description": "The requested byte range.", "content": {"application/octet-stream": {}}},
    304: {"description": "Not modified (If-None-Match matched the ETag)."},
    **problem_responses(401, 403, 404, 409, 416),
}


def _require_success(job: JobRecord) -> None:
    if job.status is not JobStatus.succeeded:
        raise Problem(Problems.JOB_NOT_SUCCEEDED, f"job {job.id} is {job.status.value}; artifacts exist only "
                      "once it has succeeded", status_now=job.status.value)


@router.head("/artifacts/{path:path}", response_class=Response, responses=_FILE_RESPONSES,
             operation_id="head_artifact", summary="Artifact headers")
@router.get("/artifacts/{path:path}", response_class=Response, responses=_FILE_RESPONSES,
            operation_id="download_artifact")
def download_artifact(
    job: JobDep, path: str, request: Request, services: ServicesDep,
    range_: Annotated[str | None, Header(alias="Range")] = None,
    if_none_match: Annotated[str | None, Header()] = None,
    if_range: Annotated[str | None, Header()] = None,
) -> Response:
    """One output file. ETag is its sha256; a single `Range: bytes=...` is honoured (206), a bad one is 416."""
    _require_success(job)
    artifact = next((item for item in job.artifacts if item.path == path), None)
    if artifact is None:
        names = ", ".join(item.path for item in job.artifacts)
        raise Problem(Problems.ARTIFACT_NOT_FOUND, f"job {job.id} has no artifact {path!r} (it has: {names})",
                      field="path")
    file = services.context.layout.result_dir(job.id, job.attempt) / artifact.path
    if not file.is_file():
        raise Problem(Problems.ARTIFACT_GONE, f"artifact {path!r} of job {job.id} is no longer on disk",
                      field="path")
    return file_response(file, artifact.sha256, method=request.method, range_header=range_,
                         if_none_match=if_none_match, if_range=if_range)


@router.get("/archive", response_class=StreamingResponse, responses={
    200: {"description": "A POSIX tar of the merged model folder.", "content": {"application/x-tar": {}}},
    **problem_responses(401, 403, 404, 409)})
def download_archive(job: JobDep, services: ServicesDep) -> StreamingResponse:
    """The whole merged model as one tar stream (with Content-Length), under a folder named after the job."""
    _require_success(job)
    root = services.context.layout.result_dir(job.id, job.attempt)
    mtime = job.finished_at.timestamp() if job.finished_at else 0.0
    try:
        length, chunks = tar_stream(root, [item.path for item in job.artifacts], job.id, mtime)
    except FileNotFoundError as error:
        raise Problem(Problems.ARTIFACT_GONE, f"job {job.id}: {Path(error.filename).name} is no longer on disk"
                      ) from error
    headers = {"Content-Length": str(length), "Content-Disposition": f'attachment; filename="{job.id}.tar"'}
    return StreamingResponse(chunks, media_type="application/x-tar", headers=headers)
