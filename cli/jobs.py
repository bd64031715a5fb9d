"""``espbridge job``: publish a broadcast job, follow it, cancel it."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cli.output import as_json
from shared.infra.documents import DocumentError, read_document
from shared.infra.settings import KafkaSettings, PostgresSettings
from shared.model.errors import ConfigurationError, InvalidMessageError
from shared.model.messages import BroadcastStatus
from shared.model.topics import Topic
from shared.operations.jobs import build_cancel, build_job, funnel, publish_cancel, publish_job, read_statuses


def read_job_file(path: Path) -> dict[str, Any]:
    """A job file: JSON or YAML, a mapping at the top."""
    try:
        data = read_document(path)
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror}") from None
    except DocumentError as exc:
        raise InvalidMessageError(f"{path} is not valid {exc.form}: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidMessageError(f"{path} must hold one job (a mapping)")
    return data


def job_document(args: argparse.Namespace) -> dict[str, Any]:
    """The job's fields: the file's, with the flags' laid over them."""
    doc: dict[str, Any] = read_job_file(Path(args.file)) if args.file else {}
    flags = {
        "job_id": args.job_id,
        "esp": args.esp,
        "account": args.account,
        "list_name": args.list_name,
        "message": args.message,
        "communication_key": args.communication_key,
        "send_at": args.send_at,
    }
    doc.update({k: v for k, v in flags.items() if v is not None})
    if args.upload_only:
        doc["mode"] = "upload_only"
    if args.field:
        doc["field_map"] = dict(_pair(f, "--field") for f in args.field)
    if args.table:
        filters = dict(_pair(f, "--filter") for f in args.filter or [])
        columns = args.column or sorted({*doc.get("field_map", {}), doc.get("communication_key", "")} - {""})
        doc["selection"] = {"kind": "table", "table": args.table, "columns": columns, "filters": filters}
    return doc


def _pair(text: str, flag: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise InvalidMessageError(f"{flag} wants COLUMN=VALUE, got {text!r}")
    return key, value


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


def format_statuses(statuses: Sequence[BroadcastStatus]) -> str:
    """Statuses as an aligned table, progress updates folded (see :func:`summarize`)."""
    lines = [f"{'at':<24} {'stage':<7} {'state':<9} {'service':<9} detail"]
    for s, n in summarize(statuses):
        counts = " ".join(f"{k}={v}" for k, v in s.counts.items())
        detail = f"{s.detail} {counts}".strip() + (f" ({n} updates, latest shown)" if n > 1 else "")
        lines.append(
            f"{s.at:%Y-%m-%d %H:%M:%S.%f}"[:23].ljust(24)
            + f" {s.stage:<7} {s.state:<9} {s.service:<9} {detail}"
        )
    return "\n".join(lines)


async def job_publish(args: argparse.Namespace) -> int:
    """``job publish``: build the job, publish it, print its id."""
    job = build_job(job_document(args))
    await publish_job(KafkaSettings(), job)
    print(job.job_id)
    return 0


async def job_cancel(args: argparse.Namespace) -> int:
    """``job cancel``: publish a cancel request for the job and say what was published."""
    request = build_cancel(args.job_id, args.reason)
    kafka = KafkaSettings()
    await publish_cancel(kafka, request)
    reason = f", reason {request.reason!r}" if request.reason else ""
    print(
        f"cancel of job {request.job_id} requested by {request.requested_by or '(unknown)'} "
        f"at {request.requested_at:%Y-%m-%d %H:%M:%S} UTC{reason} (on {kafka.topic(Topic.BROADCAST_CANCELS)})"
    )
    print(f"the outcome is reported by the monitor: espbridge job status {request.job_id}")
    return 0


CANCEL_HELP = """\
Ask for a broadcast to be cancelled: publishes a cancel request for JOB_ID on broadcast.cancels.v1
and returns at once. The monitor acts on it. Before the send was requested nothing is sent; after,
the ESP's own cancel is called where the ESP has one, and `espbridge job status JOB_ID` shows
the outcome: cancelled, too late (the send already went out) or not supported by the ESP. A
cancelled job stays cancelled: a late import or file does not start it again. Exit 0 once the
request is published, 1 if Kafka cannot be reached, 2 for a bad JOB_ID or reason."""


async def job_status(args: argparse.Namespace) -> int:
    """``job status``: the job's stages from broadcast.status.v1 and its response funnel."""
    statuses = await read_statuses(KafkaSettings(), args.job_id)
    numbers = await funnel(PostgresSettings(), args.job_id)
    if args.json:
        out = {
            "job_id": args.job_id,
            "statuses": [s.model_dump(mode="json") for s in statuses],
            "funnel": numbers,
        }
        print(as_json(out))
        return 0 if statuses else 1
    if not statuses:
        print(f"no status for job {args.job_id} on {KafkaSettings().topic(Topic.BROADCAST_STATUS)}")
        return 1
    print(format_statuses(statuses))
    if numbers is not None:
        print("\nresponse funnel: " + "  ".join(f"{k}={v}" for k, v in numbers.items()))
    return 0


def add_parser(groups: Any) -> None:
    """The ``job`` commands and their arguments."""
    job = groups.add_parser("job", help="broadcast jobs").add_subparsers(dest="cmd", required=True)
    pub = job.add_parser("publish", help="publish a broadcast job from a YAML/JSON file and/or flags")
    pub.add_argument("file", nargs="?", help="a YAML or JSON file with the job's fields")
    pub.add_argument("--job-id")
    pub.add_argument("--esp")
    pub.add_argument("--account")
    pub.add_argument("--list-name")
    pub.add_argument("--message", help="the ESP's pre-created message / campaign id")
    pub.add_argument("--table", help="select recipients from this table or view (schema.table)")
    pub.add_argument("--column", action="append", help="a selected column (repeatable)")
    pub.add_argument("--filter", action="append", help="COLUMN=VALUE equality filter (repeatable)")
    pub.add_argument("--field", action="append", help="COLUMN=ESPField mapping (repeatable)")
    pub.add_argument("--communication-key", help="the column responses are matched on")
    pub.add_argument("--upload-only", action="store_true", help="upload and import, do not send")
    pub.add_argument("--send-at", help="ISO 8601 time with zone to send at")
    cancel = job.add_parser(
        "cancel",
        help="cancel a broadcast: nothing is sent, or the ESP's cancel is called",
        description=CANCEL_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cancel.add_argument("job_id", metavar="JOB_ID", help="the job to cancel (as `job publish` printed it)")
    cancel.add_argument(
        "--reason", default="", help="why, for the job's history (one line, at most 500 characters)"
    )
    st = job.add_parser("status", help="a job's stages and response funnel")
    st.add_argument("job_id")
    st.add_argument("--json", action="store_true", help="machine-readable output")
