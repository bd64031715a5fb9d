"""Settings of the loader (environment prefix ESPBRIDGE_LOADER_ for its own keys)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from shared.service import ServiceSettings


class Settings(ServiceSettings):
    """The loader's settings: the shared pieces (Kafka, HTTP, logging) plus its own."""

    model_config = SettingsConfigDict(env_prefix="ESPBRIDGE_LOADER_", frozen=True, extra="ignore")
