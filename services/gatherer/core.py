"""The gatherer's rules (no I/O)."""

from __future__ import annotations

from shared.messages import ResponseFile


def file_key(file: ResponseFile) -> str:
    """The ledger identity of a remote file: where it is, its size and its modification time."""
    return f"{file.esp}/{file.account}/{file.path}@{file.size}:{file.mtime.isoformat()}"
