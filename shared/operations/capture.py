"""Change data capture of the CRM's subscriptions, CRM → ESP.

Debezium's PostgreSQL connector, run by a Kafka Connect worker, reads every committed row change of
``crm.subscriptions`` from a logical replication slot and publishes it on
``crm.subscriptions.captured.v1`` (:class:`~shared.model.messages.CapturedChange`). espbridge owns
the connector's configuration — :func:`capture_config`, posted by :func:`ensure_capture` (``espbridge
crm capture enable``, or the syncer at start-up), removed with its slot by :func:`disable_capture` —
and turns its events into subscription requests (:func:`request_from_capture`).

Capture starts when it is enabled (``snapshot.mode=no_data``): the CRM's rows from before are not
pushed. Rows espbridge wrote itself (``written_by = 'espbridge'``) are never pushed back (no echo).
Debezium delivers at least once — after a crash it repeats the events since its last committed
position — so a request's id is derived from the event's position: a repeat is the same request.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import orjson
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.esp.accounts import EVERY_LIST, Accounts, UnknownAccountError
from shared.infra.db import connect
from shared.infra.db.replication import SlotInfo, capture_problems, drop_publication, drop_slot, slot_info
from shared.infra.kafka import ensure_topics
from shared.infra.settings import KafkaSettings, PostgresSettings
from shared.model.errors import ConfigurationError, EspbridgeError, InvalidMessageError, UnavailableError
from shared.model.messages import (
    EVENT_NAMESPACE,
    CapturedChange,
    RequestOrigin,
    SubscriptionRequest,
    SubscriptionState,
)
from shared.model.topics import Topic
from shared.operations.jobs import validation_problems

CAPTURED_TABLE = "crm.subscriptions"
"""The one table captured."""
CONNECTOR_CLASS = "io.debezium.connector.postgresql.PostgresConnector"
POLL_INTERVAL_MS = 50
"""How often Debezium hands its queue to Connect: a CRM UPDATE was on the captured topic 0.2-0.3 s
after its commit on the local servers (at Debezium's default of 500 ms: 0.7 s, at most 1.2 s)."""
HEARTBEAT_INTERVAL_MS = 10_000
HEARTBEAT_MESSAGE_PREFIX = "espbridge.capture.heartbeat"
"""The prefix of the logical decoding message each heartbeat writes to the CRM's WAL (and Debezium
skips): without it the slot's position only moves when crm.subscriptions changes, and the WAL of
every other write to the database piles up behind it."""
CAPTURE_NAMESPACE = uuid.uuid5(EVENT_NAMESPACE, "capture")
"""The uuid5 namespace of the request ids of captured changes; never change it."""

_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]")
_SLOT_CHARS = re.compile(r"[^a-z0-9_]")
_SECRETS_PATH = re.compile(r"^/[^:${}\x00-\x1f]+$")
MAX_SLOT_NAME = 63
"""PostgreSQL's longest identifier (NAMEDATALEN - 1), for slot and publication names."""


class ConnectSettings(BaseSettings):
    """How espbridge reaches the Kafka Connect worker that runs the capture (``ESPBRIDGE_CONNECT_*``)."""

    model_config = SettingsConfigDict(env_prefix="ESPBRIDGE_CONNECT_", frozen=True, extra="ignore")

    url: str = Field(default="http://127.0.0.1:8083", description="the worker's REST API")
    secrets_file: str | None = Field(
        default=None,
        description="the file holding `password=<the CRM's password>`, as the WORKER sees it: the "
        "connector's configuration names it (${file:…}) and never carries the password",
    )
    database_host: str | None = Field(
        default=None, description="the CRM's host as the worker reaches it (default: the CRM's host)"
    )
    database_port: int | None = Field(default=None, ge=1, le=65535)
    enable_timeout_s: float = Field(default=60.0, gt=0, description="how long enabling waits for RUNNING")

    def require_secrets_file(self) -> str:
        """The secrets file; a clear error when it is not set."""
        if not self.secrets_file:
            raise ConfigurationError(
                "ESPBRIDGE_CONNECT_SECRETS_FILE is not set: the Kafka Connect worker reads the CRM "
                "password from that file (infra/connect/connect-local.sh writes it; "
                "`infra/local.sh env` names it)"
            )
        return self.secrets_file


