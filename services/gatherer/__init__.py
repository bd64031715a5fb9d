"""The gatherer service: fetches response data from the ESPs and publishes normalized events."""

DESCRIPTION = (
    "Scans the ESP accounts' response folders on an interval (announcing new files on responses.files.v1), "
    "and for each announced file downloads, parses and publishes its events (responses.events.v1), "
    "dead-letters bad rows with file and line, then archives the file on the ESP's site."
)
"""What ``python -m services.gatherer --help`` says the service does."""
