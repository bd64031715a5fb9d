"""`python -m services.monitor`: configure logging, build settings, create the app, run."""

from __future__ import annotations

import sys

from services.monitor.app import DESCRIPTION, create_app
from services.monitor.settings import Settings
from shared.service import service_main


def main() -> int:
    """Run the monitor until SIGTERM."""
    return service_main("monitor", DESCRIPTION, Settings, create_app)


if __name__ == "__main__":
    sys.exit(main())
