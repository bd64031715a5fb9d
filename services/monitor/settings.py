"""Settings of the monitor (environment prefix ESPBRIDGE_MONITOR_ for its own keys)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.esp.resources import EspServiceSettings


class Settings(EspServiceSettings):
    """The monitor's settings: Kafka, HTTP and logging, the database, SFTP (for ESPs driven by SFTP
    folders), the ESP accounts, polling, the due-work loop and send times."""

    model_config = SettingsConfigDict(env_prefix="ESPBRIDGE_MONITOR_", frozen=True, extra="ignore")

    poll_initial_s: float = Field(default=0.5, gt=0, description="first wait between status polls")
    poll_max_s: float = Field(default=30.0, gt=0, description="longest wait between status polls")
    import_timeout_s: float = Field(default=3600.0, gt=0, description="give up on an import after this")
    send_timeout_s: float = Field(default=6 * 3600.0, gt=0, description="give up following a send after this")
    max_in_flight: int = Field(
        default=32, ge=1, description="steps of different broadcasts this process runs at once"
    )
    due_poll_s: float = Field(default=1.0, gt=0, description="how often to look for due work")
    lease_s: float = Field(
        default=60.0,
        ge=3,
        description="how long a claimed step is held without renewal (renewed every third of it while it "
        "runs); a killed process's steps are taken over after this",
    )
    send_at_grace_s: float = Field(
        default=900.0, ge=0, description="a send time passed by more than this when due fails the job"
    )
