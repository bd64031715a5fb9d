"""Which broadcast a response row belongs to, when the ESP does not write it in every row.

An account lists its rules (option ``attribution``), tried in order for each row until one answers:

* ``column`` — the row's broadcast-id column (the only rule by default; then every file's header
  must have the column);
* ``file_name`` — the named group ``broadcast_id`` of ``file_name_pattern``, a regular expression
  matched against the whole of the file's name (its last path part, never the path);
* ``communication_key`` — the lists espbridge uploaded to the account: of those that held the row's
  key, the latest uploaded at or before the event's time. The uploader records the keys of every
  list of such an account (:mod:`shared.infra.db.uploaded_lists`) for ``key_lists_days``; before a
  file is parsed, its keys are looked up at once (:func:`parsed_file`, :func:`encoded_file`).

A file none of whose rules can apply (no such column, a name the pattern does not match, no key
column) is refused as a whole by its header; a row no rule attributes is a BadRow naming what
each rule found.
"""

from __future__ import annotations

import bisect
import posixpath
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Self

from pydantic import BeforeValidator, Field, model_validator

from shared.esp.accounts import AccountConfig
from shared.esp.base import BadRow, Connector
from shared.esp.options import ConnectorOptions
from shared.infra.db import Conn, uploaded_lists
from shared.infra.db.uploaded_lists import UploadedList
from shared.model.events import EncodedEvent, encode
from shared.model.messages import ResponseEvent

BROADCAST_GROUP = "broadcast_id"
"""The named group of ``file_name_pattern`` that holds the broadcast id."""


class Rule(StrEnum):
    """A way to find a row's broadcast."""

    COLUMN = "column"
    FILE_NAME = "file_name"
    COMMUNICATION_KEY = "communication_key"


def _one_or_more(value: object) -> object:
    return [value] if isinstance(value, str) else value


class AttributionOptions(ConnectorOptions):
    """The options of a connector whose response files may not name the broadcast in every row."""

    attribution: Annotated[tuple[Rule, ...], BeforeValidator(_one_or_more), Field(min_length=1)] = (
        Rule.COLUMN,
    )
    file_name_pattern: re.Pattern[str] | None = Field(
        default=None, description="a regular expression with a group (?P<broadcast_id>…), for file_name"
    )
    key_lists_days: int = Field(
        default=90, gt=0, description="how long the keys of uploaded lists are kept, for communication_key"
    )

    @model_validator(mode="after")
    def _rules_fit(self) -> Self:
        if len(set(self.attribution)) != len(self.attribution):
            raise ValueError(f"attribution names a rule twice: {[r.value for r in self.attribution]}")
        uses_name = Rule.FILE_NAME in self.attribution
        if uses_name and self.file_name_pattern is None:
            raise ValueError("attribution file_name needs a file_name_pattern")
        if self.file_name_pattern is not None:
            if not uses_name:
                raise ValueError("file_name_pattern is set, but attribution does not name file_name")
            if BROADCAST_GROUP not in self.file_name_pattern.groupindex:
                raise ValueError(f"file_name_pattern needs a named group (?P<{BROADCAST_GROUP}>…)")
        return self

    def rules(self) -> Attribution:
        """The account's attribution."""
        return Attribution(self.attribution, self.file_name_pattern, self.key_lists_days)


class KeyLists:
    """The uploaded lists of one account that held each communication key of a file."""

    def __init__(self, held: Mapping[str, Sequence[UploadedList]], kept_days: int) -> None:
        self._held = held
        self._kept_days = kept_days

    def broadcast(self, key: str, occurred_at: datetime) -> str:
        """The broadcast of the latest list uploaded at or before ``occurred_at`` that held ``key``;
        ValueError saying why there is none."""
        lists = self._held.get(key, ())
        at = bisect.bisect_right(lists, occurred_at, key=lambda held: held.uploaded_at)
        if at > 0:
            return lists[at - 1].job_id
        if not lists:
            raise ValueError(
                f"communication key {key!r} is in no list uploaded to this account "
                f"in the last {self._kept_days} days"
            )
        raise ValueError(
            f"communication key {key!r} is in no list uploaded before the event "
            f"({occurred_at.isoformat()}); the first that held it, {lists[0].job_id}, "
            f"was uploaded at {lists[0].uploaded_at.isoformat()}"
        )


