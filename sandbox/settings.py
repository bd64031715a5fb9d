"""The sandbox settings, from ``ESPBRIDGE_SANDBOX_*`` environment variables, built once in ``__main__``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import DirectoryPath, Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from sandbox.faults import FaultRule, parse_rules
from sandbox.protocol import NAME_RE
from sandbox.validators import CommaList, Probability, Seconds, names_matching

PREFIX = "ESPBRIDGE_SANDBOX_"


class SandboxSettings(BaseSettings):
    """Settings read from ``ESPBRIDGE_SANDBOX_*`` variables: the shared ones below and each flavor's own."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, frozen=True, extra="ignore")


class Rates(BaseSettings):
    """How recipients respond; probabilities drawn per recipient by the seeded simulation."""

    model_config = SettingsConfigDict(env_prefix="ESPBRIDGE_SANDBOX_RATE_", frozen=True, extra="ignore")

    hard_bounce: Probability = Field(default=0.02, description="of sent messages")
    soft_bounce: Probability = Field(default=0.03, description="of sent messages")
    open: Probability = Field(default=0.35, description="of delivered messages; an opener opens 1-3 times")
    click: Probability = Field(default=0.30, description="of openers; a clicker clicks 1-2 times")
    unsubscribe: Probability = Field(default=0.02, description="of openers")
    complaint: Probability = Field(default=0.003, description="of delivered messages")
    returned: Probability = Field(
        default=0.01, description="of delivered messages; only flavors with `returned` rows (instiller)"
    )

    @model_validator(mode="after")
    def _bounces_fit(self) -> Self:
        if self.hard_bounce + self.soft_bounce > 1.0:
            raise ValueError("hard_bounce + soft_bounce must not exceed 1")
        return self


class Settings(SandboxSettings):
    """Everything the sandbox ESP is configured with (environment prefix ``ESPBRIDGE_SANDBOX_``)."""

    flavor: str = Field(default="generic", description="the ESP the sandbox plays (sandbox.flavors.FLAVORS)")
    root: DirectoryPath = Field(description="the SFTP login directory; accounts are <root>/<esp>/<account>")
    esp: str = Field(default="sandbox", pattern=NAME_RE.pattern)
    accounts: Annotated[CommaList, names_matching(NAME_RE, "account name")] = Field(
        default=("demo",), description="comma list"
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8787, ge=0, le=65535, description="0 picks a free port")
    url_file: Path | None = Field(default=None, description="where to write the server URL once listening")
    token: SecretStr | None = Field(default=None, description="the bearer token (or token_file)")
    token_file: Path | None = None
    seed: int = 42
    phase_delay_s: Seconds = Field(default=1.0, description="pause between two response phases")
    import_delay_s: Seconds = Field(default=0.2, description="time an import stays queued, and running")
    rows_per_file: int = Field(default=5000, ge=1, description="events per response file at most")
    watch_interval_s: float = Field(
        default=0.2, gt=0.0, description="how often watched SFTP folders are read"
    )
    rate: Rates = Field(default_factory=Rates)
    api_limit_per_s: float = Field(
        default=0.0, ge=0.0, description="token bucket rate per account of a flavor's API (0 = off)"
    )
    api_limit_burst: int = Field(default=1, ge=1, description="token bucket size")
    token_ttl_s: float = Field(default=3600.0, gt=0.0, description="lifetime of issued access tokens")
    malformed_every: int = Field(
        default=0, ge=0, description="a malformed response row after every n-th good one (0 = off)"
    )
    max_body_mb: float = Field(
        default=64.0, gt=0.0, description="largest request body accepted; larger ones are answered 413"
    )
    send_delay_s: Seconds = Field(
        default=0.0, description="time a send stays `sending` before its first responses"
    )
    faults: Annotated[tuple[FaultRule, ...], NoDecode] = Field(
        default=(), description="JSON list of fault rules (sandbox.faults); none by default"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    _bearer: SecretStr = PrivateAttr(default=SecretStr(""))

    @field_validator("faults", mode="before")
    @classmethod
    def _parse_faults(cls, value: Any) -> Any:
        return parse_rules(value)

    @model_validator(mode="after")
    def _resolve_token(self) -> Self:
        if self.token is not None and self.token_file is not None:
            raise ValueError("set ESPBRIDGE_SANDBOX_TOKEN or ESPBRIDGE_SANDBOX_TOKEN_FILE, not both")
        if self.token_file is not None:
            self._bearer = _token_from(self.token_file)
        elif self.token is not None and self.token.get_secret_value():
            self._bearer = self.token
        else:
            raise ValueError("ESPBRIDGE_SANDBOX_TOKEN or ESPBRIDGE_SANDBOX_TOKEN_FILE is required")
        return self

    @property
    def bearer_token(self) -> SecretStr:
        """The one bearer token every account accepts (from the variable or the file)."""
        return self._bearer

    def masked(self) -> dict[str, Any]:
        """The settings for the start-up log line; the token shows as asterisks."""
        return self.model_dump(mode="json")


def _token_from(path: Path) -> SecretStr:
    """The token in a file, one trailing newline stripped; errors name the file, never the value."""
    try:
        token = path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ValueError(f"cannot read token file {path}: {exc.strerror}") from None
    if token:
        return SecretStr(token)
    raise ValueError(f"token file {path} is empty")
