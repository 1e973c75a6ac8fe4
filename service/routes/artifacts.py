"""Downloads of a succeeded job's files: one file at a time (with Range) or everything as a tar stream."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import StreamingResponse

from adapter_merge.core.jobs import JobRecord, JobStatus
from adapter_merge.core.problems import Problem, Problems
from adapter_merge.service.deps import JobDep, ServicesDep
from adapter_merge.service.files import ARTIFACT_MEDIA_TYPE, file_response, tar_stream
from adapter_merge.service.schemas import header, problem_responses

router = APIRouter(prefix="/jobs/{job_id}", tags=["artifacts"])
TAR_MEDIA_TYPE = "application/x-tar"

BINARY = {"schema": {"type": "string", "format": "binary"}}
_FILE_HEADERS = {
    "ETag": header('`"<sha256>"` of the whole file (also on a 206): for If-None-Match and If-Range.'),
    "Accept-Ranges": header("`bytes`: a single Range is honoured."),
    "Content-Length": header("Bytes in this response's body.", "integer"),
}
_RANGE_HEADERS = {**_FILE_HEADERS, "Content-Range": header("`bytes <first>-<last>/<size>`.")}
_FILE_PROBLEMS = problem_responses(401, 403, 404, 409, 416, 422, 503)


def _file_responses(body: dict[str, Any] | None) -> dict[int | str, dict[str, Any]]:
    """GET sends the bytes (`body`), HEAD the same headers without them."""
    content = {"content": {ARTIFACT_MEDIA_TYPE: body}} if body else {}
    return {
        200: {"description": "The whole file.", "headers": _FILE_HEADERS, **content},
        206: {"description": "The requested byte range.", "headers": _RANGE_HEADERS, **content},
        304: {"description": "Not modified (If-None-Match matched the ETag).",
              "headers": {"ETag": _FILE_HEADERS["ETag"]}},
        **_FILE_PROBLEMS,
    }


def _require_success(job: JobRecord) -> None:
    if job.status is not JobStatus.succeeded:
        raise Problem(Problems.JOB_NOT_SUCCEEDED, f"job {job.id} is {job.status.value}; artifacts exist only "
                      "once it has succeeded", status_now=job.status.value)


@router.head("/artifacts/{path:path}", response_class=Response, responses=_file_responses(None),
             name="head_artifact", summary="Artifact headers")
@router.get("/artifacts/{path:path}", response_class=Response, responses=_file_responses(BINARY),
            name="get_artifact", summary="Download an artifact")
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


@router.get("/archive", response_class=StreamingResponse, name="get_archive", responses={
    200: {"description": "A POSIX tar of the merged model folder.", "content": {TAR_MEDIA_TYPE: BINARY},
          "headers": {"Content-Length": _FILE_HEADERS["Content-Length"],
                      "Content-Disposition": header('`attachment; filename="<id>.tar"`.')}},
    **problem_responses(401, 403, 404, 409, 422, 503)})
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
    return StreamingResponse(chunks, media_type=TAR_MEDIA_TYPE, headers=headers)
