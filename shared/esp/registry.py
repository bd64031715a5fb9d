"""Connector names → implementations."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp

from shared.errors import ConfigurationError
from shared.esp.accounts import AccountConfig
from shared.esp.base import Connector
from shared.esp.generic import GenericConnector
from shared.esp.generic_sftp import GenericSftpConnector

CONNECTORS: dict[str, Callable[[AccountConfig, aiohttp.ClientSession], Connector]] = {
    "generic": GenericConnector,
    "generic_sftp": lambda account, _http: GenericSftpConnector(account),
}


def connector_for(account: AccountConfig, session: aiohttp.ClientSession) -> Connector:
    """The connector of an account, sharing the process's HTTP session."""
    try:
        make = CONNECTORS[account.connector]
    except KeyError:
        raise ConfigurationError(
            f"account {account.esp}/{account.account} names unknown connector {account.connector!r} "
            f"(known: {', '.join(sorted(CONNECTORS))})"
        ) from None
    return make(account, session)
