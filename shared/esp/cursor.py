"""Stored pull cursors: a connector's position in an ESP's API, kept by the gatherer as JSON text.

A connector declares its cursor as a :class:`StoredCursor` model; every cursor is a JSON object
whose ``v`` is the model's ``VERSION``, then its fields in declaration order. A cursor of an older
version named in the model's ``UPGRADES`` is read as the current one. Reading is strict: a cursor
of another version, or of another shape (a missing field, a count that is negative or not
an integer, a date that is not one), raises :class:`CursorError` saying which, and the connector
then pulls the broadcast from the start (:meth:`StoredCursor.read`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Annotated, Any, ClassVar, Self

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger(__name__)

Count = Annotated[int, Field(ge=0)]
"""A position or a number of items read (a JSON integer, never a boolean)."""


class CursorError(ValueError):
    """Stored cursor text that is not a cursor of this connector and version."""


class StoredCursor(BaseModel):
    """Base of a connector's cursor: versioned JSON, read strictly, written compactly."""

    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)

    VERSION: ClassVar[int] = 1
    UPGRADES: ClassVar[Mapping[int, Callable[[dict[str, Any]], dict[str, Any]]]] = {}
    """Older versions still read: version → the fields of such a cursor as this version's."""

    def dump(self) -> str:
        """The cursor as stored: ``{"v": VERSION, <fields>…}``."""
        return orjson.dumps({"v": self.VERSION, **self.model_dump(mode="json", by_alias=True)}).decode()

    @classmethod
    def load(cls, text: str) -> Self:
        """The cursor of stored text; a CursorError says why it is not one of this version."""
        try:
            data = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise CursorError(f"a cursor that is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise CursorError(f"a cursor that is not a JSON object but {type(data).__name__}")
        version = data.get("v")
        if version != cls.VERSION:
            upgrade = cls.UPGRADES.get(version) if type(version) is int else None
            if upgrade is None:
                raise CursorError(f"a cursor of version {version!r}, not {cls.VERSION}")
            text = orjson.dumps({**upgrade(data), "v": cls.VERSION}).decode()
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            fields = ", ".join(".".join(str(p) for p in e["loc"]) or "the cursor" for e in exc.errors())
            raise CursorError(
                f"a version {version} cursor of another shape: {fields} missing or wrong"
            ) from None

    @classmethod
    def read(cls, text: str | None, account: str, **context: Any) -> Self | None:
        """The stored cursor, or None (pull from the start) when there is none or it is unreadable."""
        if not text:
            return None
        try:
            return cls.load(text)
        except CursorError as exc:
            log.warning(
                "unreadable pull cursor, pulling the broadcast from the start",
                extra={"account": account, "error": str(exc), **context},
            )
            return None
