"""``espbridge job list`` and ``job status [--follow]``: the run history from the control tables
(control.jobs, control.job_history) and the response funnel — never by reading a topic."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from cli.output import as_json, one_line, table
from shared.infra.db.jobs import JobFilters, JobSummary
from shared.infra.settings import PostgresSettings
from shared.model.deadletters import parse_since
from shared.model.errors import InvalidMessageError
from shared.model.messages import BroadcastStatus, Stage, State, utcnow
from shared.operations.jobs import JobView, list_jobs, view_job

DETAIL_WIDTH = 80
"""How much of a job's latest detail the list shows."""
STAGES = (Stage.UPLOAD, Stage.IMPORT, Stage.SEND)
"""The stages a job's own row follows; the responses after them show in its funnel."""


def _when(at: datetime | None) -> str:
    return "-" if at is None else f"{at.astimezone(UTC):%Y-%m-%d %H:%M:%S}"


def _send_time(s: JobSummary) -> str:
    if s.mode == "upload_only":
        return "upload only"
    return "on import" if s.send_at is None else _when(s.send_at)


def list_rows(jobs: Sequence[JobSummary]) -> list[list[str]]:
    """The list's table: a header, then one row per job, newest first."""
    rows = [["JOB ID", "CREATED", "ESP/ACCOUNT", "LIST", "SEND AT", "STAGE", "STATE", "UPDATED", "DETAIL"]]
    for s in jobs:
        rows.append(
            [
                s.job_id,
                _when(s.created_at),
                f"{s.esp}/{s.account}",
                one_line(s.list_name, 30),
                _send_time(s),
                s.stage,
                s.state,
                _when(s.updated_at),
                one_line(s.detail, DETAIL_WIDTH),
            ]
        )
    return rows


def summary_json(s: JobSummary) -> dict[str, object]:
    """One job for ``--json``, times in ISO 8601."""
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in dataclasses.asdict(s).items()}


async def job_list(args: argparse.Namespace) -> int:
    """``job list``: the run history, newest first."""
    since = parse_since(args.since, utcnow()) if args.since else None
    filters = JobFilters(state=args.state, stage=args.stage, esp=args.esp, account=args.account, since=since)
    found = await list_jobs(PostgresSettings(), filters, args.limit)
    if args.json:
        print(as_json([summary_json(s) for s in found]))
    elif found:
        print(table(list_rows(found)))
    else:
        print("no jobs match")
    return 0


def summarize(statuses: Sequence[BroadcastStatus]) -> list[tuple[BroadcastStatus, int]]:
    """The statuses a person reads: every change of stage or state, with repeated progress
    updates of one stage and state (gather and load report per file and batch) folded into the
    latest one and counted."""
    out: list[tuple[BroadcastStatus, int]] = []
    index: dict[tuple[str, str], int] = {}
    for s in statuses:
        key = (s.stage.value, s.state.value)
        if key in index and s.state.value == "running":
            i = index[key]
            out[i] = (s, out[i][1] + 1)
        else:
            index[key] = len(out)
            out.append((s, 1))
    return out


def status_line(s: BroadcastStatus, updates: int = 1) -> str:
    """One status as a row of the history table."""
    counts = " ".join(f"{k}={v}" for k, v in s.counts.items())
    detail = f"{s.detail} {counts}".strip() + (f" ({updates} updates, latest shown)" if updates > 1 else "")
    at = f"{s.at.astimezone(UTC):%Y-%m-%d %H:%M:%S.%f}"[:23]
    return f"{at:<24} {s.stage:<7} {s.state:<9} {s.service:<9} {detail}"


def format_statuses(statuses: Sequence[BroadcastStatus]) -> str:
    """Statuses as an aligned table, progress updates folded (see :func:`summarize`)."""
    lines = [f"{'at':<24} {'stage':<7} {'state':<9} {'service':<9} detail"]
    lines += [status_line(s, n) for s, n in summarize(statuses)]
    return "\n".join(lines)


