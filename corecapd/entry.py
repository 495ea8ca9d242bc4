"""The `corecapd` command: the daemon, or one line saying which extra it needs.

`pip install corecap` brings the job library, `corecap run` and `corecapctl` (pure Python);
the daemon's own dependencies come with `pip install 'corecap[daemon]'`. Without them,
`corecapd` says which are missing and exits 1 instead of a traceback.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence

# What corecapd imports beyond the job library's dependencies: each module, and the project
# of pyproject.toml's `daemon` extra that brings it (tests/test_packaging.py holds them equal).
DAEMON_MODULES = {
    "systemd": "systemd-python",
    "jeepney": "jeepney",
    "elftools": "pyelftools",
    "prometheus_client": "prometheus-client",
}


def main(argv: Sequence[str] | None = None) -> int:
    if any(importlib.util.find_spec(module) is None for module in DAEMON_MODULES):
        print(missing_message(""), file=sys.stderr)  # some load only when first used
        return 1
    try:
        from corecapd.daemon import main as daemon_main
    except ModuleNotFoundError as err:
        failed = err.name or ""
        if failed.partition(".")[0] not in DAEMON_MODULES:
            raise
        print(missing_message(failed), file=sys.stderr)
        return 1
    return daemon_main(argv)


def missing_message(failed: str) -> str:
    """The line that names every project of the `daemon` extra whose module cannot be found,
    not just the first one the daemon imported; `failed` (the module whose import failed, as
    "systemd.journal") when each is found yet a part of one is not."""
    missing = [
        project
        for module, project in DAEMON_MODULES.items()
        if importlib.util.find_spec(module) is None
    ] or [failed]
    verb = "is" if len(missing) == 1 else "are"
    return (
        f"corecapd: the daemon needs its dependencies ({', '.join(missing)} {verb} not"
        " installed): pip install 'corecap[daemon]'"
    )


if __name__ == "__main__":
    sys.exit(main())
