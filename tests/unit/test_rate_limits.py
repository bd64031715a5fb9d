"""Rate limits without servers: how long a call waits when no slot is free, which limiter a
connector gets, the generic connector's rate option, and the sandbox's count of calls a second
(the limiters at work: tests/integration/test_shared_rate_limits.py and test_esp_http.py)."""

from __future__ import annotations

from typing import Any

import pytest

from sandbox.limits import CallsPerSecond
from shared.esp import AccountConfig, connector_for
from shared.esp.base import ConnectorContext
from shared.esp.limits import CONTENDED_S, RateLimits, rate_limiter, wait_s
from shared.esp.rest import RateLimiter
from shared.infra.db.rate_slots import Attempt
from shared.model.errors import ConfigurationError
from tests.fixtures.fake_esp import OFFLINE

ACME = AccountConfig(esp="sandbox", account="acme", api_url="http://127.0.0.1:9/api")


@pytest.mark.parametrize(
    ("attempt", "wait"),
    [
        # a slot whose call ended is free 0.3 s from now: wait exactly that
        (Attempt(None, 5, cooling_s=0.3, first_free_s=0.3), 0.3),
        # a running call's lease ends before any ended slot cools down: that frees a slot first
        (Attempt(None, 5, cooling_s=0.8, first_free_s=0.2), 0.2),
        # every slot is held by a running call: one ending now frees its slot per_s (1 s) from now
        (Attempt(None, 5, cooling_s=None, first_free_s=30.0), 1.0),
        (Attempt(None, 5, cooling_s=None, first_free_s=0.4), 0.4),
        # a free slot went to another process in the same instant: try again almost at once
        (Attempt(None, 5, cooling_s=-0.1, first_free_s=-0.1), CONTENDED_S),
    ],
)
def test_a_call_without_a_free_slot_waits_until_one_can_be_free(attempt: Attempt, wait: float) -> None:
    assert wait_s(attempt, per_s=1.0) == pytest.approx(wait)


def test_a_process_without_a_database_limits_each_account_in_memory() -> None:
    limits = RateLimits()
    limiter = limits.limiter(ACME, 5, 1.0)
    assert isinstance(limiter, RateLimiter)
    assert limits.limiter(ACME, 5, 1.0) is limiter, "one limiter per account and rate in a process"
    other = ACME.model_copy(update={"account": "other"})
    assert limits.limiter(other, 5, 1.0) is not limiter
    assert isinstance(rate_limiter(OFFLINE, ACME, 5, 1.0), RateLimiter), "a context without rate limits"
    assert rate_limiter(ConnectorContext(OFFLINE.http, rates=limits), ACME, 5, 1.0) is limiter


@pytest.mark.parametrize("options", [{"requests_per_second": 0}, {"requests_per_seconds": 5}])
def test_the_generic_connector_refuses_a_bad_rate_naming_the_account(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError, match="sandbox/acme"):
        connector_for(ACME.model_copy(update={"options": options}), OFFLINE)


def test_the_sandbox_counts_calls_in_whole_seconds_of_its_clock_and_forgets_old_ones() -> None:
    now = [1000.2]
    calls = CallsPerSecond(keep_s=3, clock=lambda: now[0])
    for at in (1000.2, 1000.9, 1001.0, 1001.99, 1002.5, 1004.0, 1004.1):
        now[0] = at
        calls.count()
    assert calls.seconds() == {"1002": 1, "1004": 2}  # 1000 and 1001 are more than 3 s ago
