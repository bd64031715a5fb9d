"""The generic connector's response parser and its cancel against a fake of docs/generic-esp.md
(the list file's rules are in tests/unit/test_list_file.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from pydantic import SecretStr

from cli.history import summarize
from shared.esp import AccountConfig, BadRow, ConnectorContext, SendState
from shared.esp.base import CancelOutcome
from shared.esp.generic import RESPONSE_HEADER, GenericConnector, ListRejectedError
from shared.model.messages import BroadcastStatus, EventType, ResponseEvent, Stage, State
from tests.fixtures.fake_esp import FakeEsp, served
from tests.unit.test_messages import job

HEADER = ",".join(RESPONSE_HEADER)


async def parse(tmp_path: Path, text: str) -> list[ResponseEvent | BadRow]:
    path = tmp_path / "r.csv"
    path.write_bytes(text.encode("utf-8"))
    account = AccountConfig(
        esp="sandbox", account="demo", api_url="http://127.0.0.1:1/api", token=SecretStr("t")
    )
    async with aiohttp.ClientSession() as http:
        return list(
            GenericConnector(account, ConnectorContext(http)).parse_response_file(
                path, "sandbox/demo/responses/r.csv"
            )
        )


async def test_rows_become_events_with_deterministic_ids(tmp_path: Path) -> None:
    text = f'{HEADER}\ne1,job-1,m,ck1,a@x.com,click,"https://x.com/?a=1,2",2026-11-22T10:00:03Z\n'
    (event,) = await parse(tmp_path, text)
    (again,) = await parse(tmp_path, text)
    assert isinstance(event, ResponseEvent)
    assert event.type is EventType.CLICK
    assert event.url == "https://x.com/?a=1,2"
    assert event.occurred_at == datetime(2026, 11, 22, 10, 0, 3, tzinfo=UTC)
    assert (event.source.name, event.source.line) == ("sandbox/demo/responses/r.csv", 2)
    assert isinstance(again, ResponseEvent)
    assert event.event_id == again.event_id


async def test_values_with_quotes_backslashes_and_tabs_are_kept_as_they_are(tmp_path: Path) -> None:
    text = f'{HEADER}\ne1,job-1,m\\1,ck1,"a\tb@x.com",click,"https://x.com/?q=""ü✓""",2026-11-22T10:00:03Z\n'
    (event,) = await parse(tmp_path, text)
    assert isinstance(event, ResponseEvent)
    assert (event.esp_message_id, event.email, event.url) == ("m\\1", "a\tb@x.com", 'https://x.com/?q="ü✓"')


async def test_bad_rows_are_kept_with_their_line_and_good_rows_still_parse(tmp_path: Path) -> None:
    text = (
        f"{HEADER}\n"
        "e1,job-1,m,ck1,a@x.com,open,,2026-11-22T10:00:03Z\n"
        'e2,job-1,m,ck2,"multi\nline",open,,2026-11-22T10:00:04Z\n'
        "e3,job-1,m,ck3,c@x.com,teleport,,2026-11-22T10:00:05Z\n"
        "e4,job-1,m,ck4,d@x.com,open,,2026-11-22 10:00:06\n"
        "e5,job-1,m\n"
        "e6,job-1,m,ck6,f@x.com,open,,2026-11-22T10:00:07+01:00\n"
    )
    items = await parse(tmp_path, text)
    good = [i for i in items if isinstance(i, ResponseEvent)]
    bad = {i.line: i.error for i in items if isinstance(i, BadRow)}
    assert [e.communication_key for e in good] == ["ck1", "ck2", "ck6"]
    assert good[1].source.line == 3
    assert set(bad) == {5, 6, 7}
    assert "unknown EventType" in bad[5]
    assert "no time zone" in bad[6]
    assert "3 fields" in bad[7]
    assert good[2].occurred_at == datetime(2026, 11, 22, 9, 0, 7, tzinfo=UTC)


async def test_an_unexpected_header_rejects_the_file(tmp_path: Path) -> None:
    (item,) = await parse(tmp_path, "Email,Type\na@x.com,open\n")
    assert isinstance(item, BadRow)
    assert item.line == 1


