"""How the commands print: aligned tables, one-line reasons, JSON."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson


def table(rows: Sequence[Sequence[str]]) -> str:
    """Rows as aligned columns (the last column is not padded)."""
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(w) for cell, w in zip(r, widths, strict=False)), r[-1]]).rstrip()
        for r in rows
    )


def one_line(message: str, width: int) -> str:
    """A message on one line, cut to ``width`` characters."""
    text = " ".join(message.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def as_json(document: Any) -> str:
    """Indented JSON for ``--json`` output."""
    return orjson.dumps(document, option=orjson.OPT_INDENT_2).decode()
