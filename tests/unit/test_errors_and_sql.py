"""Error classification and identifier quoting."""

from __future__ import annotations

import pytest

from shared.infra.db.sql import InvalidIdentifierError, quote_ident, quote_qualified
from shared.model.errors import (
    ConfigurationError,
    HostKeyError,
    InvalidMessageError,
    TransientError,
    UnavailableError,
    is_transient,
)


def test_transient_and_permanent() -> None:
    assert is_transient(UnavailableError("down"))
    assert is_transient(TransientError("429"))
    assert is_transient(ConnectionResetError())
    assert is_transient(TimeoutError())
    assert not is_transient(InvalidMessageError("bad"))
    assert not is_transient(HostKeyError("changed"))
    assert not is_transient(ConfigurationError("no key"))
    assert not is_transient(ValueError("a bug"))


def test_identifiers_are_quoted_after_validation() -> None:
    assert quote_ident("email") == '"email"'
    assert quote_qualified("crm.customers") == '"crm"."customers"'
    for bad in ['x"; DROP TABLE y; --', "a b", "1a", "", "a.b"]:
        with pytest.raises(InvalidIdentifierError):
            quote_ident(bad)
    with pytest.raises(InvalidIdentifierError):
        quote_qualified("a.b.c")
