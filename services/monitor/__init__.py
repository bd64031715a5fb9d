"""The monitor service: drives the ESP's import and send for each uploaded list."""

DESCRIPTION = (
    "Consumes uploaded lists (broadcast.lists.v1) and cancel requests (broadcast.cancels.v1), drives "
    "each broadcast's import and send through the ESP's REST API in short steps held in PostgreSQL "
    "(sending at its send time, never twice) and reports the import and send stages on broadcast.status.v1."
)
"""What ``python -m services.monitor --help`` says the service does."""