def test_status_summary_folds_progress_updates() -> None:
    def st(stage: Stage, state: State, n: int) -> BroadcastStatus:
        return BroadcastStatus(job_id="j", stage=stage, state=state, counts={"n": n})

    rows = summarize(
        [st(Stage.SEND, State.RUNNING, 0), st(Stage.SEND, State.DONE, 1)]
        + [st(Stage.LOAD, State.RUNNING, i) for i in range(5)]
    )
    assert [(s.stage, s.state, s.counts["n"], n) for s, n in rows] == [
        (Stage.SEND, State.RUNNING, 0, 1),
        (Stage.SEND, State.DONE, 1, 1),
        (Stage.LOAD, State.RUNNING, 4, 5),
    ]


# --- cancel -----------------------------------------------------------------------------------------


@dataclass
class FakeGeneric(FakeEsp):
    """Sends and their cancel as docs/generic-esp.md describes them."""

    base: str = "/api/v1/accounts/demo"
    sends: dict[str, str] = field(default_factory=dict)  # send id → state

    def application(self) -> web.Application:
        app = web.Application()
        app.router.add_post(self.base + "/sends/{send_id}/cancel", self.cancel)
        app.router.add_get(self.base + "/sends/{send_id}", self.show)
        return app

    def body(self, send_id: str) -> dict[str, object]:
        return {"send_id": send_id, "external_id": "job-1", "state": self.sends[send_id], "recipients": 3}

    async def cancel(self, request: web.Request) -> web.Response:
        send_id = request.match_info["send_id"]
        if send_id not in self.sends:
            return web.json_response({"error": "send_not_found", "message": f"no send {send_id}"}, status=404)
        if self.sends[send_id] not in ("scheduled", "cancelled"):
            message = f"send {send_id} is {self.sends[send_id]}: too late to cancel"
            return web.json_response({"error": "send_not_cancellable", "message": message}, status=409)
        self.sends[send_id] = "cancelled"
        return web.json_response(self.body(send_id))

    async def show(self, request: web.Request) -> web.Response:
        return web.json_response(self.body(request.match_info["send_id"]))


esp = served(FakeGeneric)


def generic(esp: FakeGeneric) -> GenericConnector:
    account = AccountConfig(esp="sandbox", account="demo", api_url=esp.url, token=SecretStr("t0k"))
    return GenericConnector(account, ConnectorContext(esp.http))


@pytest.mark.parametrize(
    ("state", "outcome", "detail"),
    [
        ("scheduled", CancelOutcome.CANCELLED, "nothing was sent"),
        ("cancelled", CancelOutcome.CANCELLED, "nothing was sent"),
        ("sending", CancelOutcome.TOO_LATE, "is sending: too late"),
        ("sent", CancelOutcome.TOO_LATE, "is sent: too late"),
    ],
)
async def test_a_cancel_is_the_esps_answer_to_the_cancel_call(
    esp: FakeGeneric, state: str, outcome: CancelOutcome, detail: str
) -> None:
    esp.sends["snd-1"] = state
    result = await generic(esp).cancel_send("snd-1", job())
    assert (result.outcome, detail in result.detail) == (outcome, True), result.detail
    (call,) = esp.calls("/cancel")
    assert (call.method, call.path, call.authorization) == ("POST", "/sends/snd-1/cancel", "Bearer t0k")


async def test_a_cancelled_send_is_followed_as_ended_without_messages(esp: FakeGeneric) -> None:
    esp.sends["snd-1"] = "scheduled"
    c = generic(esp)
    await c.cancel_send("snd-1", job())
    status = await c.send_status("snd-1")
    assert (status.state, status.detail) == (SendState.FAILED, "cancelled at the ESP")


async def test_a_send_the_esp_does_not_know_cannot_be_cancelled(esp: FakeGeneric) -> None:
    with pytest.raises(ListRejectedError, match="does not know send snd-9: no send snd-9"):
        await generic(esp).cancel_send("snd-9", job())


async def test_a_send_id_is_one_path_segment(esp: FakeGeneric) -> None:
    with pytest.raises(ListRejectedError, match=r"no send \.\./imports/imp-1"):  # the route took it whole
        await generic(esp).cancel_send("../imports/imp-1", job())