# --- the connector's configuration --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CaptureNames:
    """The names one capture (one espbridge deployment, one CRM database) uses on the worker, the
    CRM database and Kafka."""

    connector: str
    """The connector, and Debezium's ``topic.prefix`` (its offsets are kept under it)."""
    slot: str
    publication: str
    topic: str
    """Where the events land: the registry's captured topic under the deployment's prefix."""
    heartbeat_topic: str
    """Debezium's heartbeat records (created by the worker; not read by espbridge)."""


def _suffixed(name: str, exact: str, limit: int | None = None) -> str:
    """``name`` as it is when it spells ``exact`` within ``limit``; otherwise cut, with a hash of
    ``exact`` so two deployments never share a name."""
    if name == exact and (limit is None or len(name) <= limit):
        return name
    digest = hashlib.sha256(exact.encode()).hexdigest()[:8]
    keep = name if limit is None else name[: limit - 9]
    return f"{keep}_{digest}"


def capture_names(kafka: KafkaSettings, crm: PostgresSettings) -> CaptureNames:
    """The names of the capture of deployment ``kafka`` (its topic prefix) on CRM database ``crm``."""
    prefix = kafka.topic_prefix.rstrip(".") or "default"
    exact = f"espbridge-crm-{prefix}-{crm.database}"
    connector = _suffixed(_NAME_CHARS.sub("_", exact), exact)
    slot_exact = f"espbridge_{prefix}_{crm.database}"
    slot = _suffixed(_SLOT_CHARS.sub("_", slot_exact.lower()), slot_exact, MAX_SLOT_NAME)
    return CaptureNames(
        connector=connector,
        slot=slot,
        publication=slot,
        topic=kafka.topic(Topic.CRM_CAPTURED),
        heartbeat_topic=f"{kafka.topic_prefix}{HEARTBEAT_MESSAGE_PREFIX}.{connector}",
    )


def capture_config(
    kafka: KafkaSettings,
    crm: PostgresSettings,
    secrets_file: str,
    *,
    database_host: str | None = None,
    database_port: int | None = None,
) -> dict[str, str]:
    """The Debezium connector's configuration for this deployment and CRM database: the CRM's
    password is read by the worker from ``secrets_file`` (key ``password``), never posted."""
    if not _SECRETS_PATH.match(secrets_file):
        raise ConfigurationError(
            f"the secrets file {secrets_file!r} must be an absolute path without ':', '$', '{{' or '}}' "
            "(the worker reads it through ${file:<path>:password})"
        )
    names = capture_names(kafka, crm)
    table_topic = f"{names.connector}.{CAPTURED_TABLE}"
    return {
        "connector.class": CONNECTOR_CLASS,
        "tasks.max": "1",
        "database.hostname": database_host or crm.host,
        "database.port": str(database_port or crm.port),
        "database.dbname": crm.database,
        "database.user": crm.user,
        "database.password": f"${{file:{secrets_file}:password}}",
        "topic.prefix": names.connector,
        "plugin.name": "pgoutput",
        "slot.name": names.slot,
        "publication.name": names.publication,
        "publication.autocreate.mode": "filtered",
        "table.include.list": re.escape(CAPTURED_TABLE),
        # capture starts now: the rows already there are the CRM's state, not changes to push
        "snapshot.mode": "no_data",
        "poll.interval.ms": str(POLL_INTERVAL_MS),
        # one contact's changes share a key, hence a partition: they stay in order
        "message.key.columns": f"{CAPTURED_TABLE}:email",
        "tombstones.on.delete": "false",
        "key.converter": "org.apache.kafka.connect.json.JsonConverter",
        "key.converter.schemas.enable": "false",
        "value.converter": "org.apache.kafka.connect.json.JsonConverter",
        "value.converter.schemas.enable": "false",
        "transforms": "route",
        "transforms.route.type": "org.apache.kafka.connect.transforms.RegexRouter",
        "transforms.route.regex": re.escape(table_topic),
        "transforms.route.replacement": names.topic,
        "heartbeat.interval.ms": str(HEARTBEAT_INTERVAL_MS),
        "heartbeat.action.query": f"SELECT pg_logical_emit_message(false, '{HEARTBEAT_MESSAGE_PREFIX}', '')",
        "message.prefix.exclude.list": re.escape(HEARTBEAT_MESSAGE_PREFIX),
        "topic.heartbeat.prefix": f"{kafka.topic_prefix}{HEARTBEAT_MESSAGE_PREFIX}",
        # the heartbeat topic is the only one the worker creates (espbridge creates the captured one)
        "topic.creation.default.partitions": "1",
        "topic.creation.default.replication.factor": str(kafka.replication_factor),
        "topic.creation.default.retention.ms": str(int(timedelta(hours=1).total_seconds() * 1000)),
    }


