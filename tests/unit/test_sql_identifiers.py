"""SQL identifiers: quoted only after they are validated."""

from __future__ import annotations

import pytest

from shared.infra.db.sql import InvalidIdentifierError, quote_ident, quote_qualified


def test_identifiers_are_quoted_after_validation() -> None:
    assert quote_ident("email") == '"email"'
    assert quote_qualified("crm.customers") == '"crm"."customers"'
    for bad in ['x"; DROP TABLE y; --', "a b", "1a", "", "a.b"]:
        with pytest.raises(InvalidIdentifierError):
            quote_ident(bad)
    with pytest.raises(InvalidIdentifierError):
        quote_qualified("a.b.c")
