"""Settings of the loader (environment prefix ESPBRIDGE_LOADER_ for its own keys)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.runtime.settings import DatabaseServiceSettings


class Settings(DatabaseServiceSettings):
    """The loader's settings: Kafka, HTTP and logging, the response database, batching."""

    model_config = SettingsConfigDict(env_prefix="ESPBRIDGE_LOADER_", frozen=True, extra="ignore")

    batch_max: int = Field(default=20_000, ge=1, le=100_000, description="events per database transaction")
    batch_wait_ms: int = Field(default=500, ge=0, description="how long to wait to fill a batch")
    fetch_partition_bytes: int = Field(
        default=1024 * 1024,
        ge=64 * 1024,
        description="bytes fetched per partition at a time (bounds the memory of a lagging loader)",
    )
    pipeline_batches: int = Field(
        default=8,
        ge=1,
        le=100,
        description=(
            "batches already fetched that are loaded before offsets are committed, each one's database "
            "work overlapping the reading of the next (1: one batch at a time)"
        ),
    )
