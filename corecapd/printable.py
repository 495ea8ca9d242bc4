"""Text that jobs chose (thread names, environment values, command lines), made safe to
print to a terminal or a line-oriented log: for corecapctl and for the daemon's stderr."""

from __future__ import annotations

import unicodedata


def visible(text: str) -> str:
    """`text` safe for a terminal: control characters (C0 with newline and escape, DEL,
    C1), format characters (bidirectional overrides), line and paragraph separators and
    lone surrogates as visible escapes (`\\x1b`, `\\u202e`), the rest as it is.

    Thread names, environment values and command lines are whatever a job chose: printed
    raw, they could retitle root's terminal, clear it, or forge a line of output."""
    if text.isprintable():
        return text  # the common case, in C (isprintable is False for every class below)
    return "".join(
        _escape(char) if unicodedata.category(char) in _UNPRINTED else char for char in text
    )


def visible_lines(text: str) -> str:
    """`text` through `visible` line by line: its own line breaks stay, no others appear.
    For messages that quote a policy's keys or a daemon's reply, whoever wrote those."""
    return "\n".join(visible(line) for line in text.split("\n"))


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


# Unicode categories escaped: control (C0, DEL, C1), format, surrogate, private use,
# unassigned, line and paragraph separators.
_UNPRINTED = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
