"""The settings every service has; a service subclasses :class:`ServiceSettings` with its own keys."""

from __future__ import annotations

from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.infra.logs import LogSettings
from shared.infra.settings import HttpSettings, KafkaSettings, PostgresSettings
from shared.runtime.failpoints import FailpointSettings


class ServiceSettings(BaseSettings):
    """Settings every service has; a service subclasses it with its own env prefix."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore")

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    failpoints: FailpointSettings = Field(default_factory=FailpointSettings)
    startup_timeout_s: float = Field(default=120.0, gt=0, description="how long to wait for Kafka at start")
    shutdown_timeout_s: float = Field(default=30.0, gt=0, description="grace for in-flight work on SIGTERM")

    def group_id(self, service: str) -> str:
        """The consumer group of a service, under the deployment's topic prefix."""
        return f"{self.kafka.topic_prefix}espbridge-{service}"

    def masked(self) -> dict[str, Any]:
        """The settings for the start-up log line, secrets masked."""
        return self.model_dump(mode="json")


class DatabaseServiceSettings(ServiceSettings):
    """Settings of a service with a PostgreSQL database (the control and response tables)."""

    pg: PostgresSettings = Field(default_factory=PostgresSettings)
