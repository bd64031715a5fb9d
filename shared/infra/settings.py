"""Settings of the servers espbridge talks to: Kafka, PostgreSQL, SFTP, and its own HTTP endpoint.

Each piece is a pydantic-settings model with its own environment prefix. Settings are built once,
in an entry point (``__main__``), and passed down; library code never reads the environment.
Secrets are ``SecretStr`` and may come from the environment or from a file (``*_FILE``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.model.topics import Topic, topic_name


def read_secret_file(path: Path) -> SecretStr:
    """Read a secret from a file, stripping one trailing newline; errors name the file, never the value."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read secret file {path}: {exc.strerror}") from None
    value = text.rstrip("\r\n")
    if not value:
        raise ValueError(f"secret file {path} is empty")
    return SecretStr(value)


class _Piece(BaseSettings):
    model_config = SettingsConfigDict(frozen=True, extra="ignore")

    def masked(self) -> dict[str, Any]:
        """The settings as a dict fit for a log line: secrets masked, paths as strings."""
        return self.model_dump(mode="json")


class KafkaSettings(_Piece):
    """Where the Kafka cluster is and how the project names and sizes its topics."""

    model_config = SettingsConfigDict(env_prefix="ESPBRIDGE_KAFKA_", frozen=True, extra="ignore")

    bootstrap_servers: str = "127.0.0.1:9092"
    topic_prefix: str = Field(
        default="",
        pattern=r"^([A-Za-z0-9_-]+\.)?$",
        description="Prepended to every topic name, e.g. 'staging.'; tests use it for isolation.",
    )
    partitions_responses: int = Field(default=12, ge=1, le=1000)
    partitions_default: int = Field(default=3, ge=1, le=1000)
    replication_factor: int = Field(default=1, ge=1, le=10)
    client_id: str = "espbridge"
    session_timeout_ms: int = Field(
        default=10_000,
        ge=1000,
        description="how long a consumer may go silent before the group gives its partitions to the others",
    )

    def topic(self, topic: Topic) -> str:
        """The full name of a registry topic under this cluster's prefix."""
        return topic_name(topic, self.topic_prefix)

    def partitions(self, topic: Topic) -> int:
        """The configured partition count of a topic."""
        if topic in (Topic.RESPONSE_EVENTS, Topic.RESPONSE_FILES):
            return self.partitions_responses
        return self.partitions_default


class PostgresSettings(_Piece):
    """The PostgreSQL database that holds the control, responses and (for demos) crm schemas."""

    model_config = SettingsConfigDict(env_prefix="ESPBRIDGE_PG_", frozen=True, extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=55432, ge=1, le=65535)
    database: str = "espbridge"
    user: str = "espbridge"
    password: SecretStr | None = None
    password_file: Path | None = None
    pool_min_size: int = Field(default=1, ge=0)
    pool_max_size: int = Field(default=10, ge=1)
    connect_timeout_s: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _password_from_file(self) -> Self:
        if self.password is None and self.password_file is not None:
            object.__setattr__(self, "password", read_secret_file(self.password_file))
        return self

    def with_database(self, database: str) -> PostgresSettings:
        """The same server and credentials, another database (tests use one database each)."""
        return self.model_copy(update={"database": database})


class CrmSettings(_Piece):
    """Where the CRM's tables are (the selections broadcasts read, the subscription state the syncer
    keeps): by default the database of :class:`PostgresSettings`; any field set here moves it."""

    model_config = SettingsConfigDict(env_prefix="ESPBRIDGE_CRM_", frozen=True, extra="ignore")

    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    database: str | None = None
    user: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None

    @model_validator(mode="after")
    def _password_from_file(self) -> Self:
        if self.password is None and self.password_file is not None:
            object.__setattr__(self, "password", read_secret_file(self.password_file))
        return self

    def resolve(self, pg: PostgresSettings) -> PostgresSettings:
        """The CRM's connection: ``pg`` with every field set here in its place."""
        update = {
            name: value
            for name in ("host", "port", "database", "user", "password")
            if (value := getattr(self, name)) is not None
        }
        return pg.model_copy(update=update) if update else pg

    def same_database(self, pg: PostgresSettings) -> bool:
        """Whether the CRM is the database of ``pg`` (one pool can serve both)."""
        crm = self.resolve(pg)
        return (crm.host, crm.port, crm.database, crm.user) == (pg.host, pg.port, pg.database, pg.user)


class SftpSettings(_Piece):
    """How to reach an ESP's SFTP site; the host key is always pinned through ``known_hosts``."""

    model_config = SettingsConfigDict(env_prefix="ESPBRIDGE_SFTP_", frozen=True, extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=2222, ge=1, le=65535)
    username: str
    client_key_file: Path | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    known_hosts: Path
    connect_timeout_s: float = Field(default=15.0, gt=0)
    max_connections: int = Field(default=4, ge=1, le=64)

    @model_validator(mode="after")
    def _check_credentials(self) -> Self:
        if self.password is None and self.password_file is not None:
            object.__setattr__(self, "password", read_secret_file(self.password_file))
        if self.client_key_file is None and self.password is None:
            raise ValueError("SFTP needs a client key file or a password")
        return self


class HttpSettings(_Piece):
    """The small HTTP server each service runs for /healthz and /metrics (port 0 = pick a free one)."""

    model_config = SettingsConfigDict(env_prefix="ESPBRIDGE_HTTP_", frozen=True, extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)
    enabled: bool = True
