"""The ``espbridge dlq`` commands' work: read the dead-letter topic, keep the replay ledger, replay.

The replay ledger (control.dead_letter_replays) makes a replay happen once: a dead letter that was
replayed is skipped unless forced, and even a forced replay changes nothing downstream — events
have deterministic ids (the loader ignores a second copy), a job's list is rewritten under the
same name and the monitor never sends a broadcast twice. A row still bad under the connector's
configuration of the day is recorded as failing, not dead-lettered again.
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from shared import dlq
from shared.db import Conn, connect
from shared.dlq import Filters, Letter, Replay
from shared.errors import ConfigurationError, PermanentError, UnavailableError
from shared.esp import Accounts, AccountsSettings, BadRow, ConnectorContext, Connectors
from shared.kafka import decode
from shared.messages import DeadLetter, Message, ResponseEvent
from shared.settings import KafkaSettings, PostgresSettings
from shared.topics import REGISTRY, Topic, spec_for_model

READ_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class Listed:
    """A dead letter as ``dlq list`` shows it."""

    letter: Letter
    state: str
    state_text: str
    replay: Replay | None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What ``dlq replay`` did with one dead letter."""

    id: str
    action: str
    """replayed, would replay, skipped, still failing, refused, not found."""
    detail: str

    @property
    def ok(self) -> bool:
        """Whether the dead letter is replayed (or would be, or was before)."""
        return self.action in ("replayed", "would replay", "skipped")


async def _start(consumer: AIOKafkaConsumer, kafka: KafkaSettings) -> None:
    try:
        await consumer.start()
    except KafkaError as exc:
        await consumer.stop()
        raise UnavailableError(f"Kafka at {kafka.bootstrap_servers} is unreachable: {exc}") from exc


