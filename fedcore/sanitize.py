"""Strings from the network, made safe to print: no terminal escapes, no control characters,
bounded length.

A worker chooses its error messages, abort reasons, dataset descriptions and metric names. A
hostile one can put ANSI escape sequences in them (to rewrite the coordinator's terminal, hide
log lines or fake others), carriage returns and newlines (to forge log lines), bidirectional
overrides (to make text read differently than it is), or megabytes of text. :func:`printable`
keeps ordinary text as it is and makes everything else visible and harmless.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["DEFAULT_LIMIT", "printable"]

#: Characters kept of one string by default.
DEFAULT_LIMIT = 200

# ECMA-48 escape sequences: CSI (ESC [ ... final), OSC (ESC ] ... BEL or ST), and two-byte
# escapes; also the 8-bit CSI introducer.
_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC
    r"|\x1b[@-Z\\-_]"  # other two-character escapes
    r"|\x9b[0-?]*[ -/]*[@-~]"  # 8-bit CSI
)


def _visible(ch: str) -> str:
    # Cc: control characters (C0, DEL, C1); Cf: format characters (bidi overrides, zero-width
    # joiners); Cs/Co/Cn: surrogates, private use, unassigned; Zl/Zp: line/paragraph separators.
    if ch == " " or unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
        return ch
    return f"\\u{ord(ch):04x}" if ord(ch) > 0xFF else f"\\x{ord(ch):02x}"


def printable(text: str, limit: int = DEFAULT_LIMIT) -> str:
    """``text`` without escape sequences, with control and format characters shown as
    ``\\xNN``/``\\uNNNN``, cut to ``limit`` characters (saying how many were cut)."""
    cut = len(text) - limit * 4
    if cut > 0:
        # Bound the work on huge input before the regex and the per-character pass.
        text = text[: limit * 4]
    clean = "".join(_visible(ch) for ch in _ESCAPES.sub("", text))
    if len(clean) > limit or cut > 0:
        dropped = max(len(clean) - limit, 0) + max(cut, 0)
        return f"{clean[:limit]}...[{dropped} more]"
    return clean
