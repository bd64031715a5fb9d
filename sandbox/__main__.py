"""`python -m sandbox`: build the settings, configure logging, run the sandbox ESP until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Iterable, Sequence

import orjson
from pydantic import ValidationError

from sandbox.app import run
from sandbox.flavors import FLAVORS
from sandbox.logs import configure
from sandbox.settings import PREFIX, Settings

EPILOG = """\
environment variables (prefix ESPBRIDGE_SANDBOX_):
  FLAVOR             the ESP played: generic (default; docs/generic-esp.md), generic_sftp,
                     instiller, mailup, optimizely or deployteq (docs/connectors/<flavor>.md;
                     their own settings in sandbox/README.md)
  ROOT               the SFTP login directory (required); accounts are ROOT/ESP/ACCOUNT
  ESP                ESP folder name (default sandbox)
  ACCOUNTS           comma-separated account names (default demo)
  HOST, PORT         where the API listens (default 127.0.0.1:8787; port 0 picks a free one)
  URL_FILE           file the server URL is written to once listening
  TOKEN, TOKEN_FILE  the bearer token every account accepts (one of them is required)
  SEED               seed of the simulated responses (default 42)
  PHASE_DELAY_S      pause between response phases (default 1.0)
  IMPORT_DELAY_S     time an import stays queued, and running (default 0.2)
  ROWS_PER_FILE      events per response file at most (default 5000)
  WATCH_INTERVAL_S   how often a flavor that watches SFTP folders reads them (default 0.2)
  RATE_HARD_BOUNCE, RATE_SOFT_BOUNCE, RATE_OPEN, RATE_CLICK, RATE_UNSUBSCRIBE, RATE_COMPLAINT,
  RATE_RETURNED      response probabilities (defaults 0.02, 0.03, 0.35, 0.3, 0.02, 0.003, 0.01)
  API_LIMIT_PER_S, API_LIMIT_BURST
                     token bucket per account on a flavor's API (default 0 = off, burst 1)
  TOKEN_TTL_S        lifetime of access tokens a flavor issues (default 3600)
  MALFORMED_EVERY    a malformed response row after every n-th good one (default 0 = off)
  SEND_DELAY_S       time a send stays `sending` before its first responses (default 0)
  FAULTS             JSON list of fault rules for API calls (sandbox/README.md, "Faults on request")
  FIELD_MAPS, TIMEZONE
                     instiller: known field maps (default espbridge), local zone (Europe/London)
  LOG_LEVEL          DEBUG, INFO, WARNING or ERROR (default INFO)

SIGTERM or SIGINT stops it (exit 0); unfinished imports and sends resume at the next start.
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sandbox ESP; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m sandbox",
        description="The sandbox ESP: plays an ESP (a flavor) over HTTP and its SFTP tree: imports "
        "lists dropped there, simulates sends and writes response files.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--print-settings", action="store_true", help="print the settings (token masked) and exit"
    )
    args = parser.parse_args(argv)
    try:
        settings = Settings()
        flavor = FLAVORS.get(settings.flavor)
        if flavor is not None and flavor.check_settings is not None:
            flavor.check_settings()
    except ValidationError as exc:
        prefix = f"{PREFIX}RATE_" if exc.title == "Rates" else PREFIX
        return _invalid(
            f"{prefix + '_'.join(str(p) for p in e['loc']).upper() if e['loc'] else 'settings'}: {e['msg']}"
            for e in exc.errors(include_input=False)
        )
    if flavor is None:
        known = ", ".join(sorted(FLAVORS))
        return _invalid([f"{PREFIX}FLAVOR: unknown flavor {settings.flavor!r} (known: {known})"])
    if args.print_settings:
        sys.stdout.write(orjson.dumps(settings.masked(), option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    configure(settings.log_level)
    asyncio.run(run(settings))
    return 0


def _invalid(problems: Iterable[str]) -> int:
    """Name each invalid setting on stderr; the exit code of invalid settings."""
    sys.stderr.write("sandbox: invalid settings:\n" + "".join(f"  {p}\n" for p in problems))
    return 2


if __name__ == "__main__":
    sys.exit(main())
