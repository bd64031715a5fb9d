"""Connector names → implementations."""

from __future__ import annotations

from shared.errors import ConfigurationError
from shared.esp.accounts import AccountConfig
from shared.esp.base import Connector, ConnectorContext
from shared.esp.generic import GenericConnector
from shared.esp.generic_sftp import GenericSftpConnector

CONNECTORS: dict[str, type[Connector]] = {
    "generic": GenericConnector,
    "generic_sftp": GenericSftpConnector,
}


def connector_for(account: AccountConfig, context: ConnectorContext) -> Connector:
    """The connector of an account, sharing the process's HTTP session and SFTP pool."""
    try:
        cls = CONNECTORS[account.connector]
    except KeyError:
        raise ConfigurationError(
            f"account {account.esp}/{account.account} names unknown connector {account.connector!r} "
            f"(known: {', '.join(sorted(CONNECTORS))})"
        ) from None
    return cls(account, context)
