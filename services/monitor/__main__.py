"""`python -m services.monitor`: configure logging, build settings, create the app, run."""

from __future__ import annotations

import sys

from shared.starting import exit_on_sigterm

exit_on_sigterm()  # a stop during the imports below (a second or more) exits 0 at once

from services.monitor.app import DESCRIPTION, create_app  # noqa: E402
from services.monitor.settings import Settings  # noqa: E402
from shared.service import service_main  # noqa: E402


def main() -> int:
    """Run the monitor until SIGTERM."""
    return service_main("monitor", DESCRIPTION, Settings, create_app)


if __name__ == "__main__":
    sys.exit(main())
