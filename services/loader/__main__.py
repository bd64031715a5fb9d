"""`python -m services.loader`: configure logging, build settings, create the app, run."""

from __future__ import annotations

import sys

from services.loader.app import DESCRIPTION, create_app
from services.loader.settings import Settings
from shared.service import service_main


def main() -> int:
    """Run the loader until SIGTERM."""
    return service_main("loader", DESCRIPTION, Settings, create_app)


if __name__ == "__main__":
    sys.exit(main())
