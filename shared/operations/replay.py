"""Dead letters replayed: read the dead-letter topic, keep the replay ledger, replay (``espbridge dlq``).

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from shared.esp import Accounts, AccountsSettings, BadRow, ConnectorContext, Connectors, attribution
from shared.infra.db import Conn, connect, replays
from shared.infra.kafka import read_topic
from shared.infra.settings import KafkaSettings, PostgresSettings
from shared.model import deadletters as dlq
from shared.model.deadletters import Filters, Letter, Replay
from shared.model.errors import PermanentError, UnavailableError
from shared.model.messages import DeadLetter, Message, ResponseEvent, decode
from shared.model.topics import REGISTRY, Topic, spec_for_model


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


async def read_letters(kafka: KafkaSettings) -> tuple[list[Letter], int]:
    """Every dead letter on the topic up to now, oldest first; and how many records were unreadable."""
    letters: list[Letter] = []
    unreadable = 0
    for record in await read_topic(kafka, Topic.DEADLETTER):
        try:
            letter = DeadLetter.from_json(record.value)
        except ValidationError:
            unreadable += 1
        else:
            fingerprint = hashlib.sha256(record.value).hexdigest()
            letters.append(Letter(record.partition, record.offset, letter, fingerprint))
    letters.sort(key=lambda item: (item.letter.at, item.partition, item.offset))
    return letters, unreadable


async def load_ledger(conn: Conn, topic: str, letters: Sequence[Letter]) -> dict[str, Replay]:
    """The ledger's entries for these dead letters (an entry of another letter at a reused offset
    does not count)."""
    if not letters:
        return {}
    prints = {item.id: item.fingerprint for item in letters}
    out: dict[str, Replay] = {}
    for entry in await replays.entries(conn, topic):
        key = f"{entry.partition}:{entry.offset}"
        if prints.get(key) == entry.fingerprint:
            out[key] = entry.replay
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
                items = list(await attribution.parsed_file(connector, path, letter.source.name, self.conn))
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
        await replays.record(
            self.conn,
            self.topic,
            item.partition,
            item.offset,
            item.fingerprint,
            state=state,
            detail=detail,
            events=events,
            replayed_to=to,
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
        if not dry_run and not await replays.try_lock(conn, topic):
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
