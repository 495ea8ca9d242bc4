"""corecap bench: a benchmark run the way a credible one is run, in one command.

    corecap bench --cpus 2 --warmup 1 --repeats 5 --vs 'python train_b.py' -- python train_a.py

The checklist it carries out (after hyperfine's warm-ups, alternation and statistics and
pyperf's metadata): cores of its own from corecapd for the whole run (this process
registers, like `corecap run`, and every repetition is a process of its job), never
shared (it waits up to --wait seconds for free cores, else fails with the daemon's reason);
the same threading environment in every repetition (the grant's TF / OpenMP / BLAS
variables and CORECAP_*, built once); warm-ups run and not counted; A and B alternated
(A B A B ...), so a drift in the host weighs on both; per run the wall time, the CPU time
of the command and its descendants, an optional metric parsed from its output, and a
manifest (the grant, the threading variables, TensorFlow's pools, the job's own
`corecapd.register` manifest with threadpool_info when it calls it, the host's load,
corecap's version); per command the median, the IQR and min-max; the A/B ratio per pair.
It warns when repetitions differ in threading, when another job held one of its cores
during a run, and when its job was over its thread budget during a run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corecapd import __version__
from corecapd.client import DaemonUnreachable, call
from corecapd.cpulist import format_cpulist
from corecapd.declaration import tensorflow_pools
from corecapd.diagnosis import THREADING_VARIABLES
from corecapd.job import MANIFEST_VARIABLE, CorecapWarning, Plan, grant_environment, register
from corecapd.policy import SOCKET_DEFAULT
from corecapd.protocol import ProtocolError, RemoteError

REPORT_VERSION = 1
TAIL = 2000  # characters of a failed run's output shown


class BenchError(Exception):
    """The benchmark cannot run as asked (cores, a command that fails); exit 1."""


def whole_number(least: int, most: int | None = None) -> Callable[[str], int]:
    """An argparse `type`: a whole number from `least` (to `most`), else a clear error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"expected at least {least}, got {value}")
        if most is not None and value > most:
            raise argparse.ArgumentTypeError(f"expected at most {most}, got {value}")
        return value

    return parse


def add_parser(commands: Any) -> None:
    """The `bench` subcommand of `corecap` (`commands`: argparse's subparsers)."""
    bench = commands.add_parser(
        "bench",
        help="time CMD on cores of its own: warm-ups, repetitions, A/B, statistics",
    )
    bench.add_argument(
        "--cpus", type=whole_number(1), required=True, metavar="N", help="cores to run on"
    )
    bench.add_argument(
        "--warmup", type=whole_number(0), default=1, metavar="RUNS", help="runs not counted (1)"
    )
    bench.add_argument(
        "--repeats",
        type=whole_number(1),
        default=5,
        metavar="RUNS",
        help="counted runs per command (5)",
    )
    bench.add_argument("--vs", metavar="CMD2", help="a command to compare, alternated with CMD")
    bench.add_argument(
        "--metric", metavar="REGEX", help="a number in the output: the group 1 of the last match"
    )
    bench.add_argument("--json", metavar="FILE", help="write the whole report here")
    bench.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait this long for cores no other job holds (default: fail at once)",
    )
    bench.add_argument("--socket", help=f"corecapd's socket (default: {SOCKET_DEFAULT})")
    bench.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...")


@dataclass
class Run:
    """One repetition of one command."""

    wall_s: float
    cpu_s: float  # user + system time of the command and the descendants it waited for
    exit_code: int
    metric: float | None
    manifest: dict[str, Any]
    warmup: bool
    output: str  # the end of its stdout and stderr, for a failure's message

    def as_dict(self) -> dict[str, Any]:
        return {
            "wall_s": round(self.wall_s, 6),
            "cpu_s": round(self.cpu_s, 6),
            "exit_code": self.exit_code,
            "metric": self.metric,
            "manifest": self.manifest,
        }


