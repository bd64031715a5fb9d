"""Connector options: an account's ``options`` read into its connector's model, the same way for all.

A connector's ``Options`` subclasses :class:`ConnectorOptions` and declares, besides its fields:

* ``MERGED`` — dict options an account gives in part: its entries are laid over these defaults;
* ``ROLE_KEYED`` — of those, the ones keyed by a fixed set of roles (the defaults' keys): an
  unknown role is refused.

The list file's format comes from the options named as every connector names them
(:data:`LIST_FORMAT_OPTIONS`) and what else the connector gives (:meth:`ConnectorOptions.list_format`).

Fields typed :data:`TimeZone`, :data:`DateFormat`, :data:`TimeFormats` or :data:`Encoding` are
checked when the options are read, so a connector never meets an unknown zone, a format it cannot
read back or an unknown codec later. :meth:`ConnectorOptions.of` turns every refusal into a
ConfigurationError naming the account.
"""

from __future__ import annotations

import codecs
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from shared.esp.accounts import AccountConfig
from shared.esp.base import ListFormat
from shared.esp.rows import ISO, UNIX
from shared.model.errors import ConfigurationError


def _known_zone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r}") from None
    return name


def _readable_format(fmt: str) -> str:
    sample = datetime(2026, 11, 22, 10, 0, 3, tzinfo=UTC)  # aware, so %z and %Z read back too
    try:
        datetime.strptime(sample.strftime(fmt), fmt)
    except ValueError as exc:
        raise ValueError(f"{fmt!r} cannot be read back: {exc}") from None
    return fmt


def _one_or_more(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _readable_formats(formats: tuple[str, ...]) -> tuple[str, ...]:
    for fmt in formats:
        if fmt not in (UNIX, ISO):
            _readable_format(fmt)
    return formats


def _known_encoding(name: str) -> str:
    try:
        codecs.lookup(name)
    except LookupError:
        raise ValueError(f"{name!r} is not a known encoding") from None
    return name


TimeZone = Annotated[str, AfterValidator(_known_zone)]
"""An IANA time zone name (``Europe/Berlin``)."""
DateFormat = Annotated[str, Field(min_length=1), AfterValidator(_readable_format)]
"""A strptime pattern whose output it reads back."""
TimeFormats = Annotated[
    tuple[Annotated[str, Field(min_length=1)], ...],
    BeforeValidator(_one_or_more),
    Field(min_length=1),
    AfterValidator(_readable_formats),
]
"""The formats an account writes times in, tried in order (see :class:`~shared.esp.rows.LocalTimes`):
``unix``, ``iso`` or strptime patterns; one format may be given as a plain string."""
Encoding = Annotated[str, AfterValidator(_known_encoding)]
"""A codec Python knows."""


LIST_FORMAT_OPTIONS = {
    "delimiter": "list_delimiter",
    "encoding": "list_encoding",
    "line_terminator": "list_line_terminator",
    "email_field": "email_column",
    "key_field": "key_column",
    "suffix": "list_suffix",
}
"""The options of a connector that has them, by the :class:`ListFormat` field they set."""


class ConnectorOptions(BaseModel):
    """Base of every connector's ``Options``: frozen, unknown options refused (see the module)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    MERGED: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    ROLE_KEYED: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def of(cls, account: AccountConfig) -> Self:
        """The account's options; invalid ones are a ConfigurationError naming the account."""
        try:
            return cls.model_validate(account.options)
        except ValidationError as exc:
            raise ConfigurationError(f"account {account.name} options: {exc}") from None

    def list_format(self, **given: str) -> ListFormat:
        """The list file's format: the :data:`LIST_FORMAT_OPTIONS` this model has, then ``given``."""
        named = {
            field: getattr(self, name) for field, name in LIST_FORMAT_OPTIONS.items() if hasattr(self, name)
        }
        return ListFormat(**{**named, **given})

    @classmethod
    def merged_defaults(cls, given: Mapping[str, Any]) -> Mapping[str, Mapping[str, Any]]:
        """The defaults each merged option is laid over; a connector may derive one from ``given``."""
        return cls.MERGED

    @classmethod
    def laid_over_defaults(cls, given: dict[str, Any]) -> dict[str, Any]:
        """The account's options with every merged option laid over its defaults."""
        merged = dict(given)
        for name, defaults in cls.merged_defaults(given).items():
            value = given.get(name, {})
            if isinstance(value, dict):
                merged[name] = {**defaults, **value}
        return merged

    @model_validator(mode="before")
    @classmethod
    def _merge(cls, data: Any) -> Any:
        return cls.laid_over_defaults(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _known_roles(self) -> Self:
        for name in self.ROLE_KEYED:
            known = set(self.MERGED[name])
            unknown = set(getattr(self, name)) - known
            if unknown:
                raise ValueError(f"{name} has unknown roles {sorted(unknown)} (known: {sorted(known)})")
        return self
