"""corecap: keep Python / TensorFlow jobs inside their CPU core budget."""

__version__ = "0.1.0"

from corecapd.job import CorecapWarning, Plan, register

__all__ = ["CorecapWarning", "Plan", "register"]