@dataclass
class Command:
    argv: list[str]
    runs: list[Run] = field(default_factory=list)

    def counted(self) -> list[Run]:
        return [run for run in self.runs if not run.warmup]


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`corecap bench`: 0 when every run succeeded, 1 when the benchmark could not run,
    2 for a command line that cannot be used (`parser.error`)."""
    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        parser.error("bench: give the command after --, e.g. corecap bench --cpus 2 -- CMD")
    metric = None
    if args.metric is not None:
        try:
            metric = re.compile(args.metric)
        except re.error as err:
            parser.error(f"bench: --metric {args.metric!r}: {err}")
    commands = [Command(command)]
    if args.vs is not None:
        try:
            commands.append(Command(shlex.split(args.vs)))
        except ValueError as err:  # unbalanced quotes
            parser.error(f"bench: --vs {args.vs!r}: {err}")
        if not commands[-1].argv:
            parser.error("bench: --vs: give the command to compare, e.g. --vs 'python b.py'")
    try:
        plan, warned = _cores(args.cpus, args.socket, args.wait)
        report = bench(plan, commands, args.warmup, args.repeats, metric, warned)
    except BenchError as err:
        print(f"corecap bench: {err}", file=sys.stderr)
        return 1
    print(render(report))
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        except OSError as err:
            print(f"corecap bench: --json {args.json}: {err.strerror}", file=sys.stderr)
            return 1
    return 0


def bench(
    plan: Plan,
    commands: list[Command],
    warmup: int,
    repeats: int,
    metric: re.Pattern[str] | None,
    notes: list[str],
) -> dict[str, Any]:
    """Runs every command `warmup` times, then `repeats` times, alternated, on `plan`'s
    cores; returns the report (the --json document), `notes` among its warnings.

    Raises:
        BenchError: a command that cannot be run, or a run that exited non-zero.
    """
    environment = _environment(plan)
    notes = list(notes)
    order = [(c, True) for _ in range(warmup) for c in commands]
    order += [(c, False) for _ in range(repeats) for c in commands]
    with tempfile.TemporaryDirectory(prefix="corecap-bench-") as scratch:
        for index, (command, is_warmup) in enumerate(order):
            which = f"run {index + 1} of {shlex.join(command.argv)}"
            manifest = Path(scratch) / f"run-{index}.json"
            run = _run(command.argv, environment | {MANIFEST_VARIABLE: str(manifest)}, metric)
            if run.exit_code != 0:
                raise BenchError(f"{which} exited {run.exit_code}:\n{run.output}")
            run.warmup = is_warmup
            run.manifest = _manifest(plan, environment, manifest) | run.manifest
            command.runs.append(run)
            if is_warmup:
                continue  # what disturbed a warm-up weighs on no result
            if metric is not None and run.metric is None:
                notes.append(f"{which}: no --metric match")
            notes += _disturbed(plan, run, which)
    notes += _differing_threading(commands)
    return _report(plan, commands, environment, notes, warmup)


def _cores(cpus: int, socket: str | None, wait: float) -> tuple[Plan, list[str]]:
    """Registers this process for `cpus` cores of its own, waiting up to `wait` seconds
    for them to be free of other jobs; the warnings to report (no daemon)."""
    deadline = time.monotonic() + wait
    while True:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", CorecapWarning)
            plan = register(cpus=cpus, socket=socket)
        said = [str(w.message).removeprefix("corecapd: ") for w in caught]
        if plan.daemon is not None and not plan.pinned:
            # monitor mode: the daemon's dry run leaves the mask; a bench runs on its cores
            os.sched_setaffinity(0, plan.cpus)
            said.append(
                f"monitor mode: corecap bench pinned itself to CPUs {format_cpulist(plan.cpus)}"
            )
        if plan.daemon is None:
            return plan, [
                *said,
                f"no corecapd: CPUs {format_cpulist(plan.cpus)} are pinned, not reserved: any other"
                " process may run on them",
            ]
        if len(plan.cpus) < cpus:
            raise BenchError(
                f"corecapd grants {len(plan.cpus)} of the {cpus} CPUs asked for: "
                + "; ".join(plan.notes)
            )
        try:
            holders = _sharing(plan)
        except (DaemonUnreachable, RemoteError, ProtocolError) as err:
            why = f"corecapd granted CPUs, then did not say who holds them: {err}"
            raise BenchError(why) from None
        if not holders:
            return plan, said
        if time.monotonic() >= deadline:
            raise BenchError(
                f"CPUs {format_cpulist(plan.cpus)} are shared with {', '.join(holders)}"
                f" ({'; '.join(plan.notes) or 'no free CPUs'}); not benchmarking on shared"
                " cores (--wait SECONDS waits for free ones)"
            )
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def _sharing(plan: Plan) -> list[str]:
    """Other jobs holding any of `plan`'s CPUs ("PID 123 (rule) on CPUs 1"), from the daemon's
    status; this process's own job and its sub-jobs excluded."""
    assert plan.daemon is not None
    status = call(Path(plan.daemon), "status")
    mine = {os.getpid()}
    mine |= {job["pid"] for job in status["jobs"] if job.get("parent") in mine}
    ours = set(plan.cpus)
    return [
        f"PID {job['pid']} ({job['rule']}) on CPUs {format_cpulist(ours & set(job['cpus']))}"
        for job in status["jobs"]
        if job["pid"] not in mine and ours & set(job["cpus"])
    ]


