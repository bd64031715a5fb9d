"""The uploader's rules (no I/O): what a job's acceptance or rejection looks like on the status topic."""

from __future__ import annotations

import re

import orjson

from shared.messages import BroadcastJob, BroadcastStatus, Stage, State

_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


def accepted(job: BroadcastJob) -> BroadcastStatus:
    """The status of a valid job the uploader has taken on."""
    return BroadcastStatus(
        job_id=job.job_id,
        stage=Stage.UPLOAD,
        state=State.QUEUED,
        detail=f"accepted for {job.esp}/{job.account}, list {job.list_name!r}",
        service="uploader",
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
    if job_id is None:
        return None
    return BroadcastStatus(
        job_id=job_id, stage=Stage.UPLOAD, state=State.FAILED, detail=reason[:2000], service="uploader"
    )
