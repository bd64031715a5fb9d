"""The loader's rules (no I/O)."""

from __future__ import annotations

from shared.messages import ResponseEvent


def source_text(event: ResponseEvent) -> str:
    """The event's origin as one readable string, e.g. ``file:responses/x.csv:12``."""
    src = event.source
    where = src.name
    if src.line is not None:
        where += f":{src.line}"
    elif src.page is not None:
        where += f"#page={src.page}"
    return f"{src.kind}:{where}"
