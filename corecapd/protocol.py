"""The socket protocol: one JSON object per line each way. Pure codec, validated here.

Request:  {"command": "status"}            (commands: ping, status, violations, reload)
Reply:    {"ok": true, "result": ...}  or  {"ok": false, "error": "what was wrong"}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_LINE = 64 * 1024
COMMANDS = ("ping", "status", "violations", "reload")
ROOT_ONLY = frozenset({"reload"})


class ProtocolError(ValueError):
    """A message that does not follow the protocol; the text is sent back as the error."""


class CommandFailed(Exception):
    """A valid request the daemon could not carry out; the text is sent back as the error."""


class RemoteError(Exception):
    """The daemon answered with an error."""


@dataclass(frozen=True)
class Request:
    command: str


def decode_request(line: bytes) -> Request:
    if len(line) > MAX_LINE:
        raise ProtocolError(f"request longer than {MAX_LINE} bytes")
    try:
        message = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError(f"request is not valid JSON: {err}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"request must be a JSON object, got {type(message).__name__}")
    command = message.get("command")
    if not isinstance(command, str):
        raise ProtocolError('request needs "command": a string')
    if command not in COMMANDS:
        raise ProtocolError(f"unknown command {command[:64]!r} (known: {', '.join(COMMANDS)})")
    extra = sorted(set(message) - {"command"})
    if extra:
        raise ProtocolError(f"unknown key {extra[0][:64]!r} in {command} request")
    return Request(command)


def encode_request(command: str) -> bytes:
    return json.dumps({"command": command}).encode() + b"\n"


def encode_result(result: Any) -> bytes:
    return json.dumps({"ok": True, "result": result}, separators=(",", ":")).encode() + b"\n"


def encode_error(error: str) -> bytes:
    return json.dumps({"ok": False, "error": error}).encode() + b"\n"


def decode_reply(line: bytes) -> Any:
    """The result of a reply; raises RemoteError for an error reply."""
    try:
        reply = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError(f"reply is not valid JSON: {err}") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise ProtocolError('reply must be a JSON object with "ok"')
    if not reply["ok"]:
        raise RemoteError(str(reply.get("error", "unknown error")))
    return reply.get("result")
