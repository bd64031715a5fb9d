"""The monitor's rules (no I/O): polling back-off, send times, and what its statuses say."""

from __future__ import annotations

from datetime import datetime

from shared.esp.base import CancelOutcome, CancelResult, ImportState, ImportStatus, SendState, SendStatus
from shared.infra.db.broadcast_work import Step
from shared.model.messages import BroadcastStatus, CancelRequest, Stage, State

FINISHED_IMPORTS = frozenset({ImportState.DONE, ImportState.FAILED})
FINISHED_SENDS = frozenset({SendState.SENT, SendState.FAILED})


def poll_delay(initial_s: float, max_s: float, polls: int, factor: float = 1.6) -> float:
    """The wait before poll number ``polls`` + 1 (or retry): from ``initial_s`` growing to ``max_s``."""
    return min(max_s, initial_s * factor ** min(polls, 64))


def retry_delay(initial_s: float, max_s: float, attempts: int, retry_after_s: float | None) -> float:
    """The wait before trying a failed step again: the back-off, and at least the ESP's Retry-After."""
    return max(poll_delay(initial_s, max_s, attempts), retry_after_s or 0.0)


def stage_of(step: Step) -> Stage:
    """The stage a step belongs to, for its statuses."""
    return Stage.IMPORT if step in (Step.START_IMPORT, Step.IMPORT_STATUS) else Stage.SEND


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


def send_detail(send: SendStatus) -> str:
    """A send status's detail: the ESP's id and state."""
    return f"send {send.send_id} {send.state}"


def utc_text(moment: datetime) -> str:
    """A time as statuses show it: ``2026-11-23T09:00:00Z``."""
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def waiting_detail(send_at: datetime) -> str:
    """The detail of a broadcast imported and waiting for its send time."""
    return f"waiting for its send time {utc_text(send_at)}"


def send_time_missed(send_at: datetime | None, now: datetime, grace_s: float) -> str | None:
    """Why a broadcast ready now must not be sent: its send time passed more than ``grace_s`` ago
    (an import that took too long, monitors that were down); None when it may be sent."""
    if send_at is None:
        return None
    late_s = (now - send_at).total_seconds()
    if late_s <= grace_s:
        return None
    return (
        f"send time {utc_text(send_at)} passed {late_s:.0f}s before the broadcast could be sent "
        f"(more than send_at_grace_s, {grace_s:.0f}s): not sent late"
    )


def timeout_detail(step: Step, item_id: str | None, timeout_s: float, last_error: str) -> str:
    """Why a stage failed at its deadline, with the last error a retry met."""
    what = f"import {item_id} not done" if stage_of(step) is Stage.IMPORT else f"send {item_id} not finished"
    if step in (Step.SEND, Step.FIND_SEND, Step.RESEND) and item_id is None:
        what = "send not made"
    detail = f"{what} after {timeout_s:.0f}s"
    return f"{detail} (last error: {last_error})" if last_error else detail


def cancel_detail(cancel: CancelRequest) -> str:
    """Who cancelled the job, and why, in one line."""
    who = f" by {cancel.requested_by}" if cancel.requested_by else ""
    why = f": {cancel.reason}" if cancel.reason else ""
    return f"cancelled{who}{why}"


def cancel_answer(result: CancelResult, send_id: str) -> str:
    """What the ESP's answer to a cancel means, for the status."""
    said = f": {result.detail}" if result.detail else ""
    if result.outcome is CancelOutcome.CANCELLED:
        return f"the ESP cancelled send {send_id}{said}"
    if result.outcome is CancelOutcome.TOO_LATE:
        return f"too late to cancel send {send_id}, the ESP sent it already{said}"
    return f"send {send_id} cannot be cancelled, the ESP has no cancel{said}"
