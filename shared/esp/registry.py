"""Connector names → implementations."""

from __future__ import annotations

from shared.esp.accounts import AccountConfig, Accounts
from shared.esp.base import Connector, ConnectorContext
from shared.esp.deployteq import DeployteqConnector
from shared.esp.generic import GenericConnector
from shared.esp.generic_sftp import GenericSftpConnector
from shared.esp.instiller import InstillerConnector
from shared.esp.mailup import MailUpConnector
from shared.esp.optimizely import OptimizelyConnector
from shared.model.errors import ConfigurationError

CONNECTORS: dict[str, type[Connector]] = {
    "deployteq": DeployteqConnector,
    "generic": GenericConnector,
    "generic_sftp": GenericSftpConnector,
    "instiller": InstillerConnector,
    "mailup": MailUpConnector,
    "optimizely": OptimizelyConnector,
}


def connector_for(account: AccountConfig, context: ConnectorContext) -> Connector:
    """The connector of an account, sharing the process's HTTP session and SFTP pool."""
    try:
        cls = CONNECTORS[account.connector]
    except KeyError:
        raise ConfigurationError(
            f"account {account.name} names unknown connector {account.connector!r} "
            f"(known: {', '.join(sorted(CONNECTORS))})"
        ) from None
    return cls(account, context)


class Connectors:
    """The process's connectors, one per configured account, kept for the process's life.

    Keeping them lets a connector hold state that must outlive one message: an OAuth2 token,
    a rate limiter, a concurrency limit.
    """

    def __init__(self, accounts: Accounts, context: ConnectorContext) -> None:
        self.accounts = accounts
        self.context = context
        self._made: dict[tuple[str, str], Connector] = {}

    def get(self, esp: str, account: str) -> Connector:
        """The connector of a configured account (unknown accounts are a permanent error)."""
        key = (esp, account)
        if key not in self._made:
            self._made[key] = connector_for(self.accounts.get(esp, account), self.context)
        return self._made[key]

    def all(self) -> list[Connector]:
        """A connector for every configured account."""
        return [self.get(a.esp, a.account) for a in self.accounts.all()]
