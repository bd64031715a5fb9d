"""`python -m services.syncer`: SIGTERM exits 0 from the first instant; then the service runs."""

from __future__ import annotations

import sys

from shared.runtime.starting import start

if __name__ == "__main__":
    sys.exit(start("services.syncer.app"))
