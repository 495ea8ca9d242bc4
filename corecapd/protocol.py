"""The socket protocol: one JSON object per line each way. Pure codec, validated here.

Request:  {"command": "status"}            (ping, status, violations, reload)
          {"command": "explain", "pid": 1234}
          {"command": "register", "declaration": {"cpus": 2, "intra_op": null, ...},
           "tensorflow_initialized": false, "pools": [{"layer": "openblas", "threads": 2}]}
          {"command": "report", "epoch": 3, "threads": 15}
          {"command": "report", "pools": [{"layer": "openblas", "threads": 1}]}
Reply:    {"ok": true, "result": ...}  or  {"ok": false, "error": "what was wrong"}

`register` and `report` speak for the calling process, identified by SO_PEERCRED: a
client can only ever register itself. A `report` carries an epoch's thread count, or the
pools the registered process runs (read after its library applied its limits; they replace
those it registered with), or both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corecapd.declaration import (
    DeclarationError,
    Pool,
    Registration,
    pools_from,
    registration_from,
)

PID_MAX = 1 << 22  # the kernel's PID_MAX_LIMIT on 64-bit: every PID is below it
MAX_LINE = 64 * 1024
# Arrays and objects inside one request: a register request nests 3 deep
# ({"pools": [{...}]}); deeper is refused before anything walks it.
MAX_DEPTH = 8
# Each command and the keys its request may carry besides "command".
COMMANDS: dict[str, frozenset[str]] = {
    "ping": frozenset(),
    "status": frozenset(),
    "violations": frozenset(),
    "reload": frozenset(),
    "explain": frozenset({"pid"}),
    # "pid" is accepted and ignored: a process registers itself, whatever it claims
    "register": frozenset({"declaration", "tensorflow_initialized", "pools", "pid"}),
    "report": frozenset({"epoch", "threads", "pools"}),
}
ROOT_ONLY = frozenset({"reload"})


class ProtocolError(ValueError):
    """A message that does not follow the protocol; the text is sent back as the error."""


class CommandFailed(Exception):
    """A valid request the daemon could not carry out; the text is sent back as the error."""


class RemoteError(Exception):
    """The daemon answered with an error."""


@dataclass(frozen=True)
class EpochReport:
    epoch: int
    threads: int


@dataclass(frozen=True)
class Request:
    command: str
    pid: int | None = None  # explain; for register, the PID a client claimed (ignored)
    registration: Registration | None = None  # register
    report: EpochReport | None = None  # report: an epoch's thread count
    pools: tuple[Pool, ...] | None = None  # report: the pools the process runs now


def decode_request(line: bytes) -> Request:
    """One request line (bytes as received, the newline included or not) as a Request.

    Raises:
        ProtocolError: for anything else, whatever the bytes: not UTF-8, not JSON, an
            integer past Python's digit limit, nesting deeper than MAX_DEPTH, a line over
            MAX_LINE bytes, an unknown command or key, a value out of range.
    """
    if len(line) > MAX_LINE:
        raise ProtocolError(f"request longer than {MAX_LINE} bytes")
    try:
        message = json.loads(line)
    except ValueError as err:  # not JSON, not UTF-8, an integer over Python's digit limit
        raise ProtocolError(_brief(f"request is not valid JSON: {err}")) from None
    except RecursionError:
        raise ProtocolError(f"request nests deeper than {MAX_DEPTH} levels") from None
    if _depth(message) > MAX_DEPTH:
        raise ProtocolError(f"request nests deeper than {MAX_DEPTH} levels")
    if not isinstance(message, dict):
        raise ProtocolError(f"request must be a JSON object, got {type(message).__name__}")
    command = message.get("command")
    if not isinstance(command, str):
        raise ProtocolError('request needs "command": a string')
    if command not in COMMANDS:
        raise ProtocolError(f"unknown command {command[:64]!r} (known: {', '.join(COMMANDS)})")
    extra = sorted(set(message) - {"command"} - COMMANDS[command])
    if extra:
        raise ProtocolError(f"unknown key {extra[0][:64]!r} in {command} request")
    if command == "explain":
        return Request(command, pid=_count(message, "pid", 1, PID_MAX))
    if command == "report":
        return _report(message)
    if command == "register":
        claimed = _count(message, "pid", 1, PID_MAX) if "pid" in message else None
        try:
            return Request(command, pid=claimed, registration=registration_from(message))
        except DeclarationError as err:
            raise ProtocolError(_brief(f"register: {err}")) from None
    return Request(command)


def _report(message: dict[str, Any]) -> Request:
    """A report of an epoch ("epoch" and "threads"), of the pools ("pools"), or of both."""
    epoch = None
    if "epoch" in message or "threads" in message:
        number = _count(message, "epoch", 0, 1 << 31)
        epoch = EpochReport(number, _count(message, "threads", 1, 1 << 22))
    pools = None
    if "pools" in message:
        try:
            pools = pools_from(message["pools"])
        except DeclarationError as err:
            raise ProtocolError(_brief(f"report: {err}")) from None
    if epoch is None and pools is None:
        raise ProtocolError('report needs "epoch" and "threads", or "pools"')
    return Request("report", report=epoch, pools=pools)


def _brief(message: str, limit: int = 300) -> str:
    """An error message cut to `limit` characters: it may quote what the client sent."""
    return message if len(message) <= limit else f"{message[: limit - 3]}..."


def _depth(value: Any) -> int:
    """How deeply arrays and objects nest in a decoded message (iterative: a message can
    nest as deep as json.loads allowed, and no later step may recurse into it)."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict):
            children = list(item.values())
        elif isinstance(item, list):
            children = item
        else:
            continue
        if children:
            deepest = max(deepest, depth)
            if depth > MAX_DEPTH:
                return depth
            pending.extend((child, depth + 1) for child in children)
    return deepest


def _count(message: dict[str, Any], key: str, lowest: int, highest: int) -> int:
    value = message.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not lowest <= value <= highest:
        raise ProtocolError(f'{message["command"]} needs "{key}": an integer {lowest}-{highest}')
    return value


def root_socket(path: Path) -> Path:
    """The root-only twin of the socket at `path`, which root's clients use: no other user
    can fill its listen queue (/run/corecap/corecap.sock -> /run/corecap/corecap.root.sock)."""
    if not path.name:  # "", ".", "/": no socket can be there, nor beside it
        return path
    return path.with_name(f"{path.stem}.root{path.suffix}")


def encode_request(command: str, **arguments: Any) -> bytes:
    return json.dumps({"command": command, **arguments}).encode() + b"\n"


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
