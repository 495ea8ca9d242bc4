"""corecap: keep Python / TensorFlow jobs inside their CPU core budget."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["CorecapWarning", "Plan", "register"]

if TYPE_CHECKING:
    from corecapd.job import CorecapWarning, Plan, register


def __getattr__(name: str) -> Any:
    """The job library on first use (PEP 562): the daemon imports this package too, and
    the library's import hooks (importlib.abc) add 0.9 MB to the daemon's RSS."""
    if name in __all__:
        from corecapd import job

        return getattr(job, name)
    raise AttributeError(f"module 'corecapd' has no attribute {name!r}")
