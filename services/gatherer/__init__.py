"""The gatherer service: fetches response data from the ESPs and publishes normalized events."""
