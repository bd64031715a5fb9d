"""The value types the sandbox's settings are made of, each validated here once for every flavor.

A settings class states what a value is (``CommaList``, ``Seconds``, ``TimeZone``…) and pydantic
applies the rule; an invalid value stops ``python -m sandbox`` with exit code 2 and the setting named.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BeforeValidator, Field, PlainSerializer, PlainValidator
from pydantic_settings import NoDecode

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
"""A share of recipients, from 0 to 1."""

Seconds = Annotated[float, Field(ge=0.0)]
"""A duration in seconds, 0 or more."""


def _items(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _comma_list(value: Any) -> Any:
    return tuple(_items(value)) if isinstance(value, str) else value


CommaList = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_comma_list)]
"""``a,b,c`` as a tuple of names; blanks around and between commas are dropped."""


def split_pairs(value: Any) -> Any:
    """``name=value,name=value`` as a dict of texts (a before-validator; other values pass)."""
    if not isinstance(value, str):
        return value
    pairs: dict[str, str] = {}
    for part in _items(value):
        key, sep, item = part.partition("=")
        if not sep or not key.strip() or not item.strip():
            raise ValueError(f"expected name=value, got {part!r}")
        pairs[key.strip()] = item.strip()
    return pairs


Pairs = Annotated[dict[str, str], NoDecode, BeforeValidator(split_pairs)]
"""``name=value,name=value`` as a dict (a setting may read the values further, e.g. as numbers)."""


def names_matching(pattern: re.Pattern[str], what: str, wildcard: Collection[str] = ()) -> AfterValidator:
    """A comma list's check: at least one name, each matching ``pattern`` (or in ``wildcard``), no repeats."""

    def check(value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError(f"at least one {what} is needed")
        for name in value:
            if name not in wildcard and not pattern.fullmatch(name):
                raise ValueError(f"invalid {what} {name!r} (must match {pattern.pattern})")
        return tuple(dict.fromkeys(value))

    return AfterValidator(check)


def name_matching(pattern: re.Pattern[str], what: str) -> AfterValidator:
    """One name's check: it matches ``pattern``."""

    def check(value: str) -> str:
        if not pattern.fullmatch(value):
            raise ValueError(f"invalid {what} {value!r} (must match {pattern.pattern})")
        return value

    return AfterValidator(check)


def _zone(value: Any) -> ZoneInfo:
    if isinstance(value, ZoneInfo):
        return value
    try:
        return ZoneInfo(str(value))
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r}") from None


TimeZone = Annotated[ZoneInfo, PlainValidator(_zone), PlainSerializer(lambda zone: zone.key)]
"""An IANA time zone name (``Europe/London``), read as its ``ZoneInfo``."""


def optional(check: Callable[[str], object]) -> AfterValidator:
    """An optional text's check: empty counts as unset (None); any other value must pass ``check``."""

    def checked(value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        check(value)
        return value

    return AfterValidator(checked)


def _http_url(value: str) -> None:
    if not value.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL")


HttpUrl = Annotated[str | None, optional(_http_url)]
"""An ``http(s)://`` URL, or None when unset or empty."""