# --- the worker's REST API ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TaskState:
    """One task of the connector as the worker reports it."""

    id: int
    state: str
    worker_id: str
    trace: str = ""


@dataclass(frozen=True, slots=True)
class CaptureStatus:
    """The capture as it stands: the connector on the worker and, when asked, the CRM's slot."""

    names: CaptureNames
    connector_state: str | None
    """RUNNING, PAUSED, STOPPED, FAILED, UNASSIGNED, RESTARTING; None: no such connector."""
    tasks: tuple[TaskState, ...] = ()
    connector_trace: str = ""
    slot: SlotInfo | None = None

    @property
    def running(self) -> bool:
        """The connector and every task of it run."""
        return (
            self.connector_state == "RUNNING"
            and bool(self.tasks)
            and all(t.state == "RUNNING" for t in self.tasks)
        )

    @property
    def failure(self) -> str | None:
        """Why the connector or a task failed, in the worker's words (its exception); None if none did."""
        traces = [self.connector_trace] if self.connector_state == "FAILED" else []
        traces += [t.trace for t in self.tasks if t.state == "FAILED"]
        if not traces:
            return None
        return next((reason for t in traces if (reason := worker_reason(t))), "no reason given")


def worker_reason(trace: str) -> str:
    """The gist of a Java stack trace: its first line and its last ``Caused by`` (the root cause)."""
    lines = [line.strip() for line in trace.splitlines() if line.strip()]
    if not lines:
        return ""
    causes = [line.removeprefix("Caused by: ") for line in lines if line.startswith("Caused by: ")]
    if causes and causes[-1] != lines[0]:
        return f"{lines[0]} (caused by {causes[-1]})"
    return lines[0]


class _Worker:
    """Calls to one Kafka Connect worker's REST API; an unreachable worker is an UnavailableError."""

    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self._http = http
        self._url = url.rstrip("/")

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """(status, parsed JSON body or None); 409 (a rebalance in progress) is tried again."""
        for _ in range(20):
            try:
                async with self._http.request(
                    method,
                    f"{self._url}{path}",
                    # the worker answers 415 to a body that is not JSON, even an empty one
                    **({"headers": {"Content-Type": "application/json"}} if body is None else {"json": body}),
                    timeout=aiohttp.ClientTimeout(total=30),
                ) as response:
                    text = await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise UnavailableError(
                    f"the Kafka Connect worker at {self._url} is not reachable ({type(exc).__name__}: "
                    f"{exc}); is it running? (locally: infra/local.sh up connect)"
                ) from None
            if status != 409:
                return status, _json_or_none(text)
            await asyncio.sleep(0.5)
        raise UnavailableError(f"the Kafka Connect worker at {self._url} is rebalancing; try again")

    def fail(self, what: str, status: int, body: Any) -> EspbridgeError:
        """The error of an unexpected answer, with the worker's own message."""
        message = body.get("message") if isinstance(body, dict) else None
        text = f"{what}: the Kafka Connect worker at {self._url} answered {status}: {message or body}"
        return UnavailableError(text) if status >= 500 else ConfigurationError(text)

    async def status(self, names: CaptureNames) -> CaptureStatus:
        """The connector's status; ``connector_state`` None when it does not exist."""
        status, body = await self.call("GET", f"/connectors/{names.connector}/status")
        if status == 404:
            return CaptureStatus(names, None)
        if status != 200 or not isinstance(body, dict):
            raise self.fail(f"reading connector {names.connector}", status, body)
        connector = body.get("connector") or {}
        tasks = tuple(
            TaskState(int(t["id"]), str(t["state"]), str(t.get("worker_id", "")), str(t.get("trace", "")))
            for t in body.get("tasks") or ()
        )
        return CaptureStatus(
            names, str(connector.get("state")), tasks, connector_trace=str(connector.get("trace", ""))
        )


def refused_settings(validation: Any) -> list[str]:
    """``setting: error`` for each error of the worker's answer to a config validation."""
    problems: list[str] = []
    for entry in (validation or {}).get("configs") or ():
        value = (entry or {}).get("value") or {}
        problems += [f"{value.get('name', '?')}: {error}" for error in value.get("errors") or ()]
    return problems


