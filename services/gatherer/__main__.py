"""`python -m services.gatherer`: configure logging, build settings, create the app, run."""

from __future__ import annotations

import sys

from services.gatherer.app import DESCRIPTION, create_app
from services.gatherer.settings import Settings
from shared.service import service_main


def main() -> int:
    """Run the gatherer until SIGTERM."""
    return service_main("gatherer", DESCRIPTION, Settings, create_app)


if __name__ == "__main__":
    sys.exit(main())
