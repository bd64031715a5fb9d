"""The gatherer's rules (no I/O)."""

from __future__ import annotations

import posixpath
from collections import Counter

from shared.model.messages import BroadcastStatus, ResponseFile, Stage, State

SERVICE_NAME = "gatherer"
"""The service named in the gatherer's statuses and dead letters."""


def file_key(file: ResponseFile) -> str:
    """A remote file's identity for logs: its path, size and modification time (as in the ledger)."""
    return f"{file.path}@{file.size}:{file.mtime.isoformat()}"


def archive_path(remote_path: str, account_root: str, archive_folder: str) -> str:
    """Where a processed response file goes on the ESP's site (same name, archive folder)."""
    return posixpath.join(account_root, archive_folder, posixpath.basename(remote_path))


def gather_statuses(file: ResponseFile, per_broadcast: Counter[str], bad_rows: int) -> list[BroadcastStatus]:
    """One running gather status per broadcast found in a file."""
    return [
        BroadcastStatus(
            job_id=broadcast,
            stage=Stage.GATHER,
            state=State.RUNNING,
            counts={"events": n, "bad_rows": bad_rows},
            detail=f"{n} events from {file.path}",
            service=SERVICE_NAME,
        )
        for broadcast, n in sorted(per_broadcast.items())
    ]
