"""Dead letters of each kind of source, as their constructors build them: the fields, error
classes and context keys that ``espbridge dlq`` lists, filters and replays by."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from shared.model import deadletters as dlq
from shared.model.errors import InvalidMessageError
from shared.model.messages import DeadLetter


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    value: bytes | None


def fields(letter: DeadLetter) -> dict[str, Any]:
    return letter.model_dump(exclude={"at"}, exclude_none=True)


def test_a_consumed_record_keeps_its_bytes_and_its_place_on_the_topic() -> None:
    error = InvalidMessageError("not a valid ResponseEvent: x" + "x" * 20_000)
    letter = dlq.record_letter(Record("p.responses.events.v1", 3, 17, b"{bad"), error, "loader")
    assert fields(letter) == {
        "schema_version": 1,
        "source": {"kind": "topic", "name": "p.responses.events.v1", "partition": 3, "offset": 17},
        "payload": b"{bad",
        "error_class": "InvalidMessageError",
        "message": str(error),
        "service": "loader",
        "context": {},
    }
    assert dlq.origin_topic(letter, "p.") is not None


def test_a_record_letter_cuts_the_error_where_asked_and_keeps_an_empty_value_as_no_bytes() -> None:
    letter = dlq.record_letter(
        Record("t", 0, 0, None), ValueError("e" * 20_000), "uploader", max_message=10_000
    )
    assert letter.message == "e" * 10_000
    assert letter.payload == b""
    assert letter.error_class == "ValueError"


@pytest.mark.parametrize(
    ("header", "context"),
    [
        ("Email,Type\n", {"esp": "e", "account": "a", "header": "Email,Type\n"}),
        (None, {"esp": "e", "account": "a"}),
    ],
)
def test_a_file_row_says_which_account_read_it_and_keeps_the_header_a_replay_needs(
    header: str | None, context: dict[str, str]
) -> None:
    letter = dlq.file_row_letter(
        "e", "a", "e/a/responses/r.csv", 4, b"x@y,nope", "bad type", "gatherer", header=header
    )
    assert fields(letter) == {
        "schema_version": 1,
        "source": {"kind": "file", "name": "e/a/responses/r.csv", "line": 4},
        "payload": b"x@y,nope",
        "error_class": "BadResponseRow",
        "message": "bad type",
        "service": "gatherer",
        "context": context,
    }
    replayable = dlq.not_replayable(letter, "") is None
    assert replayable is (header is not None)


def test_a_file_name_that_is_not_utf8_keeps_the_names_bytes() -> None:
    letter = dlq.file_name_letter("e/a/responses/x\\xff.csv", b"x\xff.csv", "gatherer")
    assert fields(letter) == {
        "schema_version": 1,
        "source": {"kind": "file", "name": "e/a/responses/x\\xff.csv"},
        "payload": b"x\xff.csv",
        "error_class": "UnreadableFileName",
        "message": "the response file's name is not UTF-8, so espbridge cannot record or gather it; "
        "it is left in place: rename it on the ESP's site and it is gathered at the next scan",
        "service": "gatherer",
        "context": {},
    }


def test_a_webhook_call_keeps_its_body_and_an_item_its_line() -> None:
    call = dlq.webhook_letter("e", "a", b"{not json", "PermanentError", "unreadable", "gatherer")
    assert fields(call) == {
        "schema_version": 1,
        "source": {"kind": "webhook", "name": "webhook:e/a"},
        "payload": b"{not json",
        "error_class": "PermanentError",
        "message": "unreadable",
        "service": "gatherer",
        "context": {},
    }
    item = dlq.webhook_letter("e", "a", b'{"x":1}', "BadWebhookItem", "no email", "gatherer", line=2)
    assert item.source.line == 2
    assert item.payload == b'{"x":1}'
    assert item.error_class == "BadWebhookItem"


def test_an_unauthenticated_webhook_call_keeps_only_its_bodys_size_and_is_never_replayed() -> None:
    body = b'{"token": "s3cret"}'
    letter = dlq.webhook_letter(
        "e", "a", body, "WebhookAuthError", "signature mismatch", "gatherer", authenticated=False
    )
    assert letter.payload == b""
    assert letter.context == {"body_bytes": str(len(body))}
    assert b"s3cret" not in letter.to_json()
    assert "authentication" in (dlq.not_replayable(letter, "") or "")


def test_an_api_item_names_its_account_broadcast_and_page() -> None:
    letter = dlq.api_item_letter("e", "a", "job-1", 2, b'{"id":1}', "no type", "cli")
    assert fields(letter) == {
        "schema_version": 1,
        "source": {"kind": "api", "name": "e/a", "page": 2},
        "payload": b'{"id":1}',
        "error_class": "BadResponseItem",
        "message": "no type",
        "service": "cli",
        "context": {"esp": "e", "account": "a", "broadcast": "job-1"},
    }
    assert dlq.broadcast_of(letter) == "job-1"
