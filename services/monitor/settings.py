"""Settings of the monitor (environment prefix ESPBRIDGE_MONITOR_ for its own keys)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.esp.resources import EspServiceSettings


class Settings(EspServiceSettings):
    """The monitor's settings: Kafka, HTTP and logging, the database, SFTP (for ESPs driven by SFTP
    folders), the ESP accounts, polling."""

    model_config = SettingsConfigDict(env_prefix="ESPBRIDGE_MONITOR_", frozen=True, extra="ignore")

    poll_initial_s: float = Field(default=0.5, gt=0, description="first wait between status polls")
    poll_max_s: float = Field(default=30.0, gt=0, description="longest wait between status polls")
    import_timeout_s: float = Field(default=3600.0, gt=0, description="give up on an import after this")
    send_timeout_s: float = Field(default=6 * 3600.0, gt=0, description="give up following a send after this")