def _environment(plan: Plan) -> dict[str, str]:
    """Every repetition's environment, built once: this process's own, with the variables
    `register` set from the grant, and CORECAP_* for a job that registers itself."""
    return dict(os.environ) | grant_environment(plan)


def _run(argv: list[str], environment: Mapping[str, str], metric: re.Pattern[str] | None) -> Run:
    """Runs `argv` once; its output is captured (for --metric and a failure's message)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()
    started = time.perf_counter()
    try:
        done = subprocess.run(argv, env=environment, capture_output=True, text=True)
    except OSError as err:
        raise BenchError(f"cannot run {argv[0]!r}: {err.strerror}") from None
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    facts = {"load_average": [round(x, 2) for x in load]}  # 1, 5, 15 min, as the run began
    found = _metric(metric, done.stdout, done.stderr)
    output = (done.stdout + done.stderr)[-TAIL:]
    return Run(wall, cpu, done.returncode, found, facts, False, output)


def _metric(pattern: re.Pattern[str] | None, stdout: str, stderr: str) -> float | None:
    """Group 1 (else the whole match) of the last match in stdout, else in stderr."""
    if pattern is None:
        return None
    for text in (stdout, stderr):
        found = list(pattern.finditer(text))
        if found:
            last = found[-1]
            try:
                return float(last.group(1) if pattern.groups else last.group(0))
            except ValueError:
                return None
    return None


def _manifest(plan: Plan, environment: Mapping[str, str], job_manifest: Path) -> dict[str, Any]:
    """What one run ran with: the grant, the threading variables, TensorFlow's pools as the
    variables size them (or as the job reported them), the job's own manifest when it
    called `corecapd.register` (with threadpool_info), the load, corecap's version."""
    own = json.loads(job_manifest.read_text()) if job_manifest.exists() else None
    variables = {name: environment.get(name) for name in THREADING_VARIABLES}
    tensorflow = (own or {}).get("tensorflow")
    return {
        "grant": {"cpus": plan.cpus, "daemon": plan.daemon, "notes": plan.notes},
        "environment": variables,
        # as the job ran them when it registered, else as the variables size them
        "tensorflow": tensorflow or tensorflow_pools(0, 0, environment, len(plan.cpus)),
        "tensorflow_from": "job" if tensorflow else "environment",
        "threadpool_info": None if own is None else own["threadpool_info"],
        "job": own,
        "corecap_version": __version__,
        "host": platform.node(),
    }


def _disturbed(plan: Plan, run: Run, which: str) -> list[str]:
    """Warnings for a run: another job held one of its cores, or its job (or a sub-job)
    was over its thread budget while it ran."""
    if plan.daemon is None:
        return []
    try:
        holders = _sharing(plan)
        violations = call(Path(plan.daemon), "violations")
        status = call(Path(plan.daemon), "status")
    except (DaemonUnreachable, RemoteError, ProtocolError) as err:
        return [f"{which}: corecapd not asked about it: {err}"]
    said = [f"{which}: cores shared with {', '.join(holders)}"] if holders else []
    mine = {os.getpid()} | {j["pid"] for j in status["jobs"] if j.get("parent") == os.getpid()}
    began = time.time() - run.wall_s  # the daemon's clock is the wall clock
    for record in violations:
        if record["pid"] in mine and (record["ended"] is None or record["ended"] >= began):
            said.append(
                f"{which}: over its thread budget ({record['threads']} threads, budget"
                f" {record['budget']}; {record['diagnosis'] or 'no diagnosis'})"
            )
    return said


