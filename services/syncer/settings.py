"""Settings of the syncer (environment prefix ESPBRIDGE_SYNCER_ for its own keys)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.esp.resources import EspServiceSettings
from shared.infra.settings import CrmSettings
from shared.operations.capture import ConnectSettings
from shared.operations.exporting import ExportSettings


class Settings(EspServiceSettings):
    """The syncer's settings: Kafka, HTTP and logging, the databases (the CRM's may be its own),
    the ESP accounts, change data capture, batching, the scheduled unsubscriber export."""

    model_config = SettingsConfigDict(env_prefix="ESPBRIDGE_SYNCER_", frozen=True, extra="ignore")

    crm: CrmSettings = Field(default_factory=CrmSettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    capture: bool = Field(
        default=False,
        description="post the Debezium connector's configuration at start, so the CRM's own changes "
        "to crm.subscriptions are captured and pushed to the ESPs",
    )
    connect: ConnectSettings = Field(
        default_factory=ConnectSettings, description="the Kafka Connect worker that runs the capture"
    )
    batch_max: int = Field(default=500, ge=1, le=10_000, description="changes or requests per batch")
    batch_wait_ms: int = Field(
        default=50,
        ge=0,
        description="how long to wait to fill a batch (an ESP's change reaches the CRM this late)",
    )
    pipeline_batches: int = Field(
        default=4,
        ge=1,
        le=100,
        description="batches already fetched that are handled before offsets are committed",
    )
