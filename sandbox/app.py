"""Run the sandbox ESP: open the accounts, serve the API, resume unfinished work, stop on a signal."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import threading
from pathlib import Path

from aiohttp import web

from sandbox.api import ApiContext, create_app
from sandbox.engine import Account
from sandbox.faults import Faults
from sandbox.files import atomic_write_bytes
from sandbox.flavors import FLAVORS
from sandbox.flavors.base import Flavor
from sandbox.limits import TokenIssuer
from sandbox.protocol import API_PREFIX
from sandbox.settings import Settings

log = logging.getLogger(__name__)


def server_url(host: str, port: int) -> str:
    """The URL clients reach the server at (a wildcard address is reached on loopback)."""
    try:
        wildcard = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        wildcard = host == ""
    if wildcard:
        host = "::1" if ":" in host else "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def open_accounts(settings: Settings, flavor: Flavor, stop: threading.Event) -> dict[str, Account]:
    """The configured accounts, their folders created and their saved state loaded."""
    accounts: dict[str, Account] = {}
    for name in settings.accounts:
        account = Account(name, settings.root / settings.esp / name, settings, flavor, stop)
        account.open()
        accounts[name] = account
    return accounts


async def run(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT, then stop the background work and return."""
    flavor = FLAVORS[settings.flavor]
    log.info("starting", extra={"settings": settings.masked()})
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)

    # Worker threads (list imports, response files) check this flag between rows and files.
    stop_flag = threading.Event()
    accounts = open_accounts(settings, flavor, stop_flag)
    token = settings.bearer_token.get_secret_value().encode()
    context = ApiContext(accounts, token, TokenIssuer(settings.token_ttl_s))
    runner = web.AppRunner(
        create_app(context, flavor.routes, int(settings.max_body_mb * 1024 * 1024), Faults(settings.faults)),
        access_log=None,
    )
    await runner.setup()
    url_file: Path | None = None
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        port = int(runner.addresses[0][1])
        url = server_url(settings.host, port)
        if settings.url_file is not None:
            atomic_write_bytes(settings.url_file, f"{url}\n".encode())
            url_file = settings.url_file
        log.info(
            "listening",
            extra={
                "url": url,
                "base_urls": {name: f"{url}{API_PREFIX}/{name}" for name in accounts},
                "esp": settings.esp,
                "flavor": flavor.name,
                "root": str(settings.root),
            },
        )
        for account in accounts.values():
            account.start()
        await stopping.wait()
        log.info("stopping")
    finally:
        stop_flag.set()
        await runner.cleanup()
        for account in accounts.values():
            await account.close()
        if url_file is not None:
            url_file.unlink(missing_ok=True)
    log.info("stopped")
