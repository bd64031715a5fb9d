"""The configured ESP accounts: which connector, where its API is, its credentials, its SFTP tree.

Read from a JSON or YAML file named by ``ESPBRIDGE_ACCOUNTS_FILE``::

    accounts:
      - esp: sandbox
        account: demo
        connector: generic
        api_url: http://127.0.0.1:8787/api/v1/accounts/demo
        token_file: /path/to/token        # or token: … (prefer files for every secret)
        # username, password[_file], client_id, client_secret[_file]: as the connector needs
        sftp_root: sandbox/demo           # default <esp>/<account>
        options: {}                       # connector-specific, see docs/connectors/<connector>.md
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.infra.documents import DocumentError, read_document
from shared.infra.settings import read_secret_file
from shared.model.errors import ConfigurationError, PermanentError
from shared.model.messages import ListId, Name

EVERY_LIST = "*"
"""The CRM's subscription row for every list of an account (and, with esp and account ``*``, of
every account): an opt-out whose list is not known."""


class SubscriptionPolicy(BaseModel):
    """How espbridge keeps an account's subscriptions in sync with the CRM (``subscriptions:``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    lists: tuple[ListId, ...] = Field(
        default=(), description="the ESP lists kept in sync with the CRM; none: no subscription sync"
    )
    broadcast_list: ListId | None = Field(
        default=None,
        description="the list broadcasts go to and changes without a list belong to (default: the first)",
    )
    unsubscribe_scope: Literal["list", "account", "all_accounts"] = Field(
        default="list",
        description="an unsubscribe reported by this ESP also unsubscribes the contact from the "
        "account's other lists (account) or from every synced list of every account (all_accounts)",
    )
    hard_bounces: Literal["unsubscribe", "ignore"] = Field(
        default="unsubscribe", description="whether a hard bounce unsubscribes the contact"
    )
    double_opt_in: bool = Field(
        default=False, description="a new subscriber is pending until it confirms the ESP's opt-in mail"
    )

    @model_validator(mode="after")
    def _broadcast_list_is_synced(self) -> Self:
        if self.broadcast_list is not None and self.lists and self.broadcast_list not in self.lists:
            raise ValueError(f"broadcast_list {self.broadcast_list!r} is not one of lists")
        if self.broadcast_list == "":
            raise ValueError("broadcast_list must name a list")
        return self

    @property
    def enabled(self) -> bool:
        """Whether the account's subscriptions are synced at all."""
        return bool(self.lists)

    @property
    def default_list(self) -> str:
        """The list of a change or request that names none; ``*`` (every list of the account) when
        the account syncs no lists, so an opt-out it reports still reaches the CRM."""
        return self.broadcast_list or (self.lists[0] if self.lists else EVERY_LIST)


class AccountConfig(BaseModel):
    """One ESP account espbridge may send through."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    esp: Name
    account: Name
    connector: Name = "generic"
    api_url: str | None = Field(default=None, pattern=r"^https?://", description="absent for file-only ESPs")
    token: SecretStr | None = None
    token_file: Path | None = None
    username: str | None = Field(default=None, description="API user, where the ESP has one")
    password: SecretStr | None = None
    password_file: Path | None = None
    client_id: str | None = Field(default=None, description="OAuth2 client id / API id")
    client_secret: SecretStr | None = None
    client_secret_file: Path | None = None
    sftp_root: str = ""
    request_timeout_s: float = Field(default=30.0, gt=0)
    options: dict[str, Any] = Field(default_factory=dict, description="connector-specific settings")
    subscriptions: SubscriptionPolicy = Field(default_factory=SubscriptionPolicy)

    @model_validator(mode="after")
    def _defaults(self) -> Self:
        for secret in ("token", "password", "client_secret"):
            path = getattr(self, f"{secret}_file")
            if getattr(self, secret) is None and path is not None:
                object.__setattr__(self, secret, read_secret_file(path))
        if not self.sftp_root:
            object.__setattr__(self, "sftp_root", f"{self.esp}/{self.account}")
        if self.sftp_root.startswith("/") or ".." in self.sftp_root.split("/"):
            raise ValueError("sftp_root must be a relative path inside the SFTP login directory")
        return self

    @property
    def key(self) -> tuple[str, str]:
        """(esp, account)."""
        return (self.esp, self.account)

    @property
    def name(self) -> str:
        """``esp/account``, as messages name the account."""
        return f"{self.esp}/{self.account}"


class AccountsFile(BaseModel):
    """The accounts file's shape."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    accounts: tuple[AccountConfig, ...] = ()


class AccountsSettings(BaseSettings):
    """Where the ESP accounts are configured."""

    model_config = SettingsConfigDict(env_prefix="ESPBRIDGE_", frozen=True, extra="ignore")

    accounts_file: Path | None = None


class UnknownAccountError(PermanentError):
    """A job names an ESP or account that is not configured."""


class Accounts:
    """The configured accounts, looked up by (esp, account)."""

    def __init__(self, accounts: tuple[AccountConfig, ...] = ()) -> None:
        self._by_key: dict[tuple[str, str], AccountConfig] = {}
        for acc in accounts:
            if acc.key in self._by_key:
                raise ConfigurationError(f"account {acc.name} is configured twice")
            self._by_key[acc.key] = acc

    @classmethod
    def load(cls, settings: AccountsSettings) -> Self:
        """Read the accounts file (none configured = no accounts)."""
        path = settings.accounts_file
        if path is None:
            return cls()
        try:
            parsed = AccountsFile.model_validate(read_document(path) or {})
        except OSError as exc:
            raise ConfigurationError(f"cannot read accounts file {path}: {exc.strerror}") from None
        except (DocumentError, ValidationError) as exc:
            raise ConfigurationError(f"accounts file {path} is invalid: {exc}") from None
        return cls(parsed.accounts)

    def get(self, esp: str, account: str) -> AccountConfig:
        """The account a job names; an unknown one is a permanent error naming what exists."""
        try:
            return self._by_key[(esp, account)]
        except KeyError:
            known = ", ".join(f"{e}/{a}" for e, a in sorted(self._by_key)) or "none"
            raise UnknownAccountError(
                f"ESP account {esp}/{account} is not configured (configured: {known})"
            ) from None

    def all(self) -> list[AccountConfig]:
        """Every configured account."""
        return list(self._by_key.values())
