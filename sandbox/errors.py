"""The error every handler may raise: the API answers it with ``{"error": code, "message": message}``."""

from __future__ import annotations

from collections.abc import Mapping


class EspError(Exception):
    """An error the API answers with ``{"error": code, "message": message}``, ``status`` and ``headers``.

    ``headers`` are added to the answer (e.g. ``Retry-After`` of a 429). A flavor whose ESP answers
    errors in another body shape catches it in its own middleware or handlers.
    """

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
