"""The shape every enforcement backend has (one module each, like threadpoolctl's controllers)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import ClassVar

from corecapd.procfs import ProcFS


class EnforcementError(Exception):
    """A job could not be confined; the message says why and what was allowed."""


class Backend(ABC):
    name: ClassVar[str]

    def __init__(self, procfs: ProcFS, online_cpus: frozenset[int]) -> None:
        self.procfs = procfs
        self.online_cpus = online_cpus

    @classmethod
    @abstractmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot work on this host, or None when it can."""

    @abstractmethod
    def apply(self, pids: Iterable[int], cpus: frozenset[int]) -> int:
        """Confine the processes (all their threads) to `cpus`; idempotent, so it also
        repairs drift. Returns how many threads had to be changed."""

    @abstractmethod
    def release(self, pids: Iterable[int]) -> None:
        """Undo `apply` for processes that stay alive but leave their job."""

    def describe(self) -> str:
        return self.name
