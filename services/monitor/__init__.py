"""The monitor service: drives the ESP's import and send for each uploaded list."""

DESCRIPTION = (
    "Consumes uploaded lists (broadcast.lists.v1), drives the ESP's import and send through its REST "
    "API (never sending a broadcast twice) and reports the import and send stages on broadcast.status.v1."
)
"""What ``python -m services.monitor --help`` says the service does."""
