"""The monitor's rules (no I/O): polling backoff and what its statuses say."""

from __future__ import annotations

from collections.abc import Iterator

from shared.esp.base import ImportState, ImportStatus, SendStatus
from shared.model.messages import BroadcastStatus, Stage, State


def backoff(initial_s: float, max_s: float, factor: float = 1.6) -> Iterator[float]:
    """Waits between polls: growing from ``initial_s`` to at most ``max_s``."""
    delay = initial_s
    while True:
        yield delay
        delay = min(max_s, delay * factor)


def status(job_id: str, stage: Stage, state: State, detail: str = "", **counts: int) -> BroadcastStatus:
    """An import- or send-stage status from the monitor."""
    return BroadcastStatus(
        job_id=job_id, stage=stage, state=state, detail=detail[:2000], counts=counts, service="monitor"
    )


def import_counts(imp: ImportStatus) -> dict[str, int]:
    """The counts an import status carries."""
    return {"rows_valid": imp.rows_valid, "rows_invalid": imp.rows_invalid}


def import_failure(imp: ImportStatus) -> str | None:
    """Why the ESP rejected a list, in one line; None when it imported recipients to send to.

    An import the ESP calls done that kept none of the list's rows is a rejection too: sending it
    would send nothing.
    """
    reasons = "; ".join(imp.errors[:5]) or "no reason given"
    if imp.state is ImportState.FAILED:
        return f"the ESP rejected the list (import {imp.import_id}): {reasons}"
    if imp.rows_valid == 0 and imp.rows_invalid > 0:
        return f"the ESP refused all {imp.rows_invalid} rows of the list (import {imp.import_id}): {reasons}"
    return None


def import_detail(imp: ImportStatus) -> str:
    """The detail of a done import: the rows the ESP refused, with its first reasons."""
    if not imp.rows_invalid:
        return f"import {imp.import_id}"
    return f"import {imp.import_id}: the ESP refused {imp.rows_invalid} rows: " + "; ".join(imp.errors[:5])


def send_counts(send: SendStatus) -> dict[str, int]:
    """The counts a send status carries."""
    return {"recipients": send.recipients}
