"""Settings of the gatherer (environment prefix ESPBRIDGE_GATHERER_ for its own keys)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.esp.resources import EspServiceSettings
from shared.operations.gathering import HIDDEN_GRACE_S


class Settings(EspServiceSettings):
    """The gatherer's settings: Kafka, HTTP and logging, the ledger database, SFTP, the ESP accounts."""

    model_config = SettingsConfigDict(env_prefix="ESPBRIDGE_GATHERER_", frozen=True, extra="ignore")

    scan_interval_s: float = Field(
        default=60.0, ge=0, description="seconds between scans; 0 = only on demand"
    )
    republish_after_s: float = Field(
        default=300.0, gt=0, description="re-announce a file nobody took after this"
    )
    hidden_file_grace_s: float = Field(
        default=HIDDEN_GRACE_S,
        gt=0,
        description="a hidden remote file unchanged this long is no upload in progress: reported "
        "in response folders, removed in list folders if it is espbridge's own partial upload",
    )
    work_dir: Path | None = Field(
        default=None, description="where files are downloaded to (default: a temp dir)"
    )
    api_window_days: float = Field(default=30.0, gt=0, description="pull API responses of sends this recent")
    publish_batch: int = Field(
        default=5000, ge=1, description="events published per round of acknowledgements"
    )
