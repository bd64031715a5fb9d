"""The uploader's rules (no I/O): what its statuses say. The list file's rules are shared with
``espbridge job check`` (:mod:`shared.operations.lists`)."""

from __future__ import annotations

import re

import orjson

from shared.model.messages import BroadcastStatus, ListUploaded, Stage, State

_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


def status(job_id: str, state: State, detail: str = "", **counts: int) -> BroadcastStatus:
    """An upload-stage status."""
    return BroadcastStatus(
        job_id=job_id,
        stage=Stage.UPLOAD,
        state=state,
        detail=detail[:2000],
        counts=counts,
        service="uploader",
    )


def writing_status(job_id: str, remote_path: str, rows: int, written: int) -> BroadcastStatus:
    """An upload in progress: the rows (where counted as they go) and bytes written so far."""
    counts = {"rows": rows, "bytes": written} if rows else {"bytes": written}
    return status(job_id, State.RUNNING, f"writing {remote_path}", **counts)


def uploaded_status(upload: ListUploaded) -> BroadcastStatus:
    """The status of a finished upload."""
    return status(
        upload.job_id,
        State.DONE,
        f"{upload.rows} recipients in {upload.remote_path}",
        rows=upload.rows,
        excluded=upload.excluded,
        bytes=upload.bytes,
    )


def job_id_of(body: bytes) -> str | None:
    """The job id of an invalid job, when it has a usable one (so its requester sees the failure)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    job_id = data.get("job_id") if isinstance(data, dict) else None
    return job_id if isinstance(job_id, str) and _JOB_ID.match(job_id) else None


def rejected(body: bytes, reason: str) -> BroadcastStatus | None:
    """The failed status of an invalid job, or None when the job has no usable id."""
    job_id = job_id_of(body)
    return None if job_id is None else status(job_id, State.FAILED, reason)