def _differing_threading(commands: list[Command]) -> list[str]:
    """A warning per command whose repetitions ran with different threading."""
    said = []
    for command in commands:
        seen = {json.dumps(_threading(r.manifest), sort_keys=True) for r in command.counted()}
        if len(seen) > 1:
            said.append(
                f"{shlex.join(command.argv)}: the repetitions differ in threading"
                f" ({len(seen)} configurations): compare their manifests"
            )
    return said


def _threading(manifest: Mapping[str, Any]) -> dict[str, Any]:
    job = manifest["job"] or {}
    pools = [(i["internal_api"], i["num_threads"]) for i in manifest["threadpool_info"] or []]
    return {
        "cpus": manifest["grant"]["cpus"],
        "environment": manifest["environment"],
        "tensorflow": manifest["tensorflow"],
        "settings": job.get("settings"),
        "threadpools": sorted(pools),
    }


def summary(values: Sequence[float]) -> dict[str, float]:
    """median, IQR (Q3 - Q1, inclusive quartiles), min and max, in the values' unit."""
    ordered = sorted(values)
    quartiles = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else []
    return {
        "median": statistics.median(ordered),
        "iqr": quartiles[2] - quartiles[0] if quartiles else 0.0,
        "min": ordered[0],
        "max": ordered[-1],
    }


def _report(
    plan: Plan,
    commands: list[Command],
    environment: Mapping[str, str],
    notes: list[str],
    warmup: int,
) -> dict[str, Any]:
    documents = []
    for command in commands:
        counted = command.counted()
        wall, cpu = summary([r.wall_s for r in counted]), summary([r.cpu_s for r in counted])
        metrics = [r.metric for r in counted if r.metric is not None]
        documents.append(
            {
                "command": shlex.join(command.argv),
                "warmup": warmup,
                "runs": [run.as_dict() for run in counted],
                **{f"{name}_s": round(value, 6) for name, value in wall.items()},
                "cpu_s": {name: round(value, 6) for name, value in cpu.items()},
                "metric": summary(metrics) if metrics else None,
            }
        )
    report: dict[str, Any] = {
        "version": REPORT_VERSION,
        "corecap_version": __version__,
        "cpus": plan.cpus,
        "daemon": plan.daemon,
        "grant_notes": plan.notes,
        "environment": {name: environment.get(name) for name in THREADING_VARIABLES},
        "commands": documents,
        "warnings": notes,
    }
    if len(commands) == 2:
        a, b = commands[0].counted(), commands[1].counted()
        ratios = [x.wall_s / y.wall_s for x, y in zip(a, b, strict=True)]
        report["ratios"] = [round(r, 6) for r in ratios]  # A/B wall time, pair by pair
        report["ratio"] = {name: round(v, 6) for name, v in summary(ratios).items()}
    return report


def render(report: Mapping[str, Any]) -> str:
    """The report for a terminal, like hyperfine's: a block per command, then A/B."""
    granted = f"CPUs {format_cpulist(report['cpus'])}"
    where = f"granted by corecapd at {report['daemon']}" if report["daemon"] else "no corecapd"
    variables = " ".join(f"{k}={v}" for k, v in report["environment"].items() if v is not None)
    lines = [f"corecap bench: {granted} ({where}); {variables}"]
    for label, command in zip("AB", report["commands"], strict=False):
        runs = len(command["runs"])
        lines.append(f"{label}: {command['command']}")
        lines.append(
            f"  wall  median {command['median_s']:.3f} s  IQR {command['iqr_s']:.3f} s"
            f"  min {command['min_s']:.3f} s  max {command['max_s']:.3f} s"
            f"  ({runs} runs, {command['warmup']} warm-up)"
        )
        cpu = command["cpu_s"]
        lines.append(f"  cpu   median {cpu['median']:.3f} s  IQR {cpu['iqr']:.3f} s")
        if command["metric"] is not None:
            found = command["metric"]
            lines.append(
                f"  metric median {found['median']:g}  IQR {found['iqr']:g}"
                f"  min {found['min']:g}  max {found['max']:g}"
            )
    if "ratio" in report:
        ratio = report["ratio"]
        lines.append(
            f"A/B: wall time ratio median {ratio['median']:.3f}"
            f"  (min {ratio['min']:.3f}, max {ratio['max']:.3f}, {len(report['ratios'])} pairs)"
        )
    lines += [f"warning: {note}" for note in report["warnings"]]
    return "\n".join(lines)
