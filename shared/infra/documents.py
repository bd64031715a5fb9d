"""Files an operator writes (the ESP accounts, a broadcast job): JSON when the name ends in
``.json``, YAML otherwise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import yaml


class DocumentError(ValueError):
    """A file that does not parse; its text is the parser's reason."""

    def __init__(self, form: str, reason: str) -> None:
        super().__init__(reason)
        self.form = form
        """``JSON`` or ``YAML``."""


def read_document(path: Path) -> Any:
    """What a JSON or YAML file holds; raises OSError when it cannot be read and
    :class:`DocumentError` when it does not parse."""
    raw = path.read_bytes()
    if path.suffix == ".json":
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise DocumentError("JSON", str(exc)) from None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise DocumentError("YAML", str(exc)) from None
