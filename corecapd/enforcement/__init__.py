"""Enforcement backends, in the order `backend = "auto"` tries them."""

from __future__ import annotations

from corecapd.enforcement.affinity import AffinityBackend
from corecapd.enforcement.base import Backend, EnforcementError, Host
from corecapd.enforcement.cgroup1 import Cgroup1Backend
from corecapd.enforcement.cgroup2 import Cgroup2Backend
from corecapd.enforcement.systemd import SystemdBackend

# Fences first, best first; affinity works everywhere and always runs too (the fast path).
BACKENDS: tuple[type[Backend], ...] = (
    SystemdBackend,
    Cgroup2Backend,
    Cgroup1Backend,
    AffinityBackend,
)


class NoBackend(Exception):
    pass


def choose_backend(requested: str, host: Host) -> tuple[Backend, str]:
    """The backend for the policy's `daemon.backend`, and why it was chosen."""
    passed_over: list[str] = []
    for kind in BACKENDS:
        if requested not in ("auto", kind.name):
            continue
        backend = kind(host)
        problem = backend.problem()
        if problem is None:
            if requested == kind.name:
                return backend, "configured"
            return backend, "auto: " + "; ".join([*passed_over, f"{kind.name} works here"])
        if requested == kind.name:
            raise NoBackend(f"daemon.backend = {requested!r} cannot work here: {problem}")
        passed_over.append(f"not {kind.name}: {problem}")
    raise NoBackend(f"daemon.backend = {requested!r}: no enforcement backend works on this host")


__all__ = [
    "BACKENDS",
    "AffinityBackend",
    "Backend",
    "Cgroup1Backend",
    "Cgroup2Backend",
    "EnforcementError",
    "Host",
    "NoBackend",
    "SystemdBackend",
    "choose_backend",
]
