"""Error classification: what is worth retrying and what is not."""

from __future__ import annotations

from shared.model.errors import (
    ConfigurationError,
    HostKeyError,
    InvalidMessageError,
    TransientError,
    UnavailableError,
    is_transient,
)


def test_outages_and_timeouts_are_transient_and_the_rest_permanent() -> None:
    assert is_transient(UnavailableError("down"))
    assert is_transient(TransientError("429"))
    assert is_transient(ConnectionResetError())
    assert is_transient(TimeoutError())
    assert not is_transient(InvalidMessageError("bad"))
    assert not is_transient(HostKeyError("changed"))
    assert not is_transient(ConfigurationError("no key"))
    assert not is_transient(ValueError("a bug"))
