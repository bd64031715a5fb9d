"""`python -m services.uploader`: configure logging, build settings, create the app, run."""

from __future__ import annotations

import sys

from shared.starting import exit_on_sigterm

exit_on_sigterm()  # a stop during the imports below (a second or more) exits 0 at once

from services.uploader.app import DESCRIPTION, create_app  # noqa: E402
from services.uploader.settings import Settings  # noqa: E402
from shared.service import service_main  # noqa: E402


def main() -> int:
    """Run the uploader until SIGTERM."""
    return service_main("uploader", DESCRIPTION, Settings, create_app)


if __name__ == "__main__":
    sys.exit(main())
