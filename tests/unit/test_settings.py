"""Settings pieces: read from the environment, secrets from files, never shown."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from shared.infra.settings import KafkaSettings, PostgresSettings, SftpSettings


@pytest.fixture(autouse=True)
def no_espbridge_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sets what it reads; the servers' variables of a test run must not leak in."""
    for key in [k for k in os.environ if k.startswith("ESPBRIDGE_")]:
        monkeypatch.delenv(key)


def test_pieces_read_their_prefixed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESPBRIDGE_KAFKA_BOOTSTRAP_SERVERS", "10.0.0.1:9094")
    monkeypatch.setenv("ESPBRIDGE_KAFKA_PARTITIONS_RESPONSES", "24")
    monkeypatch.setenv("ESPBRIDGE_PG_PORT", "6543")
    kafka = KafkaSettings()
    assert kafka.bootstrap_servers == "10.0.0.1:9094"
    assert kafka.partitions_responses == 24
    assert PostgresSettings().port == 6543


def test_password_from_a_file_is_secret(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cr3t-value\n")
    pg = PostgresSettings(password_file=secret)
    assert pg.password is not None
    assert pg.password.get_secret_value() == "s3cr3t-value"
    assert "s3cr3t" not in repr(pg)
    assert "s3cr3t" not in str(pg.masked())


def test_environment_password_is_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESPBRIDGE_PG_PASSWORD", "from-env-123")
    assert "from-env-123" not in str(PostgresSettings().masked())


def test_missing_or_empty_secret_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="cannot read secret file"):
        PostgresSettings(password_file=tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(ValidationError, match="is empty"):
        PostgresSettings(password_file=empty)


def test_sftp_needs_a_credential_and_known_hosts(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="client key file or a password"):
        SftpSettings(username="u", known_hosts=tmp_path / "kh")
    with pytest.raises(ValidationError, match="known_hosts"):
        SftpSettings(username="u", client_key_file=tmp_path / "k")


def test_bad_values_are_refused() -> None:
    with pytest.raises(ValidationError):
        KafkaSettings(topic_prefix="has space.")
    with pytest.raises(ValidationError):
        KafkaSettings(partitions_responses=0)
