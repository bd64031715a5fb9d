"""Settings of the uploader (environment prefix ESPBRIDGE_UPLOADER_ for its own keys)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from shared.esp.resources import EspServiceSettings
from shared.operations.selection import SelectionSettings


class Settings(EspServiceSettings, SelectionSettings):
    """The uploader's settings: Kafka, HTTP and logging, the database, SFTP, the ESP accounts, and how
    recipients are read (the suppression column, the CSV folder, rows per fetch)."""

    model_config = SettingsConfigDict(env_prefix="ESPBRIDGE_UPLOADER_", frozen=True, extra="ignore")
