"""The uploader's rules (no I/O): the list file's columns and rows, and what statuses say."""

from __future__ import annotations

import codecs
import csv
import io
import re
from collections.abc import Iterable, Mapping
from datetime import date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import orjson

from shared.model.errors import PermanentError
from shared.model.messages import BroadcastJob, BroadcastStatus, ListUploaded, SendMode, Stage, State

if TYPE_CHECKING:
    from shared.esp import ListFormat

_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
TRUTHY = frozenset({"true", "t", "1", "yes", "y"})


class EmptySelectionError(PermanentError):
    """A job's selection has no recipients left to upload."""


class FieldMapError(PermanentError):
    """A job's field map does not give the ESP the fields it needs."""


class ModeError(PermanentError):
    """A job asks for a send from an ESP account that cannot send."""


def check_mode(job: BroadcastJob, can_send: bool, connector: str) -> None:
    """File-only ESPs take ``upload_only`` jobs alone; say so before anything is uploaded."""
    if job.mode is SendMode.UPLOAD_AND_SEND and not can_send:
        raise ModeError(
            f"{job.esp}/{job.account} uses the {connector} connector, which cannot send: "
            "publish the job with mode upload_only"
        )


def list_columns(job: BroadcastJob, email_field: str, key_field: str) -> list[str]:
    """The list file's header: the mapped fields, plus the ESP's key field if not mapped."""
    fields = list(job.field_map.values())
    if email_field not in fields:
        raise FieldMapError(f"field_map maps no column to the ESP's {email_field!r} field")
    if key_field not in fields:
        fields.append(key_field)
    return fields


def source_columns(job: BroadcastJob, key_field: str) -> list[str]:
    """The source column behind each list column, in the same order as :func:`list_columns`."""
    sources = list(job.field_map)
    if key_field not in job.field_map.values():
        sources.append(job.communication_key)
    return sources


def text(value: Any) -> str:
    """A source value as list-file text."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return format(value, "f")  # digits, as PostgreSQL writes numeric (never 1E+20)
    return str(value)


def is_suppressed(row: Mapping[str, Any], column: str) -> bool:
    """Whether a CSV or inline row is opted out by its suppression column."""
    value = row.get(column)
    if isinstance(value, bool):
        return value
    return value is not None and str(value).strip().lower() in TRUTHY


def copy_can_write(fmt: ListFormat) -> bool:
    """Whether PostgreSQL's CSV COPY writes this list format exactly as :func:`encode_rows` does:
    UTF-8, lines ending in a bare LF, a one-character delimiter that is not a quote or line break."""
    return (
        codecs.lookup(fmt.encoding).name == "utf-8"
        and fmt.line_terminator == "\n"
        and len(fmt.delimiter) == 1
        and fmt.delimiter not in '"\r\n'
    )


def encode_rows(rows: Iterable[Iterable[Any]], delimiter: str, terminator: str, encoding: str) -> bytes:
    """Rows as CSV bytes (RFC 4180 quoting)."""
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=delimiter, lineterminator=terminator, quoting=csv.QUOTE_MINIMAL)
    writer.writerows([text(v) for v in row] for row in rows)
    return buf.getvalue().encode(encoding)


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