async def read_letters(kafka: KafkaSettings) -> tuple[list[Letter], int]:
    """Every dead letter on the topic up to now, oldest first; and how many records were unreadable."""
    name = kafka.topic(Topic.DEADLETTER)
    probe = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, group_id=None)
    await _start(probe, kafka)
    try:
        # A consumer of a topic that does not exist waits for it; nothing was ever dead-lettered.
        if name not in await probe.topics():
            return [], 0
    finally:
        await probe.stop()
    consumer = AIOKafkaConsumer(
        name,
        bootstrap_servers=kafka.bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await _start(consumer, kafka)
    letters: list[Letter] = []
    unreadable = 0
    try:
        parts = list(consumer.assignment())  # without a group, every partition of the topic
        ends = await consumer.end_offsets(parts)
        pending = {tp for tp in parts if ends[tp] > 0}
        deadline = time.monotonic() + READ_TIMEOUT_S
        while pending:
            if time.monotonic() > deadline:
                raise UnavailableError(
                    f"reading {kafka.topic(Topic.DEADLETTER)} took over {READ_TIMEOUT_S:.0f}s"
                )
            batch = await consumer.getmany(timeout_ms=500)
            for tp, records in batch.items():
                for record in records:
                    if record.offset >= ends[tp]:
                        continue
                    value = bytes(record.value or b"")
                    try:
                        letter = DeadLetter.from_json(value)
                    except ValidationError:
                        unreadable += 1
                    else:
                        fingerprint = hashlib.sha256(value).hexdigest()
                        letters.append(Letter(record.partition, record.offset, letter, fingerprint))
                    if record.offset + 1 >= ends[tp]:
                        pending.discard(tp)
    finally:
        await consumer.stop()
    letters.sort(key=lambda item: (item.letter.at, item.partition, item.offset))
    return letters, unreadable


async def load_ledger(conn: Conn, topic: str, letters: Sequence[Letter]) -> dict[str, Replay]:
    """The ledger's entries for these dead letters (an entry of another letter at a reused offset
    does not count)."""
    if not letters:
        return {}
    try:
        rows = await conn.fetch(
            """
            SELECT dl_partition, dl_offset, fingerprint, state, detail, events, replayed_to, attempts,
                   last_at, replayed_at
            FROM control.dead_letter_replays WHERE topic = $1
            """,
            topic,
        )
    except asyncpg.UndefinedTableError:
        raise ConfigurationError(
            "the database has no replay ledger (control.dead_letter_replays): run `espbridge db migrate`"
        ) from None
    prints = {item.id: item.fingerprint for item in letters}
    out: dict[str, Replay] = {}
    for r in rows:
        key = f"{r['dl_partition']}:{r['dl_offset']}"
        if prints.get(key) == r["fingerprint"]:
            out[key] = Replay(
                state=r["state"],
                detail=r["detail"],
                events=r["events"],
                replayed_to=r["replayed_to"],
                attempts=r["attempts"],
                last_at=r["last_at"],
                replayed_at=r["replayed_at"],
            )
    return out


def _replays_of(ledger: dict[str, Replay]) -> dict[str, str]:
    """Where each replayed message went → the id of the dead letter it replayed."""
    return {r.replayed_to: key for key, r in ledger.items() if r.replayed_to}


def _listed(letters: Sequence[Letter], ledger: dict[str, Replay], prefix: str) -> list[Listed]:
    origins = _replays_of(ledger)
    out = []
    for item in letters:
        replay = ledger.get(item.id)
        src = item.letter.source
        replay_of = origins.get(f"{src.name}:{src.partition}:{src.offset}") if src.kind == "topic" else None
        out.append(
            Listed(
                item,
                dlq.state_of(item, replay, prefix),
                dlq.state_text(item, replay, prefix, replay_of),
                replay,
            )
        )
    return out


async def list_letters(
    kafka: KafkaSettings, pg: PostgresSettings, filters: Filters, limit: int | None
) -> tuple[list[Listed], int, int]:
    """The dead letters that pass the filters (oldest first, at most ``limit``); also how many
    there are in all and how many records could not be read."""
    letters, unreadable = await read_letters(kafka)
    conn = await connect(pg)
    try:
        ledger = await load_ledger(conn, kafka.topic(Topic.DEADLETTER), letters)
    finally:
        await conn.close()
    chosen = [
        x for x in _listed(letters, ledger, kafka.topic_prefix) if dlq.matches(x.letter, filters, x.state)
    ]
    return (chosen[:limit] if limit is not None else chosen), len(letters), unreadable


class Replayer:
    """Replays dead letters one by one, recording each outcome in the ledger."""

    def __init__(
        self,
        kafka: KafkaSettings,
        conn: Conn,
        producer: AIOKafkaProducer,
        connectors: Connectors,
        *,
        dry_run: bool,
    ) -> None:
        self.kafka = kafka
        self.conn = conn
        self.producer = producer
        self.connectors = connectors
        self.dry_run = dry_run
        self.topic = kafka.topic(Topic.DEADLETTER)

    async def replay(self, item: Letter) -> Outcome:
        """Replay one dead letter that can be replayed."""
        if item.letter.source.kind == "topic":
            return await self._replay_message(item)
        return await self._replay_rows(item)

    def _headers(self, item: Letter, message: Message) -> list[tuple[str, bytes]]:
        return [
            ("content-type", b"application/json"),
            ("schema-version", str(message.schema_version).encode()),
            ("espbridge-replay-of", f"{self.topic}:{item.id}".encode()),
        ]

    async def _replay_message(self, item: Letter) -> Outcome:
        topic = dlq.origin_topic(item.letter, self.kafka.topic_prefix)
        assert topic is not None  # checked by dlq.not_replayable
        spec = REGISTRY[topic]
        try:
            message = decode(spec.model, item.letter.payload)
        except PermanentError as exc:
            return await self._failing(item, str(exc))
        name = self.kafka.topic(topic)
        if self.dry_run:
            return Outcome(item.id, "would replay", f"to {name}")
        meta = await self.producer.send_and_wait(
            name, item.letter.payload, key=spec.key(message).encode(), headers=self._headers(item, message)
        )
        to = f"{name}:{meta.partition}:{meta.offset}"
        await self._record(item, "replayed", f"republished to {name}", 0, to)
        return Outcome(item.id, "replayed", f"to {name} [{meta.partition}]@{meta.offset}")

    async def _replay_rows(self, item: Letter) -> Outcome:
        letter = item.letter
        try:
            connector = self.connectors.get(letter.context["esp"], letter.context["account"])
            with tempfile.TemporaryDirectory(prefix="espbridge-dlq-") as folder:
                path = Path(folder) / "replay"
                path.write_bytes(dlq.replay_file(letter))
                items = list(connector.parse_response_file(path, letter.source.name))
        except PermanentError as exc:
            return await self._failing(item, f"{type(exc).__name__}: {exc}")
        events = [dlq.at_original_line(i, letter) for i in items if isinstance(i, ResponseEvent)]
        bad = [f"line {dlq.original_line(letter, i.line)}: {i.error}" for i in items if isinstance(i, BadRow)]
        if not self.dry_run and events:
            spec = spec_for_model(ResponseEvent)
            name = self.kafka.topic(spec.topic)
            pending = [
                await self.producer.send(
                    name, e.to_json(), key=spec.key(e).encode(), headers=self._headers(item, e)
                )
                for e in events
            ]
            await asyncio.gather(*pending)
        if bad:
            loaded = f"{dlq.plural(len(events), 'event')} published; " if events and not self.dry_run else ""
            return await self._failing(item, loaded + "; ".join(bad), len(events))
        loaded = dlq.plural(len(events), "event")
        if self.dry_run:
            return Outcome(item.id, "would replay", loaded)
        await self._record(item, "replayed", loaded, len(events), None)
        return Outcome(item.id, "replayed", loaded)

    async def _failing(self, item: Letter, detail: str, events: int = 0) -> Outcome:
        if self.dry_run:
            return Outcome(item.id, "would still fail", detail)
        await self._record(item, "failing", detail, events, None)
        return Outcome(item.id, "still failing", detail)

    async def _record(self, item: Letter, state: str, detail: str, events: int, to: str | None) -> None:
        await self.conn.execute(
            """
            INSERT INTO control.dead_letter_replays AS r
                (topic, dl_partition, dl_offset, fingerprint, state, detail, events, replayed_to, replayed_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, CASE WHEN $5::text = 'replayed' THEN now() END)
            ON CONFLICT (topic, dl_partition, dl_offset) DO UPDATE SET
                state = excluded.state, detail = excluded.detail, events = excluded.events,
                replayed_to = excluded.replayed_to,
                attempts = CASE WHEN r.fingerprint = excluded.fingerprint THEN r.attempts + 1 ELSE 1 END,
                first_at = CASE WHEN r.fingerprint = excluded.fingerprint THEN r.first_at ELSE now() END,
                replayed_at = coalesce(
                    excluded.replayed_at,
                    CASE WHEN r.fingerprint = excluded.fingerprint THEN r.replayed_at END
                ),
                fingerprint = excluded.fingerprint, last_at = now()
            """,
            self.topic,
            item.partition,
            item.offset,
            item.fingerprint,
            state,
            detail[:10_000],
            events,
            to,
        )


async def replay(
    kafka: KafkaSettings,
    pg: PostgresSettings,
    accounts: AccountsSettings,
    filters: Filters,
    limit: int | None,
    *,
    force: bool,
    dry_run: bool,
) -> list[Outcome]:
    """Replay the dead letters that pass the filters (see the module's docstring)."""
    letters, _ = await read_letters(kafka)
    topic = kafka.topic(Topic.DEADLETTER)
    if not letters:
        return [Outcome(i, "not found", f"no dead letter {i} on {topic}") for i in filters.ids]
    prefix = kafka.topic_prefix
    conn = await connect(pg)
    try:
        # One replay at a time per deployment, so two operators never replay one letter twice.
        if not dry_run and not await conn.fetchval(
            "SELECT pg_try_advisory_lock(hashtextextended($1, 0))", f"espbridge-dlq-replay:{topic}"
        ):
            raise UnavailableError("another `espbridge dlq replay` is running for this deployment")
        ledger = await load_ledger(conn, topic, letters)
        chosen = [x for x in _listed(letters, ledger, prefix) if dlq.matches(x.letter, filters, x.state)]
        if limit is not None:
            chosen = chosen[:limit]
        outcomes = [Outcome(i, "not found", f"no dead letter {i} on {topic}") for i in filters.ids]
        found = {x.letter.id for x in chosen}
        outcomes = [o for o in outcomes if o.id not in found]
        needs_accounts = any(x.letter.letter.source.kind == "file" for x in chosen)
        configured = Accounts.load(accounts) if needs_accounts else Accounts()
        producer = AIOKafkaProducer(
            bootstrap_servers=kafka.bootstrap_servers,
            client_id=f"{kafka.client_id}-dlq",
            acks="all",
            enable_idempotence=True,
        )
        try:
            await producer.start()
        except KafkaError as exc:
            raise UnavailableError(f"Kafka at {kafka.bootstrap_servers} is unreachable: {exc}") from exc
        try:
            async with aiohttp.ClientSession() as http:
                replayer = Replayer(
                    kafka, conn, producer, Connectors(configured, ConnectorContext(http)), dry_run=dry_run
                )
                for x in chosen:
                    why = dlq.not_replayable(x.letter.letter, prefix)
                    if why is not None:
                        outcomes.append(Outcome(x.letter.id, "refused", why))
                    elif x.replay is not None and x.replay.state == "replayed" and not force:
                        outcomes.append(
                            Outcome(x.letter.id, "skipped", f"{x.state_text}; --force replays it again")
                        )
                    else:
                        outcomes.append(await replayer.replay(x.letter))
        finally:
            await producer.stop()
        return outcomes
    finally:
        await conn.close()  # also releases the advisory lock
