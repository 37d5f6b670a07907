"""Text from a plan or from torch, made safe to print: every string a plan carries is hostile.

:func:`escape` shows every non-printable character (and the backslash) as an escape
(``\\x1b``), so no name can move the cursor, erase a line or write over a review;
:func:`one_line` is how an exception torch raised on a hostile graph becomes part of a
refusal: its first line, escaped and bounded.
"""

from __future__ import annotations

__all__ = ["escape", "one_line", "printable"]


def escape(text: str) -> str:
    """``text`` with every non-printable character (and backslash) shown as an escape."""
    return "".join(
        c if c.isprintable() and c != "\\" else c.encode("unicode_escape").decode("ascii")
        for c in text
    )


def printable(text: str) -> str:
    """``text`` with its non-printable characters escaped (backslashes left as they are)."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``TypeName: first line of the message``, escaped, at most ``limit`` characters."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return escape(text)[:limit]