def funnel_line(numbers: dict[str, int] | None) -> str:
    """The response funnel on one line."""
    if numbers is None:
        return "response funnel: nothing loaded yet"
    return "response funnel: " + "  ".join(f"{k}={v}" for k, v in numbers.items())


def view_header(view: JobView) -> list[str]:
    """What the job is and where it is now."""
    s = view.summary
    lines = [
        f"job {s.job_id} → {s.esp}/{s.account}, list {s.list_name!r}, message {s.message!r}",
        f"  {s.mode}, send at: {_send_time(s)}; requested by {s.requested_by}, created {_when(s.created_at)}",
    ]
    if s.cancel_requested_at is not None:
        why = f": {one_line(s.cancel_reason, 200)}" if s.cancel_reason else ""
        lines.append(
            f"  cancel requested by {s.cancel_requested_by or '?'} at {_when(s.cancel_requested_at)}{why}"
        )
    lines.append(
        f"  now: {s.stage} {s.state}"
        + (f": {one_line(s.detail, 200)}" if s.detail else "")
        + f" (updated {_when(s.updated_at)})"
    )
    return lines


def view_json(view: JobView) -> dict[str, object]:
    """``job status --json``."""
    return {
        "job": summary_json(view.summary),
        "ended": view.ended,
        "succeeded": view.succeeded,
        "history": [h.model_dump(mode="json", exclude={"job_id", "schema_version"}) for h in view.history],
        "funnel": view.funnel,
    }


def not_known(job_id: str) -> str:
    """What to say of a job that control.jobs does not hold."""
    return (
        f"espbridge: job {job_id} is not known: no uploader has taken it yet (a job refused as "
        f"invalid is shown by `espbridge dlq list --broadcast {job_id}`)"
    )


def _latest(history: Sequence[BroadcastStatus], stage: Stage) -> BroadcastStatus | None:
    of_stage = [h for h in history if h.stage is stage]
    return of_stage[-1] if of_stage else None


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def _progress(view: JobView, stage: Stage, latest: BroadcastStatus | None) -> tuple[RenderableType, str]:
    """A stage's bar and its numbers in words."""
    recipients = view.recipients
    if stage is Stage.UPLOAD and latest is not None:
        written, rows = latest.counts.get("bytes", 0), latest.counts.get("rows", 0)
        if latest.state is State.DONE:
            return ProgressBar(total=1, completed=1, width=24), f"{rows:,} rows, {_size(written)}"
        if latest.state is State.RUNNING:
            words = (f"{rows:,} rows, " if rows else "") + f"{_size(written)} written"
            return ProgressBar(total=None, width=24), words
    if stage is Stage.IMPORT and latest is not None and latest.state is State.DONE:
        valid, invalid = latest.counts.get("rows_valid", 0), latest.counts.get("rows_invalid", 0)
        return ProgressBar(total=1, completed=1, width=24), f"{valid:,} imported, {invalid:,} refused"
    if stage is Stage.LOAD:
        sent = (view.funnel or {}).get("sent", 0)
        if recipients:
            return ProgressBar(
                total=recipients, completed=sent, width=24
            ), f"{sent:,} of {recipients:,} sends"
        return Text(""), f"{sent:,} sends loaded"
    if stage is Stage.SEND and latest is not None and latest.counts.get("recipients"):
        words = f"{latest.counts['recipients']:,} recipients"
    else:
        words = ""
    if latest is not None and latest.state is State.RUNNING:
        return ProgressBar(total=None, width=24), words  # under way, for as long as the ESP takes
    done = latest is not None and latest.state is State.DONE
    return ProgressBar(total=1, completed=1 if done else 0, width=24), words


