"""Settings of the uploader (environment prefix ESPBRIDGE_UPLOADER_ for its own keys)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.esp.resources import EspServiceSettings
from shared.model.messages import Identifier


class Settings(EspServiceSettings):
    """The uploader's settings: Kafka, HTTP and logging, the database, SFTP, the ESP accounts."""

    model_config = SettingsConfigDict(env_prefix="ESPBRIDGE_UPLOADER_", frozen=True, extra="ignore")

    suppression_column: Identifier = Field(
        default="opted_out", description="a boolean column; rows where it is true are left out"
    )
    csv_dir: Path | None = Field(default=None, description="the only folder CSV selections may be read from")
    fetch_rows: int = Field(default=5000, ge=100, description="rows per round trip of the selection cursor")
