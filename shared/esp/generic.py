"""The generic ESP connector (``connector: generic``), written from docs/generic-esp.md.

REST under the account's ``api_url`` with a bearer token; list files as UTF-8 CSV with ``Email``
and ``CommunicationKey``; response files in ``responses/`` with one event per row.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path
from typing import Any

from shared.esp.accounts import AccountConfig
from shared.esp.base import (
    BadRow,
    Connector,
    ConnectorContext,
    ImportState,
    ImportStatus,
    ListFormat,
    ResponseSource,
    SendState,
    SendStatus,
)
from shared.esp.delimited import read_records, undecodable
from shared.esp.rest import EspClient, EspUnavailableError
from shared.esp.rows import aware_time, records_events
from shared.model.errors import ConfigurationError, PermanentError
from shared.model.events import EncodedEvent, FileEventWriter, event_key, json_plain, utc_text
from shared.model.messages import MAX_BROADCAST_ID, BroadcastJob, EventType, ResponseEvent

RESPONSE_HEADER = (
    "EventId",
    "BroadcastId",
    "MessageId",
    "CommunicationKey",
    "Email",
    "EventType",
    "Url",
    "OccurredAt",
)


class ListRejectedError(PermanentError):
    """The ESP refused to import or send a list."""


class GenericConnector(Connector):
    """Connector for the generic ESP protocol."""

    list_format = ListFormat()
    response_sources: tuple[ResponseSource, ...] = (ResponseSource("responses"),)

    def __init__(self, account: AccountConfig, context: ConnectorContext) -> None:
        super().__init__(account, context)
        if not account.api_url:
            raise ConfigurationError(f"account {account.name} needs an api_url")
        token = account.token.get_secret_value() if account.token else ""
        self._api = EspClient(
            context.http,
            account.api_url,
            account=account.name,
            timeout_s=account.request_timeout_s,
            headers={"Authorization": f"Bearer {token}"},
        )

    # --- REST ---------------------------------------------------------------------------------

    async def _call(
        self, method: str, path: str, *, json: Any = None, params: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        return await self._api.call(method, path, json=json, params=params)

    async def start_import(self, remote_path: str, job: BroadcastJob) -> ImportStatus:
        """POST /imports (idempotent by the job id as external id)."""
        rel = self.in_account_folder(remote_path)
        status, body = await self._call(
            "POST", "/imports", json={"file": rel, "list_name": job.list_name, "external_id": job.job_id}
        )
        if status == 404:
            raise ListRejectedError(f"the ESP cannot find the list file {rel}: {_message(body)}")
        return _import_status(body)

    async def import_status(self, import_id: str) -> ImportStatus:
        """GET /imports/{id}."""
        status, body = await self._call("GET", f"/imports/{import_id}")
        if status == 404:
            raise ListRejectedError(f"the ESP does not know import {import_id}")
        return _import_status(body)

    async def find_send(self, job: BroadcastJob) -> SendStatus | None:
        """GET /sends?external_id=…; the first send of the broadcast, if any."""
        _, body = await self._call("GET", "/sends", params={"external_id": job.job_id})
        sends = body.get("sends", []) if isinstance(body, dict) else []
        return _send_status(sends[0]) if sends else None

    async def send(self, import_id: str, job: BroadcastJob) -> SendStatus:
        """POST /sends (idempotent by the job id as external id)."""
        payload = {
            "import_id": import_id,
            "message": job.message,
            "external_id": job.job_id,
            "send_at": job.send_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if job.send_at else None,
        }
        status, body = await self._call("POST", "/sends", json=payload)
        if status in (404, 409):
            raise ListRejectedError(f"the ESP refused the send: {_message(body)}")
        return _send_status(body)

    async def send_status(self, send_id: str) -> SendStatus:
        """GET /sends/{id}."""
        status, body = await self._call("GET", f"/sends/{send_id}")
        if status == 404:
            raise EspUnavailableError(f"the ESP does not (yet) know send {send_id}")
        return _send_status(body)

    # --- response files -------------------------------------------------------------------------

    def parse_response_file(self, local_path: Path, remote_path: str) -> Iterator[ResponseEvent | BadRow]:
        """Rows of a response file as events; a row that does not fit becomes a BadRow."""
        for item in self.encode_response_file(local_path, remote_path):
            yield item if isinstance(item, BadRow) else ResponseEvent.from_json(item.body)

    def encode_response_file(self, local_path: Path, remote_path: str) -> Iterator[EncodedEvent | BadRow]:
        """Rows of a response file as event JSON, checked by the model's rules without a model each."""
        writer = FileEventWriter(self.account.esp, self.account.account, posixpath.normpath(remote_path))
        records = read_records(local_path, encoding="utf-8")
        header = next(records, None)
        if header is None:
            return
        if header.fields is None or tuple(header.fields) != RESPONSE_HEADER:
            yield BadRow(1, header.raw, f"unexpected header, want {','.join(RESPONSE_HEADER)}")
            return
        yield from records_events(records, lambda record: _event(writer, record.line, record.fields or []))


