"""The loader service: loads response events into the response database, idempotently."""

DESCRIPTION = (
    "Consumes response events (responses.events.v1) in batches, loads them into the response database "
    "idempotently (COPY, merge on event_id, per-broadcast counts, then offsets), and publishes opt-outs "
    "on subscriptions.changes.v1."
)
"""What ``python -m services.loader --help`` says the service does."""
