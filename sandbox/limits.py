"""Helpers a flavor's routes can use: rate limits with real 429s, issued bearer tokens, malformed rows.

- :class:`TokenBucket` and :class:`SlidingWindow` answer ``acquire() -> seconds to wait`` (0 when the
  call may go ahead; a refused call takes nothing); :func:`rate_limited` is the 429 with
  ``Retry-After``. Each :class:`sandbox.engine.Account` has one from ``API_LIMIT_PER_S`` /
  ``API_LIMIT_BURST`` (:meth:`Account.check_rate_limit`).
- :class:`TokenIssuer` issues OAuth-style access tokens (and single-use refresh tokens) that live
  ``TOKEN_TTL_S``; the shared one is ``request.app[sandbox.api.CONTEXT].tokens``. Tokens live in
  memory: after a restart clients authenticate again.
- :class:`MalformedRows` decides after which well-formed row a malformed one follows
  (``MALFORMED_EVERY``) and counts them per stream.
- :class:`CallsPerSecond` counts an account's API calls per second of the sandbox's clock, as an
  ESP counts its rate limit (``calls_per_second`` in ``_sandbox/stats``).
"""

from __future__ import annotations

import math
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sandbox.errors import EspError

Clock = Callable[[], float]


class RateLimiter(Protocol):
    """Anything that tells whether one more call may go ahead now."""

    def acquire(self) -> float:
        """0.0 if the call may go ahead (and it is counted); else the seconds until one may."""
        ...


class TokenBucket:
    """``rate_per_s`` tokens a second, at most ``burst`` saved up; a call takes one token."""

    def __init__(self, rate_per_s: float, burst: int, clock: Clock = time.monotonic) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate_per_s > 0 and burst >= 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Take a token if there is one (0.0); else the seconds until the next one."""
        with self._lock:
            now = self._clock()
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate_per_s)
            self._at = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return 0.0
            return (1.0 - self._tokens) / self.rate_per_s


class SlidingWindow:
    """At most ``limit`` accepted calls in any ``window_s`` seconds."""

    def __init__(self, limit: int, window_s: float = 1.0, clock: Clock = time.monotonic) -> None:
        if limit < 1 or window_s <= 0:
            raise ValueError("a sliding window needs limit >= 1 and window_s > 0")
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._accepted: list[float] = []
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Count the call if the window has room (0.0); else the seconds until its oldest call leaves."""
        with self._lock:
            now = self._clock()
            self._accepted = [t for t in self._accepted if now - t < self.window_s]
            if len(self._accepted) < self.limit:
                self._accepted.append(now)
                return 0.0
            return self._accepted[0] + self.window_s - now


class CallsPerSecond:
    """Calls counted in whole seconds of ``clock`` (the sandbox's wall clock), the last ``keep_s``
    of them: what an ESP that allows "n calls a second" counts against it."""

    def __init__(self, keep_s: int = 3600, clock: Clock = time.time) -> None:
        self.keep_s = keep_s
        self._clock = clock
        self._calls: Counter[int] = Counter()
        self._lock = threading.Lock()

    def count(self) -> None:
        """One call now."""
        with self._lock:
            second = math.floor(self._clock())
            self._calls[second] += 1
            if len(self._calls) > self.keep_s:
                for old in [s for s in self._calls if s <= second - self.keep_s]:
                    del self._calls[old]

    def seconds(self) -> dict[str, int]:
        """Calls per second that had any, keyed by the second's Unix time (a JSON object's keys)."""
        with self._lock:
            return {str(second): n for second, n in sorted(self._calls.items())}


def retry_after_s(wait_s: float) -> int:
    """The ``Retry-After`` value for a wait: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(wait_s))


def rate_limited(wait_s: float, message: str = "too many requests; retry later") -> EspError:
    """The 429 ``{"error": "rate_limited", "message"}`` with ``Retry-After`` for a wait of ``wait_s``."""
    return EspError(429, "rate_limited", message, {"Retry-After": str(retry_after_s(wait_s))})


@dataclass(frozen=True)
class IssuedToken:
    """An access token, its lifetime, and the refresh token that replaces it once."""

    access_token: str
    refresh_token: str
    expires_in: int
    account: str


class TokenIssuer:
    """OAuth-style bearer tokens per account, valid ``ttl_s`` seconds; refresh tokens are single-use."""

    def __init__(self, ttl_s: float, clock: Clock = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._access: dict[str, tuple[str, float]] = {}
        self._refresh: dict[str, str] = {}
        self.issued: Counter[str] = Counter()
        """Tokens issued per account (refreshes included), e.g. for a flavor's stats."""

    def issue(self, account: str) -> IssuedToken:
        """A new access token (and refresh token) for ``account``."""
        access, refresh = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        self._access[access] = (account, self._clock() + self.ttl_s)
        self._refresh[refresh] = account
        self.issued[account] += 1
        return IssuedToken(access, refresh, max(0, math.floor(self.ttl_s)), account)

    def account_of(self, access_token: str) -> str | None:
        """The account an access token was issued to, or None if it is unknown or expired."""
        found = self._access.get(access_token)
        if found is None:
            return None
        account, expires = found
        if self._clock() >= expires:
            del self._access[access_token]
            return None
        return account

    def refresh(self, refresh_token: str) -> IssuedToken | None:
        """A new token pair for the refresh token's account, or None if it is unknown or used already."""
        account = self._refresh.pop(refresh_token, None)
        return None if account is None else self.issue(account)


class MalformedRows:
    """Which well-formed rows a malformed row follows: after every ``every``-th of each stream.

    Call :meth:`after_good` once per well-formed row, in release order (replays included, so the
    decisions are the same after a restart); it answers the send-wide 1-based number ``k`` of the
    malformed row to add after this one, or None. ``kind(k, kinds)`` rotates through a flavor's
    kinds. ``counts`` are the malformed rows per stream so far.
    """

    def __init__(self, every: int) -> None:
        self.every = every
        self._good: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()

    def after_good(self, stream: str) -> int | None:
        """Count one well-formed row of ``stream``; the number of the malformed row to follow, if any."""
        self._good[stream] += 1
        if self.every <= 0 or self._good[stream] % self.every:
            return None
        self.counts[stream] += 1
        return self.counts.total()

    @staticmethod
    def kind(k: int, kinds: int) -> int:
        """The 0-based kind of the ``k``-th malformed row when ``kinds`` kinds rotate."""
        return (k - 1) % kinds
