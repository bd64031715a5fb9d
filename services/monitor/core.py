"""The monitor's rules (no I/O)."""

from __future__ import annotations

from shared.messages import BroadcastStatus, ListUploaded, Stage, State


def import_queued(upload: ListUploaded) -> BroadcastStatus:
    """The status of an uploaded list waiting for the ESP's import."""
    return BroadcastStatus(
        job_id=upload.job_id,
        stage=Stage.IMPORT,
        state=State.QUEUED,
        counts={"rows": upload.rows},
        detail=f"list {upload.remote_path} on {upload.esp}/{upload.account}",
        service="monitor",
    )
