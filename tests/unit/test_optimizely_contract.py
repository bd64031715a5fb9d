"""The contract of the Optimizely tests (tests/fixtures/contract.py): what it holds a call to, how it
names a departure, and where it says the document is silent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.contract import (
    DOCUMENT_ENV,
    ERROR_ANSWERS,
    READINGS,
    SANDBOX_SUPPORT,
    ContractCalls,
    Exchange,
    apply_readings,
    contract,
    document_path,
    read_document,
)

AUTH = {"Authorization": "Basic YXBpLXVzZXI6cGFzcw=="}
BATCH = {
    "id": 5001,
    "campaignId": 7001,
    "recipientListId": 3001,
    "tag": "job-1",
    "chunks": [],
    "state": "initiated",
}
BOUNCE = {
    "mailId": "8001-K1",
    "mailingId": 8001,
    "recipientListId": 3001,
    "recipientId": "K1",
    "category": "hardbounce",
    "created": "2026-11-22T11:00:09.000+01:00",
}


def call(
    method: str,
    path: str,
    query: dict[str, str] | None = None,
    body: bytes = b"",
    content_type: str = "",
    status: int = 200,
    answer: Any = None,
    headers: dict[str, str] | None = None,
) -> Exchange:
    """A call below ``/rest`` with the given answer (JSON unless None)."""
    return Exchange(
        method=method,
        path=path,
        query=tuple((query or {}).items()),
        headers=AUTH if headers is None else headers,
        content_type=content_type,
        body=body,
        status=status,
        answer_type="application/json" if answer is not None else "",
        answer=json.dumps(answer).encode() if answer is not None else b"",
    )


def multipart(**fields: str) -> tuple[bytes, str]:
    parts = [f'--b\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n' for k, v in fields.items()]
    return ("".join(parts) + "--b--\r\n").encode(), "multipart/form-data; boundary=b"


def departures(exchange: Exchange, **kwargs: bool) -> list[str]:
    return [str(d) for d in contract().check(exchange, **kwargs).departures]


def page(elements: list[Any], **extra: Any) -> dict[str, Any]:
    return {"elements": elements, "count": len(elements), "offset": 0, "limit": 100, **extra}


def test_calls_as_the_document_has_them_pass() -> None:
    body, form = multipart(campaign="7000", campaignAction="copy", tag="job-1")
    chunk = {"chunk": "c000001", "recipients": [{"id": "K1", "data": {"email": "a@example.com"}}]}
    calls = [
        call("GET", "/1000001/sending/batches", {"offset": "0", "limit": "100"}, answer=page([BATCH])),
        call("POST", "/1000001/sending/batches", body=body, content_type=form, status=201, answer=BATCH),
        call(
            "PUT",
            "/1000001/sending/batches/5001",
            body=json.dumps(chunk).encode(),
            content_type="application/json",
            answer={"chunk": "c000001", "count": 1},
        ),
        call("POST", "/1000001/sending/batches/5001", status=202),
        call(
            "POST",
            "/1000001/recipients/4001",
            body=b"recipientId=a%40example.com&optinProcessId=102&data.firstname=Anna",
            content_type="application/x-www-form-urlencoded",
            status=202,
            answer={"id": "a@example.com"},
        ),
        call(
            "GET",
            "/1000001/responses",
            {"category": "hardbounce", "mailingId": "8001", "limit": "9999"},
            answer=page([BOUNCE]),
        ),
    ]
    for exchange in calls:
        verdict = contract().check(exchange)
        assert (verdict.departures, verdict.silence) == ([], None), exchange.path
    assert contract().check(calls[2]).operation == "PUT /{clientId}/sending/batches/{sendingBatchId}"


@pytest.mark.parametrize(
    ("exchange", "named"),
    [
        (
            call("GET", "/1000001/responses", {"category": "hardbounce", "mailingId": "8001", "offset": "0"}),
            "GET /{clientId}/responses (/1000001/responses): request query parameter offset: not in the "
            "document (it names category, limit, mailingId, recipientIds)",
        ),
        (
            call("GET", "/1000001/responses", {"category": "bounce", "mailingId": "8001"}),
            "request query parameter category: 'bounce' is not one of",
        ),
        (call("GET", "/1000001/responses", {"mailingId": "8001"}), "request query parameter category"),
        (call("GET", "/demo/sending/batches"), "request path parameter clientId"),
        (call("GET", "/1000001/sending/batches", headers={}), "request header Authorization"),
        (
            call(
                "POST",
                "/1000001/sending/batches",
                body=multipart(campaign="7000")[0],
                content_type=multipart()[1],
            ),
            "request body: 'campaignAction' is a required property",
        ),
        (
            call(
                "POST",
                "/1000001/sending/batches",
                body=multipart(campaign="7000", campaignAction="copy", job="job-1")[0],
                content_type=multipart()[1],
            ),
            "request form field job: not in the document",
        ),
        (
            call(
                "PUT",
                "/1000001/sending/batches/5001",
                body=b'{"chunk": "c1", "recipients": [{"id": "K1", "email": "a@example.com"}]}',
                content_type="application/json",
            ),
            "request body.recipients[0].email: not in the document",
        ),
        (
            call(
                "POST",
                "/1000001/recipients/4001",
                body=b"recipientId=a%40example.com&firstname=Anna",
                content_type="application/x-www-form-urlencoded",
            ),
            "request form field firstname: not in the document",
        ),
        (call("GET", "/1000001/sending/batches/5001/chunks"), "request path: the document has no such path"),
        (call("DELETE", "/1000001/sending/batches"), "request method: the document has no such operation"),
    ],
)
def test_a_request_departure_names_the_call_and_the_field(exchange: Exchange, named: str) -> None:
    found = departures(exchange)
    assert any(named in d for d in found), found


@pytest.mark.parametrize(
    ("exchange", "named"),
    [
        (
            call("GET", "/1000001/sending/batches/5001", answer={**BATCH, "state": "done"}),
            "GET /{clientId}/sending/batches/{sendingBatchId} (/1000001/sending/batches/5001): answer 200 "
            "body.state: 'done' is not one of ['initiated', 'has_recipients', 'sent', 'invalid']",
        ),
        (
            call("GET", "/1000001/sending/batches", answer=page([{**BATCH, "batchId": 5001}])),
            "answer 200 body.elements[0].batchId: not in the document",
        ),
        (call("GET", "/1000001/sending/batches", answer=page([], links=[])), "answer 200 body.links"),
        (
            call(
                "GET",
                "/1000001/smartcampaigns/7001",
                answer={"id": 7001, "status": "running", "started": None},
            ),
            "answer 200 body.started: None for not nullable",
        ),
        (call("POST", "/1000001/sending/batches/5001", status=200), "answer 200 status: not in the document"),
        (call("GET", "/1000001/webhooks", answer=page([])), "answer 200 body: {'elements'"),
    ],
)
def test_an_answer_departure_names_the_call_and_the_field(exchange: Exchange, named: str) -> None:
    found = departures(exchange)
    assert any(named in d for d in found), found


def test_where_the_document_is_silent_the_rule_is_named_and_nothing_departs() -> None:
    too_many = call("GET", "/1000001/sending/batches", status=429, answer={"status": 429, "message": "slow"})
    assert contract().check(too_many).silence is ERROR_ANSWERS
    assert contract().check(call("GET", "/1000001/_sandbox/stats", answer={})).silence is SANDBOX_SUPPORT
    unknown = call("GET", "/1000001/no/such/thing", status=404, answer={"status": 404, "message": "no"})
    assert contract().check(unknown, requests=False).silence is ERROR_ANSWERS
    assert departures(unknown) != [], "a client that calls what is not there departs"


def test_a_test_fails_with_every_departure_and_what_was_skipped() -> None:
    calls = ContractCalls()
    wrong = call("GET", "/1000001/sending/batches/5001", answer={**BATCH, "state": "done"})
    for exchange in (wrong, wrong, call("GET", "/1000001/sending/batches", status=503)):
        calls.record(exchange)
    with pytest.raises(pytest.fail.Exception) as failed:
        calls.assert_kept()
    text = str(failed.value)
    assert "2 departures" in text
    assert "body.state: 'done' is not one of" in text
    assert "(2 times)" in text
    assert "3 calls checked; skipped where the document is silent: error answers: 1" in text


def test_the_readings_hold_on_the_document_as_written() -> None:
    written = read_document(document_path())
    read = apply_readings(written)
    assert read["components"]["schemas"]["Recipient"]["properties"]["data"]["additionalProperties"] == {}
    changed = json.loads(json.dumps(written))
    changed["components"]["schemas"]["Recipient"]["properties"]["data"]["additionalProperties"] = {
        "type": "string"
    }
    with pytest.raises(AssertionError, match="no longer applies"):
        apply_readings(changed, READINGS)


def test_without_the_document_the_tests_fail_and_say_where_they_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    absent = tmp_path / "absent.json"
    monkeypatch.setenv(DOCUMENT_ENV, str(absent))
    assert document_path() == absent
    with pytest.raises(pytest.fail.Exception, match=f"not at {absent}.*{DOCUMENT_ENV}"):
        read_document(document_path())
