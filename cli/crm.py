"""``espbridge crm capture``: Debezium's capture of the CRM's crm.subscriptions on the Kafka Connect
worker (``ESPBRIDGE_CONNECT_URL``), which turns the CRM's own changes into pushes to the ESPs."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

import aiohttp

from cli.output import as_json, one_line
from shared.infra.settings import CrmSettings, KafkaSettings, PostgresSettings
from shared.operations.capture import (
    CaptureStatus,
    ConnectSettings,
    capture_status,
    disable_capture,
    ensure_capture,
)


def add_parser(groups: Any) -> None:
    """The ``crm`` group and its ``capture`` commands."""
    crm = groups.add_parser("crm", help="the CRM side of espbridge").add_subparsers(dest="cmd", required=True)
    capture = crm.add_parser(
        "capture",
        help="change data capture of crm.subscriptions by Debezium on the Kafka Connect worker",
    ).add_subparsers(dest="action", required=True)
    capture.add_parser(
        "enable", help="post the connector (its configuration replaced if it exists) and wait until it runs"
    )
    capture.add_parser("disable", help="delete the connector, then drop its replication slot and publication")
    status = capture.add_parser("status", help="the connector, its task and its replication slot")
    status.add_argument("--json", action="store_true", help="as JSON")


async def crm_capture(args: argparse.Namespace) -> int:
    """``crm capture enable | disable | status``."""
    kafka = KafkaSettings()
    pg = PostgresSettings()
    crm = CrmSettings().resolve(pg)
    connect = ConnectSettings()
    async with aiohttp.ClientSession() as http:
        if args.action == "enable":
            status = await ensure_capture(
                http,
                connect.url,
                kafka,
                crm,
                connect.require_secrets_file(),
                database_host=connect.database_host,
                database_port=connect.database_port,
                timeout_s=connect.enable_timeout_s,
            )
            names = status.names
            print(f"capture enabled: connector {names.connector} RUNNING on {connect.url}")
            print(f"  crm.subscriptions of database {crm.database} ({crm.host}:{crm.port})")
            print(f"  -> topic {names.topic}")
            print(f"  replication slot {names.slot}, publication {names.publication}")
            print("  the CRM's changes from now on are pushed to the ESPs; rows already there are not")
            return 0
        if args.action == "disable":
            outcome = await disable_capture(http, connect.url, kafka, crm, timeout_s=connect.enable_timeout_s)
            names = outcome.names
            done = [
                f"connector {names.connector} "
                + ("deleted" if outcome.connector_deleted else "was not there"),
                f"replication slot {names.slot} " + ("dropped" if outcome.slot_dropped else "was not there"),
                f"publication {names.publication} "
                + ("dropped" if outcome.publication_dropped else "was not there"),
            ]
            print("capture disabled: " + "; ".join(done))
            return 0
        status = await capture_status(http, connect.url, kafka, crm)
    if args.json:
        print(as_json(_document(status, connect.url)))
    else:
        print(_report(status, connect.url, crm.database))
    return 0 if status.running else 1


def _document(status: CaptureStatus, url: str) -> dict[str, Any]:
    return {
        "worker": url,
        "connector": status.names.connector,
        "state": status.connector_state,
        "running": status.running,
        "failure": status.failure,
        "tasks": [{"id": t.id, "state": t.state, "worker_id": t.worker_id} for t in status.tasks],
        "topic": status.names.topic,
        "slot": asdict(status.slot) if status.slot else None,
    }


def _report(status: CaptureStatus, url: str, database: str) -> str:
    names = status.names
    if status.connector_state is None:
        lines = [f"capture is not enabled: no connector {names.connector} on {url}"]
    else:
        lines = [f"connector  {names.connector}  {status.connector_state} on {url}"]
        lines += [f"task {t.id}     {t.state} on {t.worker_id}" for t in status.tasks]
        if status.failure:
            lines.append(f"failure    {one_line(status.failure, 300)}")
        lines.append(f"topic      {names.topic}")
    slot = status.slot
    if slot is None:
        lines.append(f"slot       {names.slot}: none in database {database}")
    else:
        held = f"{slot.retained_wal_bytes / 1e6:.1f} MB" if slot.retained_wal_bytes is not None else "unknown"
        lines.append(
            f"slot       {slot.name} in database {slot.database}: {'active' if slot.active else 'inactive'}, "
            f"confirmed {slot.confirmed_flush_lsn}, holding {held} of WAL ({slot.wal_status})"
        )
        if status.connector_state is None:
            lines.append(
                "           left over: it keeps WAL forever; `espbridge crm capture disable` drops it"
            )
    return "\n".join(lines)
