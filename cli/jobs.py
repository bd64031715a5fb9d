"""``espbridge job``: check a broadcast job and publish it, cancel it; its run history (``list``,
``status``) is in :mod:`cli.history`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cli import history
from cli.checks import check_json, check_report, refusal
from cli.output import as_json
from cli.schema import VALIDATE_HELP
from shared.esp import AccountsSettings
from shared.infra.documents import DocumentError, read_document
from shared.infra.settings import KafkaSettings, PostgresSettings
from shared.model.errors import ConfigurationError, InvalidMessageError
from shared.model.messages import BroadcastJob
from shared.model.topics import Topic
from shared.operations.checking import JobCheck, Verdict, check_job, size_finding
from shared.operations.jobs import build_cancel, build_job, publish_cancel, publish_job
from shared.operations.selection import SelectionSettings


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


async def run_check(job: BroadcastJob) -> JobCheck:
    """The job's check against the servers and accounts this command is configured for."""
    return await check_job(
        job,
        kafka=KafkaSettings(),
        pg=PostgresSettings(),
        accounts=AccountsSettings(),
        reading=SelectionSettings(),
    )


async def job_check(args: argparse.Namespace) -> int:
    """``job check`` (and ``job publish --dry-run``): every check, nothing published; exit 2 if the
    job would fail."""
    check = await run_check(build_job(job_document(args)))
    print(as_json(check_json(check)) if args.json else check_report(check))
    return 0 if check.ok else 2


async def job_publish(args: argparse.Namespace) -> int:
    """``job publish``: build the job, check it (unless ``--no-check``), publish it, print its id.
    A job that fails its check, or is too large for the topic, is refused with the reason (exit 2)."""
    if args.dry_run:
        return await job_check(args)
    job = build_job(job_document(args))
    kafka = KafkaSettings()
    if args.no_check:
        size = await size_finding(kafka, job)  # a job too large for the topic is refused, checked or not
        if size.verdict is Verdict.FAILED:
            raise InvalidMessageError(f"not published: {size.detail}")
    else:
        check = await run_check(job)
        if not check.ok:
            raise InvalidMessageError(refusal(check))
    await publish_job(kafka, job)
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


def add_parser(groups: Any) -> None:
    """The ``job`` commands and their arguments."""
    job = groups.add_parser("job", help="broadcast jobs").add_subparsers(dest="cmd", required=True)
    pub = job.add_parser(
        "publish",
        help="check a broadcast job (from a YAML/JSON file and/or flags) and publish it",
        description=PUBLISH_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    chk = job.add_parser(
        "check",
        help="check a broadcast job against the live system; publish nothing",
        description=CHECK_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for p in (pub, chk):
        _job_arguments(p)
    chk.add_argument("--json", action="store_true", help="machine-readable output")
    pub.add_argument(
        "--dry-run", action="store_true", help="check the job as `job check` does; publish nothing"
    )
    pub.add_argument("--no-check", action="store_true", help="publish without checking the job first")
    pub.set_defaults(json=False)
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
    validate = job.add_parser(
        "validate",
        help="check a job file against BroadcastJob's schema, offline (no server)",
        description=VALIDATE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    validate.add_argument("file", help="a YAML or JSON file: one job, or a list of jobs")
    history.add_arguments(
        job.add_parser("list", help="the run history: jobs with their stage and state, newest first"),
        job.add_parser("status", help="a job's stages and response funnel; --follow: live until it ends"),
    )


def _job_arguments(p: argparse.ArgumentParser) -> None:
    """The job's fields as a file and/or flags (``job publish``, ``job check``)."""
    p.add_argument("file", nargs="?", help="a YAML or JSON file with the job's fields")
    p.add_argument("--job-id")
    p.add_argument("--esp")
    p.add_argument("--account")
    p.add_argument("--list-name")
    p.add_argument("--message", help="the ESP's pre-created message / campaign id")
    p.add_argument("--table", help="select recipients from this table or view (schema.table)")
    p.add_argument("--column", action="append", help="a selected column (repeatable)")
    p.add_argument("--filter", action="append", help="COLUMN=VALUE equality filter (repeatable)")
    p.add_argument("--field", action="append", help="COLUMN=ESPField mapping (repeatable)")
    p.add_argument("--communication-key", help="the column responses are matched on")
    p.add_argument("--upload-only", action="store_true", help="upload and import, do not send")
    p.add_argument("--send-at", help="ISO 8601 time with zone to send at")


CHECK_HELP = """\
Check a broadcast job against the live system before its run, changing nothing: the ESP account
exists and its connector takes the job's mode, the field map gives the ESP its email field, the
table and every column the job names exist, how many recipients the list would hold and how many
are left out as opted out, the first rows of the list file exactly as the uploader would write
them, the send time (ahead, for a send), that the job id is new, and that the job fits on its
topic. Nothing is uploaded, published or sent. Reads ESPBRIDGE_PG_*, ESPBRIDGE_KAFKA_*,
ESPBRIDGE_ACCOUNTS_FILE and the uploader's ESPBRIDGE_UPLOADER_SUPPRESSION_COLUMN and _CSV_DIR.
Exit 0 if the job can run, 2 if it would fail (each reason is shown), 1 if a server is down."""

PUBLISH_HELP = """\
Check a broadcast job (as `job check` does) and publish it to broadcast.jobs.v1; prints its job
id. A job that fails the check is not published: the reasons are shown and the exit code is 2.
--no-check publishes without the check (a job too large for the topic is still refused);
--dry-run checks and publishes nothing. Exit 1 if a server is down."""
