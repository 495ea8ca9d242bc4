"""What must survive a daemon restart: the jobs that registered and what they declared.

Fences survive on their own (cgroups outlive the daemon and are adopted by name); the
declarations live only in the daemon, so they are written to `<state_dir>/state.json`,
atomically (write, fsync, rename), whenever the set of registered jobs changes.

A state file is data from disk, so it is read as untrusted: never more than
`MAX_STATE_BYTES` (checked with fstat before reading), at most `MAX_REGISTRATIONS` entries,
only from a regular file (not a symlink) that is owned by root (or the daemon's own user) and
not writable by group or others, in a directory of the same kind, and only when written in
this boot. Each entry keeps the uid its process had when it registered: the daemon applies
it again only to the same process (PID and start time) running as that uid
(`JobTable.restore`). Anything else is a `StateError`; the daemon starts without the state
and reports why (StateProblem).

Format (version 2): `{"version": 2, "boot_id": "...", "registrations": {"<pid>-<start
ticks>": {"uid": 1000, "declaration": {...}, "tensorflow_initialized": false, "pools":
[...]}}}`. A file of another version (version 1 had no uid) is not read.
"""

from __future__ import annotations

import json
import os
import re
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from corecapd.declaration import DeclarationError, Registration, registration_from
from corecapd.model import KeptRegistration

STATE_FILE = "state.json"
VERSION = 2
# Bounds on what is read from disk. A registration takes ~200 bytes (at most ~7 KB with 64
# pools), so thousands of registered jobs fit; save_state leaves out what would not.
MAX_STATE_BYTES = 4 * 1024 * 1024
MAX_REGISTRATIONS = 4096
MAX_UID = 2**32 - 2  # (uid_t)-1 means "no uid"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
_JOB_NAME = re.compile(r"[0-9]{1,10}-[0-9]{1,20}")


class StateError(ValueError):
    """A state file that cannot be used; the daemon starts without it and says so."""


def current_boot_id(path: Path = BOOT_ID) -> str:
    """This boot's id: a state file written in another boot names processes that are gone."""
    try:
        return path.read_text().strip()
    except OSError:
        return ""  # no such file (some containers): not checked


def registration_document(registration: Registration) -> dict[str, Any]:
    return {
        "declaration": registration.declaration.as_dict(),
        "tensorflow_initialized": registration.tensorflow_initialized,
        "pools": [{"layer": p.layer, "threads": p.threads} for p in registration.pools],
    }


def save_state(
    state_dir: Path,
    registrations: Iterable[tuple[str, KeptRegistration]],
    boot_id: str | None = None,
) -> int:
    """Write the registrations (job name -> kept registration), within the limits
    `load_state` reads; returns how many were left out to stay within them (0 normally)."""
    boot = current_boot_id() if boot_id is None else boot_id
    head = f'{{"version": {VERSION}, "boot_id": {json.dumps(boot)}, "registrations": {{'
    entries: list[str] = []
    size, left_out = len(head) + 2, 0
    for name, kept in registrations:
        document = {"uid": kept.uid, **registration_document(kept.registration)}
        entry = f"{json.dumps(name)}: {json.dumps(document)}"
        if len(entries) == MAX_REGISTRATIONS or size + len(entry) + 2 > MAX_STATE_BYTES:
            left_out += 1
            continue
        entries.append(entry)
        size += len(entry) + 2
    state_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=state_dir, prefix=".state-")  # mode 0600
    try:
        with os.fdopen(handle, "w") as file:
            file.write(head + ", ".join(entries) + "}}")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, state_dir / STATE_FILE)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return left_out


def load_state(state_dir: Path, boot_id: str | None = None) -> dict[str, KeptRegistration]:
    """The registrations a previous daemon saved (job name -> kept registration); {} if
    there is no state file. `boot_id`: this boot's (read when None)."""
    path = state_dir / STATE_FILE
    raw = _read_trusted(path)
    if raw is None:
        return {}
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError) as err:  # also not UTF-8, and 5,000-digit numbers
        raise StateError(f"{path}: unreadable: {err}") from None
    if not isinstance(document, dict) or not isinstance(document.get("version"), int):
        raise StateError(f"{path}: not a corecapd state file")
    if document["version"] != VERSION:
        raise StateError(
            f"{path}: a version {document['version']} state file (this corecapd reads"
            f" version {VERSION}, which keeps who registered): its registrations are not"
            " restored"
        )
    boot = current_boot_id() if boot_id is None else boot_id
    if document.get("boot_id") != boot:
        raise StateError(f"{path}: written before this boot: its processes are gone")
    saved = document.get("registrations")
    if not isinstance(saved, dict):
        raise StateError(f"{path}: registrations: expected an object")
    if len(saved) > MAX_REGISTRATIONS:
        raise StateError(
            f"{path}: {len(saved)} registrations, more than the {MAX_REGISTRATIONS} a state"
            " file may hold"
        )
    registrations = {}
    for name, entry in saved.items():
        where = f"{path}: registrations[{name[:40]!r}]"
        if not _JOB_NAME.fullmatch(name):
            raise StateError(f"{where}: not a job name (<pid>-<start ticks>)")
        if not isinstance(entry, dict):
            raise StateError(f"{where}: expected an object")
        uid = entry.get("uid")
        if isinstance(uid, bool) or not isinstance(uid, int) or not 0 <= uid <= MAX_UID:
            raise StateError(f"{where}.uid: expected the uid that registered")
        try:
            registrations[name] = KeptRegistration(uid, registration_from(entry))
        except DeclarationError as err:
            raise StateError(f"{where}: {err}") from None
    return registrations


def _read_trusted(path: Path) -> bytes | None:
    """The file's bytes, if it is one corecapd could have written; None if it is absent."""
    try:
        # No symlink; a FIFO must not block the start (it is refused below).
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise StateError(f"{path}: cannot open: {err.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):  # before fdopen, which refuses a directory itself
        os.close(fd)
        raise StateError(f"{path}: not a regular file")
    with os.fdopen(fd, "rb") as file:
        _check_owner(path, info)
        try:
            _check_owner(path.parent, os.stat(path.parent))
        except OSError as err:
            raise StateError(f"{path.parent}: {err.strerror}") from None
        if info.st_size > MAX_STATE_BYTES:
            raise StateError(
                f"{path}: {info.st_size} bytes, more than the {MAX_STATE_BYTES} a state file"
                " may have: not read"
            )
        try:
            raw = file.read(MAX_STATE_BYTES + 1)
        except OSError as err:
            raise StateError(f"{path}: unreadable: {err.strerror}") from None
    if len(raw) > MAX_STATE_BYTES:  # it grew since fstat
        raise StateError(f"{path}: more than {MAX_STATE_BYTES} bytes: not read")
    return raw


def _check_owner(path: Path, info: os.stat_result) -> None:
    """Only root (or the daemon's own user) can have written it."""
    if info.st_uid not in (0, os.geteuid()):
        raise StateError(f"{path}: owned by uid {info.st_uid}, not by root: not trusted")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StateError(
            f"{path}: writable by group or others (mode {stat.S_IMODE(info.st_mode):04o}):"
            " not trusted"
        )