def _json_or_none(text: bytes) -> Any:
    try:
        return orjson.loads(text) if text else None
    except orjson.JSONDecodeError:
        return text.decode("utf-8", "replace")[:500]


async def ensure_capture(
    http: aiohttp.ClientSession,
    connect_url: str,
    kafka: KafkaSettings,
    crm: PostgresSettings,
    secrets_file: str,
    *,
    database_host: str | None = None,
    database_port: int | None = None,
    timeout_s: float = 60.0,
) -> CaptureStatus:
    """Post the capture's connector to the worker (created, or its configuration replaced: running
    it twice is one connector) and wait until it and its task run.

    The CRM database is checked first (the table, ``wal_level``). A
    connector that failed is restarted once; failing again, or a configuration the worker refuses,
    raises :class:`ConfigurationError` with the worker's reason. The captured topic is created
    first (with its configured partitions) if it is missing, so the worker never makes its own.
    """
    names = capture_names(kafka, crm)
    conn = await connect(crm)
    try:
        problems = await capture_problems(conn, CAPTURED_TABLE)
    finally:
        await conn.close()
    if problems:
        raise ConfigurationError(f"the CRM database cannot be captured: {'; '.join(problems)}")
    await ensure_topics(kafka, [Topic.CRM_CAPTURED])
    worker = _Worker(http, connect_url)
    config = capture_config(
        kafka, crm, secrets_file, database_host=database_host, database_port=database_port
    )
    # validated first: a configuration Debezium refuses (the CRM unreachable, a wrong password) is
    # said field by field here, where the PUT itself answers 500 with a NullPointerException
    status, body = await worker.call(
        "PUT", f"/connector-plugins/{CONNECTOR_CLASS}/config/validate", {**config, "name": names.connector}
    )
    if status != 200:
        raise worker.fail("validating the capture connector's configuration", status, body)
    if problems := refused_settings(body):
        raise ConfigurationError(
            f"the Kafka Connect worker refuses the capture connector {names.connector}: "
            + "; ".join(problems)
        )
    status, body = await worker.call("PUT", f"/connectors/{names.connector}/config", config)
    if status not in (200, 201):
        raise worker.fail(f"posting the capture connector {names.connector}", status, body)
    current = await worker.status(names)
    if current.connector_state in ("PAUSED", "STOPPED"):
        status, body = await worker.call("PUT", f"/connectors/{names.connector}/resume")
        if status not in (200, 202, 204):
            raise worker.fail(f"resuming connector {names.connector}", status, body)
    restarted = False
    deadline = time.monotonic() + timeout_s
    while True:
        current = await worker.status(names)
        if current.running:
            return current
        if current.failure is not None:
            if restarted:
                raise ConfigurationError(
                    f"the capture connector {names.connector} failed on the worker: {current.failure}"
                )
            restarted = True
            status, body = await worker.call(
                "POST", f"/connectors/{names.connector}/restart?includeTasks=true&onlyFailed=true"
            )
            if status not in (200, 202, 204):
                raise worker.fail(f"restarting connector {names.connector}", status, body)
        if time.monotonic() >= deadline:
            tasks = ", ".join(f"task {t.id} {t.state}" for t in current.tasks) or "no task yet"
            raise UnavailableError(
                f"the capture connector {names.connector} is not running after {timeout_s:g} s "
                f"(connector {current.connector_state}, {tasks})"
            )
        await asyncio.sleep(0.25)


@dataclass(frozen=True, slots=True)
class DisableOutcome:
    """What :func:`disable_capture` found and removed."""

    names: CaptureNames
    connector_deleted: bool
    slot_dropped: bool
    publication_dropped: bool