@dataclass(frozen=True, slots=True)
class Attribution:
    """An account's rules, in order (see the module)."""

    rules: tuple[Rule, ...]
    pattern: re.Pattern[str] | None = None
    kept_days: int = 90

    @property
    def by_key(self) -> bool:
        """Whether rows may be attributed by communication key (the uploader records list keys)."""
        return Rule.COMMUNICATION_KEY in self.rules

    @property
    def column_required(self) -> bool:
        """Whether every file's header must have the broadcast-id column (the column is the only rule)."""
        return self.rules == (Rule.COLUMN,)

    def for_file(
        self, remote_path: str, column: str | None, has_keys: bool, lists: KeyLists | None
    ) -> FileAttribution:
        """The rules as they apply to one file: ``column`` is the broadcast-id column's name if its
        header has one, ``has_keys`` whether it has a communication-key column. ValueError when
        none can apply."""
        name = posixpath.basename(remote_path)
        named = None
        if self.pattern is not None:
            found = self.pattern.fullmatch(name)
            named = (found.group(BROADCAST_GROUP) or None) if found else None
        applies = {
            Rule.COLUMN: column is not None,
            Rule.FILE_NAME: named is not None,
            Rule.COMMUNICATION_KEY: has_keys,
        }
        if not any(applies[rule] for rule in self.rules):
            raise ValueError(
                "no row can be attributed to a broadcast: "
                + "; ".join(self._why_not(rule, name) for rule in self.rules)
            )
        return FileAttribution(
            tuple(rule for rule in self.rules if applies[rule]), column or "", named, lists
        )

    def _why_not(self, rule: Rule, name: str) -> str:
        if rule is Rule.COLUMN:
            return "the header has no broadcast-id column"
        if rule is Rule.FILE_NAME:
            assert self.pattern is not None
            return f"the file name {name!r} does not match file_name_pattern '{self.pattern.pattern}'"
        return "the header has no communication-key column"


@dataclass(frozen=True, slots=True)
class FileAttribution:
    """The rules that can apply to the rows of one file, in the account's order."""

    rules: tuple[Rule, ...]
    column: str
    """The broadcast-id column's name (for messages)."""
    named: str | None
    """The broadcast the file's name gives."""
    lists: KeyLists | None
    """The lists holding the file's keys; None when they were not looked up."""

    def needs_lookup(self, value: str) -> bool:
        """Whether a row with this broadcast-id value is left to its communication key."""
        for rule in self.rules:
            if rule is Rule.COLUMN and value:
                return False
            if rule is Rule.FILE_NAME:
                return False  # it applies to the file, so to every row
            if rule is Rule.COMMUNICATION_KEY:
                return True
        return False

    def broadcast(self, value: str, key: str, occurred_at: datetime) -> str:
        """A row's broadcast from its broadcast-id value, communication key and time; ValueError
        naming what each rule found."""
        why: list[str] = []
        for rule in self.rules:
            if rule is Rule.COLUMN:
                if value:
                    return value
                why.append(f"empty {self.column}")
            elif rule is Rule.FILE_NAME and self.named:
                return self.named
            elif rule is Rule.COMMUNICATION_KEY:
                if not key:
                    why.append("no communication key")
                elif self.lists is None:
                    why.append(f"communication key {key!r} was not looked up in the uploaded lists")
                else:
                    try:
                        return self.lists.broadcast(key, occurred_at)
                    except ValueError as exc:
                        why.append(str(exc))
        raise ValueError("; ".join(why))


class KeyAttributed:
    """A connector whose response rows may be attributed by communication key (a mixin of
    :class:`Connector`)."""

    account: AccountConfig
    attribution: Attribution

    def keys_to_look_up(self, local_path: Path, remote_path: str) -> set[str]:
        """The communication keys of a file's rows that only their key can attribute."""
        raise NotImplementedError

    def parse_with_lists(
        self, local_path: Path, remote_path: str, lists: KeyLists
    ) -> Iterator[ResponseEvent | BadRow]:
        """:meth:`Connector.parse_response_file` with the lists that held the file's keys."""
        raise NotImplementedError


def kept_days(connector: Connector) -> int | None:
    """How long the keys of the account's uploaded lists are kept; None when it does not attribute
    rows by key (its lists are not recorded)."""
    if isinstance(connector, KeyAttributed) and connector.attribution.by_key:
        return connector.attribution.kept_days
    return None


async def parsed_file(
    connector: Connector, local_path: Path, remote_path: str, conn: Conn
) -> Iterator[ResponseEvent | BadRow]:
    """The events and BadRows of a response file, its keys looked up first where the account
    attributes rows by key."""
    if not (isinstance(connector, KeyAttributed) and connector.attribution.by_key):
        return connector.parse_response_file(local_path, remote_path)
    keys = connector.keys_to_look_up(local_path, remote_path)
    account = connector.account
    held = await uploaded_lists.lists_holding(conn, account.esp, account.account, keys) if keys else {}
    lists = KeyLists(held, connector.attribution.kept_days)
    return connector.parse_with_lists(local_path, remote_path, lists)


async def encoded_file(
    connector: Connector, local_path: Path, remote_path: str, conn: Conn
) -> Iterator[EncodedEvent | BadRow]:
    """:func:`parsed_file` with the events in their wire form (the gatherer's path)."""
    if kept_days(connector) is None:
        return connector.encode_response_file(local_path, remote_path)
    items = await parsed_file(connector, local_path, remote_path, conn)
    return (item if isinstance(item, BadRow) else encode(item) for item in items)
