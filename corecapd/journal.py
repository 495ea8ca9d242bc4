"""Where events go: the journal with structured fields under systemd, readable lines otherwise.

Also the service manager's notifications (READY, STATUS, WATCHDOG, RELOADING, STOPPING).
systemd-python drops journal messages silently when there is no journald, so the choice is
made from $JOURNAL_STREAM, which systemd sets when our stderr is the journal.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Protocol, TextIO

import systemd.daemon
import systemd.journal

from corecapd.events import Event
from corecapd.printable import visible

SYSLOG_IDENTIFIER = "corecapd"


def under_journal() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM"))


class Sink(Protocol):
    """Where events go: the journal (or stderr) now, metrics next. Called on the loop's
    thread, once per event, in order; must not block."""

    def emit(self, event: Event) -> None: ...


class Reporter:
    """The journal sink (stderr lines outside systemd), and sd_notify."""

    def __init__(self, to_journal: bool, stream: TextIO = sys.stderr) -> None:
        self.to_journal = to_journal
        self.stream = stream

    def emit(self, event: Event) -> None:
        fields = event.fields()
        if self.to_journal:
            systemd.journal.send(
                event.message(),
                MESSAGE_ID=event.message_id,
                PRIORITY=str(event.priority),
                SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER,
                CORECAP_EVENT=event.kind,
                **fields,
            )
            return
        details = " ".join(
            f"{k.removeprefix('CORECAP_').lower()}={_quote(v)}" for k, v in fields.items()
        )
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        # One line per event whatever a job named its threads (no forged lines or escapes).
        message = visible(event.message())
        self.stream.write(f"{stamp} corecapd[{os.getpid()}]: {event.kind}: {message} | {details}\n")
        self.stream.flush()

    def notify(self, *states: str) -> None:
        """sd_notify; a no-op when not started by systemd (no $NOTIFY_SOCKET)."""
        systemd.daemon.notify("\n".join(states))

    def inherited_sockets(self) -> list[int]:
        """The file descriptors of the sockets systemd handed over (socket activation:
        $LISTEN_FDS for this PID, unset once read); [] when none."""
        fds: list[int] = systemd.daemon.listen_fds()
        return fds


# What makes a value need quotes: whitespace (str.isspace's, as `\s` matches in a str
# pattern) and the line's own separators; one scan in C, not a generator per character.
_NEEDS_QUOTES = re.compile(r'[\s"|=]')


def _quote(value: str) -> str:
    safe = value and value.isprintable() and _NEEDS_QUOTES.search(value) is None
    return value if safe else json.dumps(value)  # escapes control characters too
