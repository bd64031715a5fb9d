"""Migration files are well-formed; JSON logs carry the handler context."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import orjson
import pytest

from shared.infra.db.migrate import load_migrations
from shared.infra.logs import JsonFormatter, _ContextFilter, log_context
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


def test_json_log_lines_carry_context() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(_ContextFilter({"service": "uploader"}))
    logger = logging.getLogger("test.logs")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with log_context(job_id="job-7", partition=3):
            logger.warning("hello %s", "world", extra={"rows": 5})
        logger.warning("outside")
    finally:
        logger.removeHandler(handler)
    first, second = (orjson.loads(line) for line in stream.getvalue().splitlines())
    assert first["msg"] == "hello world"
    assert (first["service"], first["job_id"], first["partition"], first["rows"]) == (
        "uploader",
        "job-7",
        3,
        5,
    )
    assert "job_id" not in second
