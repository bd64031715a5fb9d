"""`python -m services.uploader`: configure logging, build settings, create the app, run."""

from __future__ import annotations

import sys

from services.uploader.app import DESCRIPTION, create_app
from services.uploader.settings import Settings
from shared.service import service_main


def main() -> int:
    """Run the uploader until SIGTERM."""
    return service_main("uploader", DESCRIPTION, Settings, create_app)


if __name__ == "__main__":
    sys.exit(main())
