"""The wire form of response events without models: the same bytes, the same verdicts."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from aiokafka.partitioner import DefaultPartitioner
from pydantic import ValidationError

from services.loader import core
from shared.infra.kafka import murmur2, murmur2_partition, murmur2_python
from shared.model.events import (
    FileEventWriter,
    event_id_text,
    fields_of,
    json_plain,
    read_fast,
    utc_text,
)
from shared.model.messages import EventSource, EventType, ResponseEvent, event_id_for


def model(**changes: Any) -> ResponseEvent:
    values: dict[str, Any] = {
        "event_id": event_id_for("sandbox", esp_event_id="demo:e1"),
        "esp": "sandbox",
        "account": "demo",
        "broadcast_id": "job-1",
        "esp_message_id": "m-1",
        "communication_key": "ck1",
        "email": "a@x.com",
        "type": EventType.CLICK,
        "url": "https://x.com/?a=1,2",
        "occurred_at": datetime(2026, 11, 22, 10, 0, 3, tzinfo=UTC),
        "source": EventSource(kind="file", name="sandbox/demo/responses/r.csv", line=2),
    }
    values.update(changes)
    return ResponseEvent(**values)


@pytest.mark.parametrize(
    "event",
    [
        model(),
        model(esp_message_id=None, communication_key=None, url=None),
        model(email=None, occurred_at=datetime(2026, 11, 22, 10, 0, 3, 120000, tzinfo=UTC)),
        model(broadcast_id="jöb-ü/✓", email='a"b\\c\td\ne@x.com', url="https://x.com/\u2028"),
        model(source=EventSource(kind="api", name="instiller/demo", page=3)),
        model(occurred_at=datetime(2026, 11, 22, 11, 0, 3, tzinfo=UTC) + timedelta(hours=5)),
    ],
)
def test_the_fast_reader_reads_the_models_json_back_to_the_same_values(event: ResponseEvent) -> None:
    fields = read_fast(event.to_json())
    assert fields is not None
    expected = fields_of(event)
    assert datetime.fromisoformat(fields.occurred_at) == datetime.fromisoformat(expected.occurred_at)
    assert fields.__class__(**{**_as_dict(fields), "occurred_at": expected.occurred_at}) == expected


def _as_dict(fields: Any) -> dict[str, Any]:
    return {name: getattr(fields, name) for name in fields.__slots__}


@pytest.mark.parametrize("esp_event_id", ["demo:e1", "demo:ünïcode", "a:" + "x" * 500])
def test_event_ids_are_the_uuid5_of_event_id_for(esp_event_id: str) -> None:
    assert event_id_text("sandbox", esp_event_id) == str(event_id_for("sandbox", esp_event_id=esp_event_id))


MUTATIONS: list[tuple[str, Any]] = [
    ("schema_version", 2),
    ("schema_version", True),
    ("schema_version", "1"),
    ("event_id", "6F1C1D2E-8A0B-5C3E-9F47-2B1D0E6A9C55"),
    ("event_id", "not-a-uuid"),
    ("event_id", 5),
    ("esp", "Sandbox"),
    ("esp", ["sandbox"]),
    ("account", "-demo"),
    ("broadcast_id", ""),
    ("broadcast_id", "b" * 201),
    ("broadcast_id", "b" * 200),
    ("broadcast_id", None),
    ("communication_key", None),
    ("email", 7),
    ("type", "teleport"),
    ("type", "OPEN"),
    ("url", ["x"]),
    ("occurred_at", "2026-11-22T10:00:03+01:00"),
    ("occurred_at", "2026-02-30T10:00:03Z"),
    ("occurred_at", "2026-11-22T24:00:00Z"),
    ("occurred_at", "2026-11-22T10:00:03"),
    ("occurred_at", "2026-11-22 10:00:03Z"),
    ("occurred_at", 1795330000),
    ("occurred_at", "2026-11-22T10:00:03.1234567Z"),
    ("source", {"kind": "file", "name": "x", "line": 0}),
    ("source", {"kind": "file", "name": "x", "line": True}),
    ("source", {"kind": "ftp", "name": "x"}),
    ("source", {"kind": "file"}),
    ("source", {"kind": "file", "name": "x", "line": 1, "page": None, "partition": None, "offset": -1}),
    ("source", {"kind": "file", "name": "x", "line": 1, "page": None, "partition": None, "x": 1}),
    ("source", "file:x"),
    ("extra", {"a": 1}),
    ("extra", {"a": "b"}),
    ("extra", []),
    ("unknown", "field"),
]


@pytest.mark.parametrize(("field", "value"), MUTATIONS)
def test_the_fast_reader_never_accepts_what_the_model_refuses(field: str, value: Any) -> None:
    data = orjson.loads(model(email=None).to_json())
    if field == "unknown":
        data[field] = value
        data.pop("url")  # as many keys as the model has fields, but not the model's fields
    else:
        data[field] = value
    body = orjson.dumps(data)
    try:
        accepted: ResponseEvent | None = ResponseEvent.from_json(body)
    except ValidationError:
        accepted = None
    fields = read_fast(body)
    if accepted is None:
        assert fields is None
    elif fields is not None:
        assert fields.broadcast_id == accepted.broadcast_id
        assert fields.source == fields_of(accepted).source


def test_the_fast_reader_leaves_other_spellings_to_the_model() -> None:
    assert read_fast(b"not json") is None
    assert read_fast(b"[1, 2]") is None
    data = orjson.loads(model().to_json())
    del data["extra"]  # a default the model fills in: valid, but not espbridge's own shape
    assert read_fast(orjson.dumps(data)) is None
    assert ResponseEvent.from_json(orjson.dumps(data)).extra == {}


def test_the_partition_of_a_key_is_kafkas_default_partitioners() -> None:
    rng = random.Random(7)
    partitioner = DefaultPartitioner()
    for length in range(40):
        for _ in range(50):
            key = bytes(rng.getrandbits(8) for _ in range(length))
            for count in (1, 6, 12):
                assert murmur2_partition(key, count) == partitioner(key, list(range(count)), [])
            assert murmur2(key) == murmur2_python(key)  # the C extension and the fallback agree


def test_copy_lines_escape_text_and_refuse_what_postgresql_cannot_store() -> None:
    event = fields_of(model(email="a\tb\\c\nd\re@x.com", url=None))
    line = core.copy_line(event)
    columns = line.rstrip(b"\n").split(b"\t")
    assert len(columns) == len(core.COLUMNS)
    assert columns[core.COLUMNS.index("email")] == b"a\\tb\\\\c\\nd\\re@x.com"
    assert columns[core.COLUMNS.index("url")] == b"\\N"
    with pytest.raises(core.UnstorableEventError):
        core.copy_line(fields_of(model(email="a\x00b@x.com")))
    with pytest.raises(core.UnstorableEventError):
        core.copy_line(fields_of(model(extra={"k": "a\x00b"})))


@pytest.mark.parametrize(
    "event",
    [
        model(type=EventType.OPEN),
        model(type=EventType.OPEN, esp_message_id=None, communication_key=None, url=None),
        model(type=EventType.SENT, email=None, occurred_at=datetime(2026, 11, 22, 10, 0, 3, 5, tzinfo=UTC)),
        model(type=EventType.DELIVERED, broadcast_id="jöb-ü/✓", email="", url=""),
        model(type=EventType.CLICK, source=EventSource(kind="api", name="instiller/demo", page=3)),
        model(type=EventType.CLICK, source=EventSource(kind="webhook", name="webhook:x/y")),
    ],
)
def test_the_loaders_direct_copy_line_is_the_line_of_the_events_values(event: ResponseEvent) -> None:
    fast = core.fast_copy_line(event.to_json())
    assert fast is not None
    assert fast[:2] == (event.broadcast_id.encode(), event.type.value.encode())
    assert datetime.fromisoformat(fast[2].decode()) == event.occurred_at
    expected = core.copy_line(fields_of(event)).split(b"\t")
    got = fast[3].split(b"\t")
    occurred = core.COLUMNS.index("occurred_at")
    assert datetime.fromisoformat(got[occurred].decode()) == event.occurred_at
    assert got[:occurred] + got[occurred + 1 :] == expected[:occurred] + expected[occurred + 1 :]


@pytest.mark.parametrize(("field", "value"), MUTATIONS)
def test_the_loaders_direct_path_never_accepts_what_the_model_refuses(field: str, value: Any) -> None:
    data = orjson.loads(model(email=None, type=EventType.OPEN).to_json())
    if field == "unknown":
        data.pop("url")
    data[field] = value
    body = orjson.dumps(data)
    try:
        ResponseEvent.from_json(body)
    except ValidationError:
        assert core.fast_copy_line(body) is None


@pytest.mark.parametrize(
    "body",
    [
        model(type=EventType.UNSUBSCRIBE).to_json(),  # opt-outs need their values
        model(type=EventType.OPEN, extra={"a": "b"}).to_json(),
        model(type=EventType.OPEN, email='a"b@x.com').to_json(),  # an escape in a string
        model(type=EventType.OPEN).to_json().replace(b"a@x.com", b"a\xff@x.com"),  # not UTF-8
        model(type=EventType.OPEN).to_json().replace(b'"line":2', b'"line":0'),
        model(type=EventType.OPEN).to_json().replace(b"2026-11-22", b"2026-02-30"),
        model(type=EventType.OPEN).to_json().replace(b'"ck1"', b'""').replace(b'"a@x.com"', b"null"),
        model(type=EventType.OPEN).to_json() + b" ",
    ],
)
def test_the_loaders_direct_path_leaves_the_rest_to_the_reader(body: bytes) -> None:
    assert core.fast_copy_line(body) is None


PLAIN_TEXT = "abcXYZ09-_./@:?=&,+ äöü✓€\u2028\x7f"
ANY_TEXT = PLAIN_TEXT + '"\\\t\n\r\x00\x1f'


@pytest.mark.parametrize(
    ("esp", "account", "name"),
    [("sandbox", "demo", "sandbox/demo/responses/r.csv"), ("generic_sftp", "a-1", 'x/"odd"\\ñame✓.csv')],
)
@pytest.mark.parametrize("alphabet", [PLAIN_TEXT, ANY_TEXT], ids=["plain", "escaped"])
def test_a_files_writer_writes_the_models_json_byte_for_byte(
    esp: str, account: str, name: str, alphabet: str
) -> None:
    writer = FileEventWriter(esp, account, name)
    rng = random.Random(11)
    plain = alphabet == PLAIN_TEXT
    for line in range(2, 400):
        texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(5)]
        if plain:
            assert all(json_plain(t) for t in texts)
        broadcast = texts[0] or "b"
        message_id, key, email, url = (t or None for t in texts[1:])
        if not (key or email):
            key = "k"
        kind = rng.choice(list(EventType))
        when = datetime(2026, 11, 22, 9, 0, tzinfo=UTC) + timedelta(microseconds=rng.choice([0, 1, 120000]))
        esp_event_id = f"e{line}"
        event_id = writer.event_id(esp_event_id)
        assert event_id == event_id_text(esp, f"{account}:{esp_event_id}")
        event = ResponseEvent(
            event_id=uuid.UUID(event_id),
            esp=esp,
            account=account,
            broadcast_id=broadcast,
            esp_message_id=message_id,
            communication_key=key,
            email=email,
            type=kind,
            url=url,
            occurred_at=when,
            source=EventSource(kind="file", name=name, line=line),
        )
        row = (event_id, broadcast, message_id, key, email, kind.value, url, utc_text(when), line)
        if plain:  # the fast path writes the same bytes as the escaping one
            assert writer.json(*row) == event.to_json()
        assert writer.json(*row, plain=False) == event.to_json()


def test_only_text_without_quotes_backslashes_or_control_characters_is_json_plain() -> None:
    assert json_plain("a b,ü✓\u2028\x7f")
    for bad in ('a"b', "a\\b", "a\tb", "a\nb", "\x00", "\x1f"):
        assert not json_plain(bad)


def test_a_tally_counts_per_broadcast_and_type_with_first_and_last_times() -> None:
    tally = core.Tally()
    for broadcast, kind, when in [
        (b"b1", b"open", b"2026-11-22T10:00:03Z"),
        (b"b1", b"open", b"2026-11-22T10:00:03.5Z"),
        (b"b1", b"open", b"2026-11-22T10:00:02.999999+00:00"),
        (b"b1", b"open", b"2026-11-22T10:00:03.25Z"),
        (b"b1", b"click", b"2026-11-22T10:00:04+00:00"),
        (b"b2", b"open", b"2026-11-21T23:59:59Z"),
    ]:
        tally.add(broadcast, kind, when)
    at = datetime(2026, 11, 22, 10, 0, 3, tzinfo=UTC)
    assert tally.rows() == [
        ("b1", "click", 1, at + timedelta(seconds=1), at + timedelta(seconds=1)),
        ("b1", "open", 4, at - timedelta(microseconds=1), at + timedelta(microseconds=500000)),
        ("b2", "open", 1, at - timedelta(hours=10, seconds=4), at - timedelta(hours=10, seconds=4)),
    ]
    assert tally.per_broadcast() == {"b1": 5, "b2": 1}


def test_a_tally_of_groups_of_times_equals_the_tally_of_single_events() -> None:
    rng = random.Random(3)
    events = []
    for _ in range(2000):
        kind = rng.choice([b"open", b"click", b"sent"])
        minute, second = rng.randrange(2), rng.randrange(3)  # few seconds: spellings of one time meet
        spellings = [b"2026-11-22T10:%02d:%02dZ" % (minute, second)]
        if kind != b"sent":  # "sent" keeps the usual spelling: its groups take the plain min and max
            spellings += [
                b"2026-11-22T10:%02d:%02d.%dZ" % (minute, second, rng.randrange(1, 999999)),
                b"2026-11-22T10:%02d:%02d+00:00" % (minute, second),
            ]
        events.append((rng.choice([b"b1", b"b2"]), kind, rng.choice(spellings)))
    one_by_one = core.Tally()
    for broadcast, kind, when in events:
        one_by_one.add(broadcast, kind, when)
    grouped = core.Tally()
    for start in range(0, len(events), 300):  # the batches of a loader, each one grouped
        groups: dict[tuple[bytes, bytes], list[bytes]] = {}
        for broadcast, kind, when in events[start : start + 300]:
            groups.setdefault((broadcast, kind), []).append(when)
        for (broadcast, kind), times in groups.items():
            grouped.add_times(broadcast, kind, times)
    assert grouped.rows() == one_by_one.rows()
    assert grouped.per_broadcast() == one_by_one.per_broadcast()