def _message(body: Any) -> str:
    return str(body.get("message") or body.get("error")) if isinstance(body, dict) else str(body)


def _import_status(body: Any) -> ImportStatus:
    errors = tuple(f"line {e.get('line')}: {e.get('error')}" for e in body.get("errors") or [])
    return ImportStatus(
        import_id=str(body["import_id"]),
        state=ImportState(body["state"]),
        rows_valid=int(body.get("rows_valid") or 0),
        rows_invalid=int(body.get("rows_invalid") or 0),
        errors=errors,
    )


def _send_status(body: Any) -> SendStatus:
    return SendStatus(
        send_id=str(body["send_id"]),
        state=SendState(body["state"]),
        recipients=int(body.get("recipients") or 0),
    )


_TYPES = frozenset(t.value for t in EventType)

_times: dict[str, str] = {}
"""OccurredAt values seen, as written in the event JSON (response files repeat their times)."""
_MAX_TIMES = 100_000


def _utc_time(value: str) -> str:
    """An OccurredAt value as the event JSON's UTC time; raises ValueError as :func:`aware_time`."""
    text = _times.get(value)
    if text is None:
        text = utc_text(aware_time("OccurredAt", value))
        if len(_times) >= _MAX_TIMES:
            _times.clear()
        _times[value] = text
    return text


def _event(writer: FileEventWriter, line: int, row: list[str]) -> EncodedEvent:
    """One row as event JSON; every rule of ResponseEvent is checked here (a ValueError says which)."""
    if len(row) != len(RESPONSE_HEADER):
        raise ValueError(f"{len(row)} fields, want {len(RESPONSE_HEADER)}")
    joined = "".join(row)
    if not joined.isascii():
        bad_bytes = undecodable(row, "UTF-8")
        if bad_bytes:
            raise ValueError(bad_bytes)
    event_id, broadcast_id, message_id, key, email, kind, url, occurred = row
    if kind not in _TYPES:
        raise ValueError(f"unknown EventType {kind!r}")
    if not event_id:
        raise ValueError("empty EventId")
    if not 1 <= len(broadcast_id) <= MAX_BROADCAST_ID:
        raise ValueError(f"BroadcastId must have 1 to {MAX_BROADCAST_ID} characters")
    if not (key or email):
        raise ValueError("a response event needs a CommunicationKey or an Email")
    when = _utc_time(occurred)
    if json_plain(joined):
        body = writer.json(
            writer.event_id(event_id),
            broadcast_id,
            message_id or None,
            key or None,
            email or None,
            kind,
            url or None,
            when,
            line,
        )
    else:  # values with quotes, backslashes or control characters: escaped by orjson
        body = writer.escaped_json(
            writer.event_id(event_id),
            broadcast_id,
            message_id or None,
            key or None,
            email or None,
            kind,
            url or None,
            aware_time("OccurredAt", occurred),
            line,
        )
    return EncodedEvent(body, event_key(broadcast_id, key, email).encode(), broadcast_id, line)