async def disable_capture(
    http: aiohttp.ClientSession,
    connect_url: str,
    kafka: KafkaSettings,
    crm: PostgresSettings,
    *,
    timeout_s: float = 60.0,
) -> DisableOutcome:
    """Switch the capture off and leave nothing behind: the connector is stopped, its stored
    position reset (a later enable starts afresh, from then on) and deleted; then its replication
    slot — which would otherwise keep the CRM's WAL forever — and its publication are dropped.

    Nothing is dropped while the worker cannot be asked (the connector would recreate them)."""
    names = capture_names(kafka, crm)
    worker = _Worker(http, connect_url)
    deleted = False
    if (await worker.status(names)).connector_state is not None:
        status, body = await worker.call("PUT", f"/connectors/{names.connector}/stop")
        if status not in (200, 202, 204):
            raise worker.fail(f"stopping connector {names.connector}", status, body)
        deadline = time.monotonic() + timeout_s
        while (await worker.status(names)).connector_state != "STOPPED":
            if time.monotonic() >= deadline:
                raise UnavailableError(f"connector {names.connector} did not stop within {timeout_s:g} s")
            await asyncio.sleep(0.25)
        status, body = await worker.call("DELETE", f"/connectors/{names.connector}/offsets")
        if status not in (200, 202, 204):
            raise worker.fail(f"resetting the position of connector {names.connector}", status, body)
        status, body = await worker.call("DELETE", f"/connectors/{names.connector}")
        if status not in (200, 202, 204, 404):
            raise worker.fail(f"deleting connector {names.connector}", status, body)
        deleted = True
    conn = await connect(crm)
    try:
        slot_dropped = await drop_slot(conn, names.slot, timeout_s=timeout_s)
        publication_dropped = await drop_publication(conn, names.publication)
    finally:
        await conn.close()
    return DisableOutcome(names, deleted, slot_dropped, publication_dropped)


async def capture_status(
    http: aiohttp.ClientSession, connect_url: str, kafka: KafkaSettings, crm: PostgresSettings
) -> CaptureStatus:
    """The connector on the worker and its replication slot in the CRM database."""
    names = capture_names(kafka, crm)
    current = await _Worker(http, connect_url).status(names)
    conn = await connect(crm)
    try:
        slot = await slot_info(conn, names.slot)
    finally:
        await conn.close()
    return CaptureStatus(names, current.connector_state, current.tasks, current.connector_trace, slot)


# --- captured changes → subscription requests ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class CapturedRow:
    """A crm.subscriptions row as Debezium's JSON carries it, decoded."""

    email: str
    esp: str
    account: str
    list: str
    state: str
    reason: str
    written_by: str
    changed_at: datetime
    """When the state last changed (the CRM's trigger keeps it)."""
    updated_at: datetime
    """When the row was last written (the state, or only the fields)."""
    fields: dict[str, str]


def decode_time(value: Any, column: str) -> datetime:
    """A timestamptz column as Debezium emits it: an ISO 8601 string (``io.debezium.time.ZonedTimestamp``,
    what 3.6 sends for timestamptz), or microseconds since the epoch (``MicroTimestamp``)."""
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise InvalidMessageError(f"captured column {column} is not a time: {value[:60]!r}") from None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    if isinstance(value, int) and not isinstance(value, bool):
        return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=value)
    raise InvalidMessageError(f"captured column {column} is not a time: {value!r}")


