"""The syncer's rules: which row a change or request is about, post-operations per scope, the time
order and echo rules, which requests go to the ESP and in what batches, and bad requests."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.syncer import core
from shared.esp.accounts import AccountConfig, Accounts, SubscriptionPolicy, UnknownAccountError
from shared.esp.base import ContactChange, ContactResult
from shared.infra.db.subscriptions import Key, Origin, Outcome, Result, Row, decide
from shared.model.messages import RequestOrigin, SubscriptionChange, SubscriptionRequest, SubscriptionState

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
EMAIL = "ann@example.com"


def account(name: str, *lists: str, esp: str = "generic", **policy: Any) -> AccountConfig:
    return AccountConfig(esp=esp, account=name, subscriptions=SubscriptionPolicy(lists=lists, **policy))


def accounts(*configured: AccountConfig) -> Accounts:
    return Accounts(configured)


def change(
    name: str = "a", list_id: str = "", state: str = "unsubscribed", reason: str = "unsubscribe", **more: Any
) -> SubscriptionChange:
    return SubscriptionChange(
        change_id=uuid.UUID(int=1),
        email=EMAIL,
        esp=more.pop("esp", "generic"),
        account=name,
        list=list_id,
        state=SubscriptionState(state),
        reason=reason,
        occurred_at=more.pop("occurred_at", T0),
    )


def request(name: str = "a", list_id: str = "", **more: Any) -> SubscriptionRequest:
    values: dict[str, Any] = {
        "request_id": uuid.UUID(int=2),
        "email": EMAIL,
        "esp": "generic",
        "account": name,
        "list": list_id,
        "state": SubscriptionState.SUBSCRIBED,
        "requested_at": T0,
    } | more
    return SubscriptionRequest(**values)


def rows_of(writes: list[Any]) -> list[tuple[str, str, str]]:
    return [(w.key.account, w.key.list, w.origin.value) for w in writes]


# --- lists ---------------------------------------------------------------------------------------


def test_a_change_without_a_list_is_about_the_accounts_broadcast_list() -> None:
    configured = accounts(account("a", "news", "offers", broadcast_list="offers"))
    (own,) = core.change_writes(change(state="subscribed", reason="subscribe"), configured)
    assert (own.key, own.source, own.origin) == (
        Key(EMAIL, "generic", "a", "offers"),
        "generic/a",
        Origin.ESP,
    )


def test_an_opt_out_from_an_account_that_syncs_no_lists_is_about_every_list_of_it() -> None:
    (own,) = core.change_writes(change(), accounts(account("a")))
    assert own.key.list == "*"


def test_a_change_from_an_unknown_account_is_refused_naming_those_configured() -> None:
    with pytest.raises(UnknownAccountError, match=r"generic/b is not configured.*generic/a"):
        core.change_writes(change("b"), accounts(account("a", "news")))


# --- hard bounces --------------------------------------------------------------------------------


@pytest.mark.parametrize(("policy", "ignored"), [("unsubscribe", False), ("ignore", True)])
def test_a_hard_bounce_unsubscribes_as_the_accounts_policy_says(policy: str, ignored: bool) -> None:
    configured = accounts(account("a", "news", "offers", hard_bounces=policy, unsubscribe_scope="account"))
    writes = core.change_writes(change(list_id="news", reason="bounce_hard"), configured)
    assert writes[0].ignored is ignored
    assert len(writes) == (1 if ignored else 2)  # an ignored bounce has no follow-ons either


# --- post-operations -----------------------------------------------------------------------------


SCOPES = accounts(
    account("a", "news", "offers", "alerts", unsubscribe_scope="account"),
    account("b", "main", unsubscribe_scope="all_accounts"),
    account("c", "weekly", "daily", esp="mailup"),
    account("d"),  # syncs no lists: never a target
    account("e", "solo"),
)


@pytest.mark.parametrize(
    ("name", "esp", "list_id", "expected"),
    [
        ("e", "generic", "solo", []),
        ("a", "generic", "news", [("a", "alerts"), ("a", "offers")]),
        ("a", "generic", "other", [("a", "alerts"), ("a", "news"), ("a", "offers")]),
        (
            "b",
            "generic",
            "main",
            [("a", "alerts"), ("a", "news"), ("a", "offers"), ("e", "solo"), ("c", "daily"), ("c", "weekly")],
        ),
    ],
)
def test_an_unsubscribe_follows_on_as_the_reporting_accounts_scope_says_never_to_its_own_row(
    name: str, esp: str, list_id: str, expected: list[tuple[str, str]]
) -> None:
    writes = core.change_writes(change(name, list_id, esp=esp), SCOPES)
    own, follow_ons = writes[0], writes[1:]
    assert own.origin is Origin.ESP
    assert sorted((w.key.esp, w.key.account, w.key.list) for w in follow_ons) == sorted(
        ("mailup" if a == "c" else "generic", a, lst) for a, lst in expected
    )
    assert all(w.after == own.change_id and w.origin is Origin.FOLLOW_ON for w in follow_ons)
    assert all(
        (w.source, w.state, w.occurred_at) == (f"generic/{name}", "unsubscribed", T0) for w in follow_ons
    )
    assert own.key not in [w.key for w in follow_ons]


def test_a_subscribe_has_no_follow_ons() -> None:
    assert len(core.change_writes(change("a", "news", "subscribed", "subscribe"), SCOPES)) == 1


def test_a_follow_on_has_the_same_id_for_the_same_origin_and_target_only() -> None:
    target, other = Key(EMAIL, "generic", "a", "news"), Key(EMAIL, "generic", "a", "offers")
    first = core.follow_on_id(uuid.UUID(int=1), target)
    assert first == core.follow_on_id(uuid.UUID(int=1), target)
    assert (
        len({first, core.follow_on_id(uuid.UUID(int=1), other), core.follow_on_id(uuid.UUID(int=9), target)})
        == 3
    )


def test_only_a_follow_on_the_crm_took_becomes_a_push_request() -> None:
    own, follow = core.change_writes(
        change("a", "news"), accounts(account("a", "news", "offers", unsubscribe_scope="account"))
    )
    assert core.follow_on_request(Result(own, Outcome.APPLIED)) is None
    assert core.follow_on_request(Result(follow, Outcome.UNCHANGED)) is None
    assert core.follow_on_request(Result(follow, Outcome.DUPLICATE, Outcome.STALE)) is None
    pushed = core.follow_on_request(Result(follow, Outcome.DUPLICATE, Outcome.APPLIED))
    assert pushed is not None
    assert (pushed.request_id, pushed.list, pushed.origin, pushed.source, pushed.state) == (
        follow.change_id,
        "offers",
        RequestOrigin.FOLLOW_ON,
        "generic/a",
        SubscriptionState.UNSUBSCRIBED,
    )


# --- time order and echo: the rules the store applies ----------------------------------------------


def _row(key: Key, state: str, minutes: int, source: str = "crm") -> Row:
    return Row(key, state, "", source, T0 + timedelta(minutes=minutes), "crm", None, {})


def test_no_ping_pong_an_unsubscribe_a_list_holds_already_makes_no_follow_ons() -> None:
    configured = accounts(
        account("a", "news", unsubscribe_scope="all_accounts"),
        account("b", "main", unsubscribe_scope="all_accounts"),
    )
    writes = core.change_writes(change("a", "news", occurred_at=T0 + timedelta(minutes=5)), configured)
    own_key = writes[0].key
    results, changed = decide(writes, {own_key: _row(own_key, "unsubscribed", 1)}, {})
    assert [r.outcome for r in results] == [Outcome.UNCHANGED]
    assert changed == {}


def test_a_late_older_change_is_stale_and_has_no_follow_ons() -> None:
    configured = accounts(account("a", "news", "offers", unsubscribe_scope="account"))
    writes = core.change_writes(change("a", "news"), configured)
    own_key = writes[0].key
    results, changed = decide(writes, {own_key: _row(own_key, "subscribed", 10)}, {})
    assert [(r.outcome, r.superseded) for r in results] == [(Outcome.STALE, True)]
    assert changed == {}


@pytest.mark.parametrize(
    ("reported", "outcome"),
    [
        (
            T0 + timedelta(minutes=10),
            Outcome.APPLIED,
        ),  # whole seconds: the opt-out's second holds the CRM's change
        (T0 + timedelta(minutes=10, microseconds=300_000), Outcome.APPLIED),  # precise and later
        (T0 + timedelta(minutes=9, seconds=59), Outcome.STALE),  # a second that ended before
        (T0 + timedelta(minutes=9, seconds=59, microseconds=999_000), Outcome.STALE),  # precise: older
    ],
)
def test_an_opt_out_reported_in_whole_seconds_wins_within_its_second(
    reported: datetime, outcome: Outcome
) -> None:
    writes = core.change_writes(change("a", "news", occurred_at=reported), accounts(account("a", "news")))
    key = writes[0].key
    row = replace(_row(key, "subscribed", 10), changed_at=T0 + timedelta(minutes=10, microseconds=250_000))
    results, changed = decide(writes, {key: row}, {})
    assert [r.outcome for r in results] == [outcome]
    if outcome is Outcome.APPLIED:
        assert changed[key].changed_at == max(reported, row.changed_at), "a row's time never goes back"


def test_a_newer_change_wins_and_its_follow_ons_meet_their_own_rows_time() -> None:
    configured = accounts(account("a", "news", "offers", "alerts", unsubscribe_scope="account"))
    writes = core.change_writes(change("a", "news", occurred_at=T0 + timedelta(minutes=5)), configured)
    news, alerts, offers = (Key(EMAIL, "generic", "a", n) for n in ("news", "alerts", "offers"))
    rows = {news: _row(news, "subscribed", 1), alerts: _row(alerts, "subscribed", 9)}
    results, changed = decide(writes, rows, {})
    assert {r.write.key.list: r.outcome for r in results} == {
        "news": Outcome.APPLIED,
        "alerts": Outcome.STALE,  # the CRM changed it later: the follow-on does not overwrite
        "offers": Outcome.APPLIED,
    }
    assert sorted(changed) == [news, offers]
    assert changed[offers].source == "generic/a"


def test_a_captured_change_the_row_has_moved_past_is_not_pushed() -> None:
    target = core.request_target(
        request(origin=RequestOrigin.CAPTURE, source="crm"), accounts(account("a", "news"))
    )
    write = core.request_write(request(origin=RequestOrigin.CAPTURE, source="crm"), target.key)
    assert write.in_crm
    (later,), _ = decide([write], {target.key: _row(target.key, "unsubscribed", 3, "generic/a")}, {})
    (current,), _ = decide([write], {target.key: _row(target.key, "subscribed", 0)}, {})
    assert (core.is_to_push(later), core.is_to_push(current)) == (False, True)


def test_a_producers_request_is_written_and_pushed_unless_stale() -> None:
    req = request(list_id="news", fields={"FirstName": "Ann"})
    target = core.request_target(req, accounts(account("a", "news")))
    write = core.request_write(req, target.key)
    assert not write.in_crm
    assert (write.origin, write.source, dict(write.fields)) == (Origin.PRODUCER, "crm", {"FirstName": "Ann"})
    (applied,), changed = decide([write], {}, {})
    plain = core.request_write(request(list_id="news"), target.key)
    (same,), _ = decide([plain], {target.key: _row(target.key, "subscribed", -1)}, {})
    (stale,), _ = decide([write], {target.key: _row(target.key, "unsubscribed", 1)}, {})
    assert changed[target.key].state == "subscribed"
    assert [core.is_to_push(r) for r in (applied, same, stale)] == [True, True, False]


def test_a_request_pushed_before_is_judged_by_its_first_outcome() -> None:
    write = core.request_write(request(list_id="news"), Key(EMAIL, "generic", "a", "news"))
    assert core.is_to_push(Result(write, Outcome.DUPLICATE, Outcome.APPLIED))
    assert not core.is_to_push(Result(write, Outcome.DUPLICATE, Outcome.STALE))
    assert not core.is_to_push(Result(write, Outcome.DUPLICATE, Outcome.APPLIED, superseded=True))


# --- bad requests --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("req", "error", "message"),
    [
        (request("zz"), UnknownAccountError, "ESP account generic/zz is not configured"),
        (request("quiet"), core.NoListsSyncedError, "generic/quiet syncs no lists"),
        (
            request("a", "nope"),
            core.UnknownListError,
            "list 'nope' is not one of the lists ESP account generic/a syncs",
        ),
    ],
)
def test_a_request_for_an_unknown_account_or_list_is_refused_with_the_reason(
    req: SubscriptionRequest, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        core.request_target(req, accounts(account("a", "news"), account("quiet")))


def test_a_request_without_a_list_goes_to_the_broadcast_list() -> None:
    target = core.request_target(
        request("a"), accounts(account("a", "news", "offers", broadcast_list="offers"))
    )
    assert target.key == Key(EMAIL, "generic", "a", "offers")


# --- pushing -------------------------------------------------------------------------------------


def test_a_subscribe_asks_for_double_opt_in_where_the_account_wants_it() -> None:
    configured = accounts(account("a", "news", double_opt_in=True), account("b", "news"))
    changes = [
        core.contact_change(r, core.request_target(r, configured))
        for r in (request("a"), request("b"), request("a", state=SubscriptionState.UNSUBSCRIBED))
    ]
    assert [c.double_opt_in for c in changes] == [True, False, False]
    assert changes[0] == ContactChange(EMAIL, "news", SubscriptionState.SUBSCRIBED, {}, True, "")


def test_requests_go_in_chunks_per_account_and_never_twice_for_one_contact_in_a_call() -> None:
    keys = [
        Key("a@x.io", "generic", "a", "news"),
        Key("b@x.io", "generic", "b", "news"),
        Key("c@x.io", "generic", "a", "news"),
        Key("a@x.io", "generic", "a", "news"),  # the same contact again: a call of its own
        Key("d@x.io", "generic", "a", "news"),
        Key("e@x.io", "generic", "a", "news"),
        Key("f@x.io", "generic", "a", "news"),
    ]
    chunks = core.chunks(list(range(len(keys))), keys, 3)
    assert [(c.account, c.items) for c in chunks] == [("a", [0, 2]), ("a", [3, 4, 5]), ("a", [6]), ("b", [1])]


def test_a_connectors_answer_that_does_not_match_its_changes_is_a_problem() -> None:
    changes = [ContactChange(EMAIL, "news", SubscriptionState.SUBSCRIBED)]
    assert core.results_problem(changes, [ContactResult(EMAIL, "news", True)]) is None
    assert "answered 0 results for 1" in (core.results_problem(changes, []) or "")
    assert "in the place of" in (core.results_problem(changes, [ContactResult("x@y.io", "news", True)]) or "")


def test_a_state_the_esp_answered_is_written_back_as_the_accounts_own_change() -> None:
    req = request("a", "news")
    target = core.request_target(req, accounts(account("a", "news", double_opt_in=True)))
    later = T0 + timedelta(seconds=3)
    back = core.write_back(
        req, target, ContactResult(EMAIL, "news", True, SubscriptionState.PENDING, "confirmation sent"), later
    )
    assert back is not None
    assert (back.state, back.source, back.occurred_at, back.origin, back.reason) == (
        "pending",
        "generic/a",
        later,
        Origin.ESP,
        "confirmation sent",
    )
    again = core.write_back(req, target, ContactResult(EMAIL, "news", True, SubscriptionState.PENDING), later)
    assert again is not None
    assert again.change_id == back.change_id
    assert (
        core.write_back(req, target, ContactResult(EMAIL, "news", True, SubscriptionState.SUBSCRIBED), later)
        is None
    )
    assert (
        core.write_back(req, target, ContactResult(EMAIL, "news", False, SubscriptionState.PENDING), later)
        is None
    )


def test_a_refusal_says_which_account_refused_whom_and_why() -> None:
    target = core.request_target(request("a", "news"), accounts(account("a", "news")))
    assert (
        core.refusal(target, EMAIL, "blocklisted") == f"generic/a refused {EMAIL} on list 'news': blocklisted"
    )


def test_the_crm_lag_is_measured_for_applied_esp_changes_only() -> None:
    own, follow = core.change_writes(
        change("a", "news"), accounts(account("a", "news", "offers", unsubscribe_scope="account"))
    )
    at = T0 + timedelta(seconds=1.5)
    assert core.crm_lag_s(Result(own, Outcome.APPLIED), at) == 1.5
    assert core.crm_lag_s(Result(own, Outcome.STALE), at) is None
    assert core.crm_lag_s(Result(follow, Outcome.APPLIED), at) is None
