"""corecapctl: who holds which cores, who is over budget, and policy checks."""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from corecapd import __version__
from corecapd.bench import whole_number
from corecapd.client import DaemonUnreachable, call
from corecapd.cpulist import format_cpulist
from corecapd.policy import SOCKET_DEFAULT, PolicyError, daemon_socket
from corecapd.preflight import check_policy_file
from corecapd.printable import visible, visible_lines
from corecapd.protocol import PID_MAX, ProtocolError, RemoteError


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if isinstance(sys.stdout, io.TextIOWrapper):  # a user name a terminal cannot encode
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        return int(args.run(args))
    except (DaemonUnreachable, RemoteError, ProtocolError) as err:
        print(f"corecapctl: {visible_lines(str(err))}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="corecapctl", description="Query and control corecapd, the CPU core budget daemon."
    )
    parser.add_argument(
        "--socket",
        type=Path,
        help=f"corecapd's socket (default: {SOCKET_DEFAULT})",
    )
    parser.add_argument("--version", action="version", version=f"corecapctl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    status = commands.add_parser("status", help="jobs, their cores, threads and budgets")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(run=_status)

    violations = commands.add_parser("violations", help="over-budget episodes, latest last")
    violations.add_argument("--json", action="store_true", help="machine-readable output")
    violations.set_defaults(run=_violations)

    explain = commands.add_parser("explain", help="why a job has the threads it has")
    explain.add_argument(
        "pid", type=whole_number(1, PID_MAX), help="a PID of the job (any of its processes)"
    )
    explain.add_argument("--json", action="store_true", help="machine-readable output")
    explain.set_defaults(run=_explain)

    check = commands.add_parser("check", help="validate a policy file (no daemon needed)")
    check.add_argument("file", type=Path, help="the policy file, e.g. /etc/corecap.toml")
    check.set_defaults(run=_check)

    reload = commands.add_parser("reload", help="make corecapd re-read its policy (root)")
    reload.set_defaults(run=_reload)

    top = commands.add_parser("top", help="a live view of the CPUs and the jobs, like htop")
    top.add_argument(
        "--interval",
        type=_seconds,
        default=2.0,
        metavar="SECONDS",
        help="seconds between refreshes, 0.1 to 3600 (default: 2)",
    )
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.set_defaults(run=_top)
    return parser


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0.1 <= seconds <= 3600:  # nan too
        raise argparse.ArgumentTypeError(f"expected seconds from 0.1 to 3600, found {text!r}")
    return seconds


def _socket(args: argparse.Namespace) -> Path:
    return daemon_socket(None if args.socket is None else str(args.socket))


def _status(args: argparse.Namespace) -> int:
    document = call(_socket(args), "status")
    if args.json:
        print(json.dumps(document, indent=2))
        return 0
    print(format_status(document))
    return 0


def _violations(args: argparse.Namespace) -> int:
    records = call(_socket(args), "violations")
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    print(format_violations(records))
    return 0


def _explain(args: argparse.Namespace) -> int:
    report = call(_socket(args), "explain", pid=args.pid)
    print(json.dumps(report, indent=2) if args.json else format_explanation(report))
    return 0


def _top(args: argparse.Namespace) -> int:
    """The live screen (corecapd.top) on a terminal; the `status` table when the output
    is not one (a pipe, a file), with or without --once."""
    socket_path = _socket(args)
    if not sys.stdout.isatty():
        print(format_status(call(socket_path, "status")))
        return 0
    from corecapd import top  # rich: loaded for this command alone

    return top.run(
        lambda: call(socket_path, "status"),
        lambda pid: call(socket_path, "explain", pid=pid),
        args.interval,
        args.once,
    )


def _check(args: argparse.Namespace) -> int:
    """The policy file checked as corecapd checks it at start (corecapd.preflight), on this
    host: every error on stderr, one per line with its place, then how many; or OK and
    what was found on this host."""
    try:
        checked = check_policy_file(args.file, as_daemon=False)
    except PolicyError as err:
        print(visible_lines(err.counted()), file=sys.stderr)  # it quotes keys: anyone's
        return 1
    policy = checked.policy
    print(f"{args.file}: OK, {len(policy.rules)} rules, mode {policy.daemon.mode}")
    print("on this host, as corecapd would start with it:")
    for finding in checked.host_check.findings:
        print(f"  {finding}")
    return 0


def _reload(args: argparse.Namespace) -> int:
    print(visible_lines(str(call(_socket(args), "reload"))))
    return 0


def _visible_document(value: Any) -> Any:
    """Every string of a reply, keys too, through `visible` (replies nest a few levels)."""
    if isinstance(value, str):
        return visible(value)
    if isinstance(value, dict):
        return {_visible_document(k): _visible_document(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_visible_document(item) for item in value]
    return value


def format_status(document: dict[str, Any]) -> str:
    document = _visible_document(document)
    host = document["host"]
    reserved = format_cpulist(host["reserved_cpus"]) or "none"
    lines = [
        f"corecapd: mode {host['mode']}, backend {host['backend']}, policy {host['policy']}",
        f"CPUs for jobs: {format_cpulist(host['eligible_cpus'])} (reserved: {reserved});"
        f" jobs: {host['jobs']}, over budget: {host['violations']}",
    ]
    rows = [
        [
            str(job["pid"]),
            job["user"],
            ("    " * (depth - 1) + " \\_ " if depth else "") + job["rule"],  # as ps f
            format_cpulist(job["cpus"]),
            f"{job['threads']}/{job['budget']}",
            f"{job['cpu_percent']:.1f}",
            job["state"],
            _age(job["age"]),
        ]
        for depth, job in _nested(document["jobs"])
    ]
    header = ["PID", "USER", "RULE", "CPUS", "THREADS/BUDGET", "CPU%", "STATE", "AGE"]
    if rows:
        lines += ["", *_table(header, rows)]
    return "\n".join(lines)


def _nested(jobs: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """`jobs` (a status reply's) with each sub-job right under its enclosing job, and its
    depth (0: a top-level job); a sub-job whose job is not in the reply (or a loop of
    parents, which a reply should never hold) counts as top-level."""
    pids = {job["pid"] for job in jobs}
    below: dict[int, list[dict[str, Any]]] = {}
    for job in jobs:
        if job.get("parent") in pids:
            below.setdefault(job["parent"], []).append(job)
    ordered: list[tuple[int, dict[str, Any]]] = []
    todo = [(0, job) for job in reversed(jobs) if job.get("parent") not in pids]
    while todo or len(ordered) < len(jobs):
        if not todo:  # a loop: its oldest job as if top-level
            shown = {id(job) for _, job in ordered}
            todo = [(0, next(job for job in jobs if id(job) not in shown))]
            below.pop(todo[0][1]["pid"], None)
        depth, job = todo.pop()
        ordered.append((depth, job))
        todo += [(depth + 1, sub) for sub in reversed(below.pop(job["pid"], []))]
    return ordered


def format_explanation(report: dict[str, Any]) -> str:
    report = _visible_document(report)
    declared = report["declared"]
    lines = [
        f"PID {report['pid']} (job {report['job']}, rule {report['rule']}): {report['state']},"
        f" {report['threads']} threads, budget {report['budget']} on {report['cpus']} CPUs",
        f"budget: {report['budget_basis']}",
        *_members(report.get("members", [])),
        "declared: "
        + (
            ", ".join(f"{k} {v}" for k, v in declared.items())
            if declared
            else "nothing (the job did not register)"
        ),
        "pools reported: "
        + (", ".join(f"{p['layer']} {p['threads']}" for p in report["pools"]) or "none"),
        "threads by name: "
        + ", ".join(
            f"{name} {count}"
            for name, count in sorted(report["thread_names"].items(), key=lambda i: -i[1])
        ),
        "environment: "
        + (
            " ".join(f"{k}={v}" for k, v in report["environment"].items())
            or "no threading variables"
        ),
    ]
    lines += _layers(report)
    if report["epochs"]:
        epochs = ", ".join(f"{e['epoch']}: {e['threads']}" for e in report["epochs"])
        lines.append(f"threads per epoch: {epochs}")
    lines.append("diagnosis:")
    lines += [f"  - {hint}" for hint in report["hints"]] or ["  no single layer stands out"]
    return "\n".join(lines)


def _layers(report: dict[str, Any]) -> list[str]:
    """The job's threads by layer, over all of its processes: each layer's threads, what
    the grant allows it (checked layers), one thread's evidence, and the fix when it is
    wider; then the CPU mask and quota."""
    layers = report.get("layers", [])
    lines = ["threads by layer (over all processes):"] if layers else []
    for layer in layers:
        allowed = "" if layer["expected"] is None else f" of {layer['expected']} for the grant"
        where = f" in {layer['processes']} processes" if layer["processes"] > 1 else ""
        state = ": OVERSIZED" if layer["oversized"] else ""
        lines.append(f"  {layer['name']}: {layer['threads']}{allowed}{where}{state}")
        lines.append(f"      evidence: {layer['evidence']}")
        if layer["fix"]:
            lines.append(f"      fix: {layer['fix']}")
    quota = report.get("quota")
    if quota is not None:
        lines.append(
            f"CPU quota: {quota['cpus']:g} CPUs ({quota['source']}); CPU mask:"
            f" {report['mask_cpus']} CPUs"
        )
    return lines


def _members(members: list[dict[str, Any]]) -> list[str]:
    """One line per process of the job: what it runs, its threads and its budget share."""
    if len(members) < 2:
        return []
    lines = [f"members ({len(members)} processes, threads/budget):"]
    for member in members:
        share = "-" if member["budget"] is None else str(member["budget"])
        lines.append(f"  {member['pid']} {member['kind']} {member['threads']}/{share}")
    return lines


def format_violations(records: list[dict[str, Any]]) -> str:
    if not records:
        return "no violations recorded"
    records = _visible_document(records)
    rows = [
        [
            str(r["pid"]),
            r["rule"],
            str(r["threads"]),
            str(r["budget"]),
            _clock(r["started"]),
            _ended(r),
            r.get("layer") or "threads",
        ]
        for r in records
    ]
    # WHAT: "threads" (the job's total over budget) or the layer wider than its allowance
    header = ["PID", "RULE", "PEAK", "BUDGET", "STARTED", "ENDED", "WHAT"]
    return "\n".join(_table(header, rows))


def _ended(record: dict[str, Any]) -> str:
    """When and how a violation ended: back within budget, or with its job."""
    if record["ended"] is None:
        return "ongoing"
    how = record.get("ended_by")
    return _clock(record["ended"]) + (f" ({how})" if how else "")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    rows = [[visible(cell) for cell in row] for row in rows]  # visible() is idempotent
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    right = {0}  # PIDs read best right-aligned, like ps
    return [
        "  ".join(
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in [header, *rows]
    ]


def _age(seconds: float) -> str:
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def _clock(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


if __name__ == "__main__":
    sys.exit(main())
