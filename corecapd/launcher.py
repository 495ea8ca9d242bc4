"""corecap run: register with corecapd, size every layer through the environment, exec.

The job keeps the registration across exec (same PID), and the library in the job finds
its grant in CORECAP_* variables.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from corecapd import __version__, bench
from corecapd.job import CorecapWarning, grant_environment, register
from corecapd.policy import SOCKET_DEFAULT


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="corecap", description="Run a job with its threads sized to the cores it is granted."
    )
    parser.add_argument("--version", action="version", version=f"corecap {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="register, set the environment, exec CMD")
    run.add_argument("--cpus", type=_positive, help="cores to ask for (default: the rule's)")
    run.add_argument("--intra-op", type=_positive, help="TensorFlow intra-op threads")
    run.add_argument("--inter-op", type=_positive, help="TensorFlow inter-op threads")
    run.add_argument("--data-workers", type=_positive, help="tf.data private pool threads")
    run.add_argument("--blas", type=_positive, help="BLAS / OpenMP threads")
    run.add_argument("--socket", help=f"corecapd's socket (default: {SOCKET_DEFAULT})")
    run.add_argument("job", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    bench.add_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench.main(args, parser)
    job = args.job[1:] if args.job[:1] == ["--"] else args.job
    if not job:
        parser.error("run: give the command after --, e.g. corecap run --cpus 2 -- python train.py")

    # No daemon, or one that refuses (busy): the job runs all the same; say why, one line.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CorecapWarning)
        plan = register(
            cpus=args.cpus,
            intra_op=args.intra_op,
            inter_op=args.inter_op,
            data_workers=args.data_workers,
            blas=args.blas,
            socket=args.socket,
        )
    for warning in caught:
        print(
            f"corecap: warning: {str(warning.message).removeprefix('corecapd: ')}", file=sys.stderr
        )
    os.environ.update(grant_environment(plan))
    try:
        os.execvp(job[0], job)
    except OSError as err:
        print(f"corecap: cannot run {job[0]!r}: {err.strerror}", file=sys.stderr)
        return 127


_positive = bench.whole_number(1)


if __name__ == "__main__":
    sys.exit(main())