def follow_renderable(view: JobView) -> RenderableType:
    """The live view: the job, each stage with its state and progress, and the response funnel."""
    stages = Table(box=None, pad_edge=False)
    for column in ("stage", "state", "progress", "", "detail"):
        stages.add_column(column)
    for stage in (*STAGES, Stage.LOAD):
        latest = _latest(view.history, stage)
        if stage is Stage.LOAD:
            state = "running" if view.funnel else "waiting"
            detail = ""
        else:
            state = latest.state.value if latest else "waiting"
            detail = one_line(latest.detail, DETAIL_WIDTH) if latest else ""
        bar, words = _progress(view, stage, latest)
        stages.add_row(stage.value, state, bar, words, detail)
    return Group(*(Text(line) for line in view_header(view)), stages, Text(funnel_line(view.funnel)))


@dataclass
class _Lines:
    """``--follow`` without a terminal: one line per status recorded and per change of the funnel."""

    shown: int = -1
    """History entries printed; -1 before the job's header is."""
    funnel: str = ""

    def show(self, view: JobView) -> None:
        if self.shown < 0:
            print("\n".join(view_header(view)), flush=True)
            self.shown = 0
        for status in view.history[self.shown :]:
            print(status_line(status), flush=True)
        self.shown = len(view.history)
        line = funnel_line(view.funnel)
        if view.funnel is not None and line != self.funnel:
            print(line, flush=True)
            self.funnel = line


async def follow(job_id: str, interval_s: float, timeout_s: float | None) -> int:
    """``job status --follow``: live in a terminal (rich), otherwise one line per new status, until
    the broadcast ends; exit 1 if it failed or was cancelled, or on ``--timeout``."""
    pg = PostgresSettings()
    console = Console()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    lines = _Lines()
    view = await view_job(pg, job_id)
    if view is None:
        print(f"waiting for job {job_id} to be taken by an uploader …", file=sys.stderr, flush=True)
    with (
        Live(console=console, refresh_per_second=4)
        if console.is_terminal
        else contextlib.nullcontext() as live
    ):
        while True:
            if view is not None:
                if live is not None:
                    live.update(follow_renderable(view))
                else:
                    lines.show(view)
                if view.ended:
                    break
            if deadline is not None and time.monotonic() > deadline:
                print(f"espbridge: job {job_id} has not ended after {timeout_s:g} s", file=sys.stderr)
                return 1
            await asyncio.sleep(interval_s)  # the poll interval of the control tables
            view = await view_job(pg, job_id)
    print(f"job {job_id} ended: {one_line(view.outcome, 300)}", flush=True)
    return 0 if view.succeeded else 1


async def job_status(args: argparse.Namespace) -> int:
    """``job status``: the job's stages and response funnel from the control tables."""
    if args.follow:
        if args.json:
            raise InvalidMessageError("--follow draws the job live: leave out --json")
        return await follow(args.job_id, args.interval, args.timeout)
    view = await view_job(PostgresSettings(), args.job_id)
    if view is None:
        print(not_known(args.job_id), file=sys.stderr)
        return 1
    if args.json:
        print(as_json(view_json(view)))
        return 0
    print("\n".join(view_header(view)))
    print(format_statuses(view.history))
    print(funnel_line(view.funnel))
    return 0


def add_arguments(ls: argparse.ArgumentParser, st: argparse.ArgumentParser) -> None:
    """The arguments of ``job list`` and ``job status``."""
    ls.add_argument("--state", choices=[s.value for s in State], help="only jobs in this state now")
    ls.add_argument("--stage", choices=[s.value for s in STAGES], help="only jobs at this stage now")
    ls.add_argument("--esp", help="only jobs of this ESP")
    ls.add_argument("--account", help="only jobs of this ESP account")
    ls.add_argument(
        "--since", help="only jobs created since a time (ISO 8601) or for a duration (30m, 2h, 7d)"
    )
    ls.add_argument("--limit", type=int, default=50, help="at most this many, the newest (default 50)")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("job_id", metavar="JOB_ID")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument(
        "--follow", action="store_true", help="show the stages and funnel live until the broadcast ends"
    )
    st.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    st.add_argument("--timeout", type=float, help="with --follow: give up (exit 1) after this many seconds")
