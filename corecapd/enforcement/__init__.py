"""Enforcement backends, in the order `backend = "auto"` tries them."""

from __future__ import annotations

from corecapd.enforcement.affinity import AffinityBackend
from corecapd.enforcement.base import Backend, EnforcementError

BACKENDS: tuple[type[Backend], ...] = (AffinityBackend,)


class NoBackend(Exception):
    pass


def choose_backend(requested: str) -> tuple[type[Backend], str]:
    """The backend class for the policy's `daemon.backend`, and why it was chosen."""
    for backend in BACKENDS:
        if requested not in ("auto", backend.name):
            continue
        reason = backend.unavailable_reason()
        if reason is None:
            why = "configured" if requested == backend.name else "first available"
            return backend, why
        if requested == backend.name:
            raise NoBackend(f"daemon.backend = {requested!r} cannot work here: {reason}")
    raise NoBackend(f"daemon.backend = {requested!r}: no enforcement backend works on this host")


__all__ = ["BACKENDS", "Backend", "EnforcementError", "NoBackend", "choose_backend"]
