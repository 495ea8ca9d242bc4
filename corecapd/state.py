"""What must survive a daemon restart: the jobs that registered and what they declared.

Fences survive on their own (cgroups outlive the daemon and are adopted by name); the
declarations live only in the daemon, so they are written to `<state_dir>/state.json`,
atomically (write, fsync, rename), whenever the set of registered jobs changes.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from corecapd.declaration import DeclarationError, Registration, registration_from

STATE_FILE = "state.json"
VERSION = 1


class StateError(ValueError):
    """A state file that cannot be used; the daemon starts without it and says so."""


def registration_document(registration: Registration) -> dict[str, Any]:
    return {
        "declaration": registration.declaration.as_dict(),
        "tensorflow_initialized": registration.tensorflow_initialized,
        "pools": [{"layer": p.layer, "threads": p.threads} for p in registration.pools],
    }


def save_state(state_dir: Path, registrations: Iterable[tuple[str, Registration]]) -> None:
    document = {
        "version": VERSION,
        "registrations": {name: registration_document(r) for name, r in registrations},
    }
    state_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=state_dir, prefix=".state-")
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(document, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, state_dir / STATE_FILE)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_state(state_dir: Path) -> Mapping[str, Registration]:
    """The registrations a previous daemon saved (job name -> registration); {} if none."""
    path = state_dir / STATE_FILE
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StateError(f"{path}: unreadable: {err}") from None
    if not isinstance(document, dict) or document.get("version") != VERSION:
        raise StateError(f"{path}: not a version {VERSION} corecapd state file")
    saved = document.get("registrations")
    if not isinstance(saved, dict):
        raise StateError(f"{path}: registrations: expected an object")
    registrations = {}
    for name, entry in saved.items():
        if not isinstance(entry, dict):
            raise StateError(f"{path}: registrations[{name!r}]: expected an object")
        try:
            registrations[name] = registration_from(entry)
        except DeclarationError as err:
            raise StateError(f"{path}: registrations[{name!r}]: {err}") from None
    return registrations
