"""The `corecapd` command: the daemon, or one line saying which extra it needs.

`pip install corecap` brings the job library, `corecap run` and `corecapctl` (pure Python);
the daemon's own dependencies come with `pip install 'corecap[daemon]'`. Without them,
`corecapd` says so and exits 1 instead of a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

# What corecapd imports beyond the job library's dependencies (pyproject.toml's `daemon` extra).
DAEMON_MODULES = ("systemd", "jeepney")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        from corecapd.daemon import main as daemon_main
    except ModuleNotFoundError as err:
        if (err.name or "").partition(".")[0] not in DAEMON_MODULES:
            raise
        print(
            f"corecapd: the daemon needs its dependencies ({err.name} is not installed):"
            " pip install 'corecap[daemon]'",
            file=sys.stderr,
        )
        return 1
    return daemon_main(argv)


if __name__ == "__main__":
    sys.exit(main())
