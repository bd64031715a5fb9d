"""Dead letters of each kind of source, as their constructors build them: the fields, error
classes and context keys that ``espbridge dlq`` lists, filters and replays by."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from shared.model import deadletters as dlq
from shared.model.errors import InvalidMessageError
from shared.model.messages import DeadLetter, EventSource


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    value: bytes | None


def what(letter: DeadLetter) -> tuple[Any, ...]:
    """A letter's bytes, error class, message, service and context: all but its source and time."""
    return (letter.payload, letter.error_class, letter.message, letter.service, letter.context)


def test_a_consumed_record_keeps_its_bytes_and_its_place_on_the_topic() -> None:
    error = InvalidMessageError("not a valid ResponseEvent: x" + "x" * 20_000)
    letter = dlq.record_letter(Record("p.responses.events.v1", 3, 17, b"{bad"), error, "loader")
    assert letter.source == EventSource(kind="topic", name="p.responses.events.v1", partition=3, offset=17)
    assert what(letter) == (b"{bad", "InvalidMessageError", str(error), "loader", {})
    assert dlq.origin_topic(letter, "p.") is not None


def test_a_record_letter_cuts_the_error_where_asked_and_keeps_an_empty_value_as_no_bytes() -> None:
    letter = dlq.record_letter(
        Record("t", 0, 0, None), ValueError("e" * 20_000), "uploader", max_message=10_000
    )
    assert what(letter) == (b"", "ValueError", "e" * 10_000, "uploader", {})


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
        "e", "a", "e/a/responses/r.csv", 4, b"x@y,no", "bad type", "gatherer", header=header
    )
    assert letter.source == EventSource(kind="file", name="e/a/responses/r.csv", line=4)
    assert what(letter) == (b"x@y,no", "BadResponseRow", "bad type", "gatherer", context)
    assert (dlq.not_replayable(letter, "") is None) is (header is not None)


def test_a_file_name_that_is_not_utf8_keeps_the_names_bytes() -> None:
    letter = dlq.file_name_letter("e/a/responses/x\\xff.csv", b"x\xff.csv", "gatherer")
    assert letter.source == EventSource(kind="file", name="e/a/responses/x\\xff.csv")
    assert what(letter)[:2] == (b"x\xff.csv", "UnreadableFileName")
    assert letter.message == (
        "the response file's name is not UTF-8, so espbridge cannot record or gather it; "
        "it is left in place: rename it on the ESP's site and it is gathered at the next scan"
    )


def test_a_hidden_response_file_is_reported_with_its_account_and_never_replayed() -> None:
    letter = dlq.hidden_file_letter("e", "a", "e/a/responses/.r.csv", 3600, "gatherer")
    assert letter.source == EventSource(kind="file", name="e/a/responses/.r.csv")
    assert what(letter) == (
        b".r.csv",
        "HiddenResponseFile",
        letter.message,
        "gatherer",
        {"esp": "e", "account": "a"},
    )
    assert "3600 s" in letter.message
    assert "rename it" in (dlq.not_replayable(letter, "") or "")


def test_a_webhook_call_keeps_its_body_and_an_item_its_line() -> None:
    call = dlq.webhook_letter("e", "a", b"{not json", "PermanentError", "unreadable", "gatherer")
    assert call.source == EventSource(kind="webhook", name="webhook:e/a")
    assert what(call) == (b"{not json", "PermanentError", "unreadable", "gatherer", {})
    item = dlq.webhook_letter("e", "a", b'{"x":1}', "BadWebhookItem", "no email", "gatherer", line=2)
    assert item.source == EventSource(kind="webhook", name="webhook:e/a", line=2)
    assert what(item) == (b'{"x":1}', "BadWebhookItem", "no email", "gatherer", {})


def test_an_unauthenticated_webhook_call_keeps_only_its_bodys_size_and_is_never_replayed() -> None:
    body = b'{"token": "s3cret"}'
    letter = dlq.webhook_letter(
        "e", "a", body, "WebhookAuthError", "bad signature", "gatherer", authenticated=False
    )
    assert what(letter) == (
        b"",
        "WebhookAuthError",
        "bad signature",
        "gatherer",
        {"body_bytes": str(len(body))},
    )
    assert b"s3cret" not in letter.to_json()
    assert "authentication" in (dlq.not_replayable(letter, "") or "")


def test_an_api_item_names_its_account_broadcast_and_page() -> None:
    letter = dlq.api_item_letter("e", "a", "job-1", 2, b'{"id":1}', "no type", "cli")
    assert letter.source == EventSource(kind="api", name="e/a", page=2)
    context = {"esp": "e", "account": "a", "broadcast": "job-1"}
    assert what(letter) == (b'{"id":1}', "BadResponseItem", "no type", "cli", context)
    assert dlq.broadcast_of(letter) == "job-1"
