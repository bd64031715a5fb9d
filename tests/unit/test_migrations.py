"""Migration files: the shipped ones are ordered and named, misnamed or duplicate ones are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.infra.db.migrate import load_migrations
from shared.model.errors import ConfigurationError


def test_shipped_migrations_are_ordered_and_named() -> None:
    migrations = load_migrations()
    assert [m.name for m in migrations][:3] == ["control", "responses", "crm"]
    assert [m.version for m in migrations] == sorted({m.version for m in migrations})


def test_misnamed_or_duplicate_migrations_are_errors(tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text("select 1")
    (tmp_path / "1_b.sql").write_text("select 1")
    with pytest.raises(ConfigurationError, match=r"NNNN_name\.sql"):
        load_migrations(tmp_path)
    (tmp_path / "1_b.sql").unlink()
    (tmp_path / "0001_c.sql").write_text("select 1")
    with pytest.raises(ConfigurationError, match="two migrations have version 0001"):
        load_migrations(tmp_path)
