"""The error tree: every espbridge error is transient (retry later) or permanent (dead-letter).

Handlers raise these; the Kafka error policy (:mod:`shared.infra.kafka.policy`) maps them to retry
or dead-letter in one place.
"""

from __future__ import annotations


class EspbridgeError(Exception):
    """Root of all espbridge errors."""

    transient: bool = False


class TransientError(EspbridgeError):
    """Will probably succeed later: a server down, a timeout, a 429 or 5xx answer."""

    transient = True


class PermanentError(EspbridgeError):
    """Will fail the same way on every retry: bad input, a refused credential, a missing table."""

    transient = False


class InvalidMessageError(PermanentError):
    """A Kafka message that is not valid JSON or does not match its topic's model."""


class ConfigurationError(PermanentError):
    """Settings that cannot work (missing key file, unknown ESP account, …)."""


class HostKeyError(PermanentError):
    """An SSH server presented a host key that is not pinned; the connection was refused."""


class StoppingError(TransientError):
    """The service is stopping: the message in hand goes back to Kafka uncommitted, and the next
    process of the service resumes it."""


class UnavailableError(TransientError):
    """A server espbridge depends on (Kafka, PostgreSQL, SFTP, an ESP) cannot be reached now."""


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the operation that raised ``exc`` may succeed.

    espbridge errors say so themselves; connection-level OS errors and timeouts are transient;
    anything else (a bug, bad data) is permanent, so it is dead-lettered rather than retried forever.
    """
    if isinstance(exc, EspbridgeError):
        return exc.transient
    return isinstance(exc, (ConnectionError, TimeoutError))