def decode_fields(value: Any) -> dict[str, str]:
    """The ``fields`` jsonb column (Debezium sends jsonb as a JSON text) as field → text: numbers
    and booleans in their JSON spelling, nulls left out; a nested value is an error."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            raise InvalidMessageError("captured column fields is not JSON") from None
    if not isinstance(value, dict):
        raise InvalidMessageError("captured column fields is not a JSON object")
    fields: dict[str, str] = {}
    for name, item in value.items():
        if item is None:
            continue
        if isinstance(item, (dict, list)):
            raise InvalidMessageError(f"captured field {name!r} is not a single value")
        fields[str(name)] = item if isinstance(item, str) else orjson.dumps(item).decode()
    return fields


def decode_row(data: Mapping[str, Any]) -> CapturedRow:
    """A row image of a captured change; a missing column is an :class:`InvalidMessageError`."""
    try:
        return CapturedRow(
            email=str(data["email"]),
            esp=str(data["esp"]),
            account=str(data["account"]),
            list=str(data["list"]),
            state=str(data["state"]),
            reason=str(data.get("reason") or ""),
            written_by=str(data.get("written_by") or "crm"),
            changed_at=decode_time(data["changed_at"], "changed_at"),
            updated_at=decode_time(data.get("updated_at") or data["changed_at"], "updated_at"),
            fields=decode_fields(data.get("fields")),
        )
    except KeyError as exc:
        raise InvalidMessageError(f"the captured row has no column {exc.args[0]}") from None


def _is_snapshot(change: CapturedChange) -> bool:
    return change.op == "r" or str(change.source.get("snapshot", "false")).lower() not in ("false", "")


def request_from_capture(
    change: CapturedChange, prefix: str, *, list_id: str | None = None
) -> SubscriptionRequest | None:
    """The request a captured change of crm.subscriptions asks for, or None when there is nothing to push.

    None for: rows espbridge wrote (``written_by = 'espbridge'``: no echo), snapshot reads,
    truncates and messages, rows for every ESP (``esp``/``account`` ``*``), a row for every list
    of an account (``list`` ``*``: :func:`requests_from_capture` gives one request a list), and an
    update that changed neither the state nor the fields. A CRM insert or update asks for its
    state and fields at ``changed_at`` (only the fields, at ``updated_at``, when the state is the
    same); a delete for ``removed``, at its commit. ``list_id`` puts the request on that list.
    ``prefix`` (the deployment's topic prefix) and the event's position (``source.lsn``,
    ``txId``) make the id: the same event read twice is the same request.
    """
    if change.op not in ("c", "u", "d") or _is_snapshot(change):
        return None
    image = change.before if change.op == "d" else change.after
    if image is None:
        raise InvalidMessageError(f"a captured {change.op!r} change without its row image")
    row = decode_row(image)
    if change.op != "d" and row.written_by == "espbridge":
        return None
    if EVERY_LIST in (row.esp, row.account):
        return None
    target_list = row.list if list_id is None else list_id
    if target_list == EVERY_LIST:
        return None
    state: SubscriptionState | None
    fields = row.fields
    if change.op == "d":
        state, fields, requested_at = SubscriptionState.REMOVED, {}, _commit_time(change)
    else:
        state, requested_at = SubscriptionState(row.state), row.changed_at
        before = decode_row(change.before) if change.op == "u" and change.before else None
        if before is not None and before.state == row.state:
            if before.fields == row.fields or not row.fields:
                return None
            state, requested_at = None, row.updated_at
    return _request(change, prefix, row, target_list, state, fields, requested_at)


def requests_from_capture(
    change: CapturedChange, prefix: str, accounts: Accounts
) -> list[SubscriptionRequest]:
    """The requests of a captured change, a row for every list of an account (``list`` ``*``)
    made one request for each list the account syncs; see :func:`request_from_capture`.

    Such a row of an account that is not configured, or that syncs no lists, becomes one request
    for its broadcast list, which the push dead-letters with that reason (nothing is dropped unsaid).
    """
    request = request_from_capture(change, prefix)
    if request is not None:
        return [request]
    image = change.before if change.op == "d" else change.after
    if image is None or image.get("list") != EVERY_LIST:
        return []
    try:
        lists: Sequence[str] = accounts.get(
            str(image.get("esp")), str(image.get("account"))
        ).subscriptions.lists
    except UnknownAccountError:
        lists = ()
    found = [request_from_capture(change, prefix, list_id=list_id) for list_id in (lists or ("",))]
    return [r for r in found if r is not None]


def _commit_time(change: CapturedChange) -> datetime:
    ts_ms = change.source.get("ts_ms")
    if isinstance(ts_ms, int) and not isinstance(ts_ms, bool):
        return datetime.fromtimestamp(ts_ms / 1000, UTC)
    raise InvalidMessageError("a captured delete without its commit time (source.ts_ms)")


def _request(
    change: CapturedChange,
    prefix: str,
    row: CapturedRow,
    list_id: str,
    state: SubscriptionState | None,
    fields: dict[str, str],
    requested_at: datetime,
) -> SubscriptionRequest:
    lsn, tx = change.source.get("lsn"), change.source.get("txId")
    if lsn is None:
        raise InvalidMessageError("a captured change without its position (source.lsn)")
    position = "\x1f".join(
        (prefix, str(lsn), str(tx), change.op, row.email, row.esp, row.account, row.list, list_id)
    )
    try:
        return SubscriptionRequest(
            request_id=uuid.uuid5(CAPTURE_NAMESPACE, position),
            email=row.email,
            esp=row.esp,
            account=row.account,
            list=list_id,
            state=state,
            fields=fields,
            reason=" ".join(row.reason.split())[:200],
            origin=RequestOrigin.CAPTURE,
            source="crm",
            requested_at=requested_at,
        )
    except ValidationError as exc:
        key = f"{row.email} {row.esp}/{row.account} list {row.list!r}"
        raise InvalidMessageError(
            f"the captured row {key} cannot be pushed:\n{validation_problems(exc, '(request)')}"
        ) from None
