"""A service's ESP resources, opened in one place, and the settings they are opened from: the
environment variables every ESP-facing service reads are the same ones as before."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import SecretStr

from services.gatherer.settings import Settings as GathererSettings
from services.loader.settings import Settings as LoaderSettings
from services.monitor.settings import Settings as MonitorSettings
from services.uploader.settings import Settings as UploaderSettings
from shared.esp import AccountsSettings
from shared.esp.resources import EspResources, EspServiceSettings
from shared.infra.settings import SftpSettings
from shared.model.errors import ConfigurationError


@pytest.fixture
def sftp(tmp_path: Path) -> SftpSettings:
    return SftpSettings(username="espbridge", password=SecretStr("pw"), known_hosts=tmp_path / "known_hosts")


async def test_the_resources_serve_each_account_and_close_with_their_stack(
    tmp_path: Path, sftp: SftpSettings
) -> None:
    accounts = tmp_path / "accounts.json"
    account = {"esp": "sandbox", "account": "demo", "api_url": "http://127.0.0.1:9/api", "token": "t"}
    accounts.write_bytes(orjson.dumps({"accounts": [account]}))
    async with contextlib.AsyncExitStack() as stack:
        esp = await EspResources.open(stack, AccountsSettings(accounts_file=accounts), sftp)
        connector = esp.connectors.get("sandbox", "demo")
        assert connector.account is esp.accounts.get("sandbox", "demo")
        assert connector.context.http is esp.http
        assert connector.context.sftp is esp.sftp
    assert esp.http.closed


class CountingStack(contextlib.AsyncExitStack):
    """An exit stack that counts what is opened on it."""

    opened = 0

    def push_async_callback(self, callback: Any, /, *args: Any, **kwargs: Any) -> Any:
        self.opened += 1
        return super().push_async_callback(callback, *args, **kwargs)

    async def enter_async_context(self, cm: Any) -> Any:
        self.opened += 1
        return await super().enter_async_context(cm)


async def test_a_bad_accounts_file_fails_before_anything_is_opened(
    tmp_path: Path, sftp: SftpSettings
) -> None:
    async with CountingStack() as stack:
        with pytest.raises(ConfigurationError, match="cannot read accounts file"):
            await EspResources.open(stack, AccountsSettings(accounts_file=tmp_path / "missing.yaml"), sftp)
        assert stack.opened == 0


@pytest.mark.parametrize("settings", [UploaderSettings, MonitorSettings, GathererSettings])
def test_esp_services_read_the_database_sftp_and_accounts_from_the_shared_variables(
    settings: type[EspServiceSettings], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ESPBRIDGE_PG_HOST", "db.example")
    monkeypatch.setenv("ESPBRIDGE_SFTP_USERNAME", "drop")
    monkeypatch.setenv("ESPBRIDGE_SFTP_PASSWORD", "pw")
    monkeypatch.setenv("ESPBRIDGE_SFTP_KNOWN_HOSTS", str(tmp_path / "kh"))
    monkeypatch.setenv("ESPBRIDGE_ACCOUNTS_FILE", str(tmp_path / "accounts.yaml"))
    read = settings()
    assert (read.pg.host, read.sftp.username, read.accounts.accounts_file) == (
        "db.example",
        "drop",
        tmp_path / "accounts.yaml",
    )
    assert "pw" not in str(read.masked())


def test_the_loader_reads_the_database_from_the_shared_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESPBRIDGE_PG_PORT", "6543")
    assert LoaderSettings().pg.port == 6543
