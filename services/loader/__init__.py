"""The loader service: loads response events into the response database, idempotently."""
