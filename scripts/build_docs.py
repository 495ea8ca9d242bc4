"""Generates the manual pages (man/) and the bash completions (completions/bash/) from their
one source each, so they cannot drift from it:

- corecapd(8), corecapctl(1), corecap(1): from the argparse parsers the commands run
  (argparse-manpage), taken from each command's own `main`, plus the sections below;
- corecap.toml(5): from the table of policy keys (corecapd/policy_keys.py, which
  tests/test_docs.py checks against the schema) and the shipped etc/corecap.toml (EXAMPLE);
- completions/bash/corecapctl and completions/bash/corecap: from the same parsers (shtab).

The files are committed (pip installs them: pyproject.toml's data-files);
tests/test_docs.py fails when they differ from what this script makes.

Usage: .venv/bin/python scripts/build_docs.py [--check]
  (needs the daemon and test extras: scripts/bootstrap.sh test). argparse words usage lines
  a little differently from one Python to the next: the committed files are made with the
  Python of .venv, the one CI runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn
from unittest import mock

import shtab
from argparse_manpage.manpage import Manpage  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's corecapd, whatever is installed

from corecapd import __version__, ctl, daemon, launcher  # noqa: E402
from corecapd.job import GRANT_VARIABLES  # noqa: E402
from corecapd.policy import DEFAULT_POLICY_PATH, DEFAULT_SOCKET, DaemonSettings  # noqa: E402
from corecapd.policy_keys import KEYS, Key  # noqa: E402
from corecapd.protocol import root_socket  # noqa: E402
from corecapd.state import STATE_FILE  # noqa: E402

SOURCE = f"corecap {__version__}"
# The date in each page's header, by version: a build date would make the pages change
# every day. A new version needs its date here.
DATES = {"0.1.0": "November 30, 2026"}
DATE = DATES[__version__]
MANUAL = "corecap"
SOCKET = DEFAULT_SOCKET
ROOT_SOCKET = str(root_socket(Path(DEFAULT_SOCKET)))


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__(parser.prog)
        self.parser = parser


def parser_of(main: Callable[[Sequence[str] | None], int]) -> argparse.ArgumentParser:
    """The parser a command's `main` builds: taken when `main` parses its arguments, so
    that the manual page and the completion describe exactly what the command accepts."""

    def capture(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> NoReturn:
        raise _Captured(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture):
        try:
            main([])
        except _Captured as captured:
            return captured.parser
    raise RuntimeError(f"{main.__module__}.main returned without parsing its arguments")


def roff(text: str, wrap: bool = True) -> str:
    """Plain text as roff: wrapped at spaces into short input lines (`wrap`; the same text
    in fill mode), backslashes and hyphens escaped, no line read as a request."""
    lines = text.split("\n")
    if wrap:
        lines = textwrap.wrap(text, width=72, break_long_words=False, break_on_hyphens=False)
    escaped = (line.replace("\\", "\\e").replace("-", "\\-") for line in lines)
    return "\n".join("\\&" + line if line[:1] in ".'" else line for line in escaped)


def bold(text: str) -> str:
    return f"\\fB{roff(text, wrap=False)}\\fR"


def paragraphs(*texts: str) -> str:
    return "\n.PP\n".join(roff(text) for text in texts)


def items(*pairs: tuple[str, str]) -> str:
    """A tagged list: each pair is a term (set in bold) and its text."""
    return "\n".join(f".TP\n{bold(term)}\n{roff(text)}" for term, text in pairs)


SEE_ALSO = {
    "corecapd": "corecapctl(1), corecap(1), corecap.toml(5), systemd.service(5)",
    "corecapctl": "corecapd(8), corecap(1), corecap.toml(5)",
    "corecap": "corecapctl(1), corecapd(8), corecap.toml(5)",
    "corecap.toml": "corecapd(8), corecapctl(1), corecap(1)",
}


def see_also(name: str) -> str:
    pages = [page.strip() for page in SEE_ALSO[name].split(",")]
    references = [f".BR {page[: page.index('(')]} {page[page.index('(') :]}" for page in pages]
    return ",\n".join(references)


def command_page(
    main: Callable[[Sequence[str] | None], int],
    section: int,
    summary: str,
    description: str,
    extra: Sequence[tuple[str, str]],
) -> str:
    """A command's manual page: argparse-manpage's rendering of its parser (SYNOPSIS,
    DESCRIPTION, OPTIONS, one section per subcommand), with `description` before the
    parser's own and the `extra` sections (heading, roff) after, then SEE ALSO."""
    parser = parser_of(main)
    page = Manpage(
        parser,
        _data={
            "project_name": "corecap",
            "version": __version__,
            "manual_title": MANUAL,
            "manual_section": section,
            "description": summary,
        },
    )
    page.date = DATE
    # The parser's description first, then the page's own paragraphs.
    page.add_section(
        "description", "=", paragraphs(parser.description or "") + "\n.PP\n" + description
    )
    described, parser.description = parser.description, None
    if parser._subparsers is not None:
        parser._subparsers.title = "commands"  # argparse's "positional arguments"
    for heading, content in [*extra, ("SEE ALSO", see_also(parser.prog))]:
        page.add_section(heading, "=", content)
    text = str(page)
    parser._manpage = []  # type: ignore[attr-defined]  # argparse-manpage keeps it there
    parser.description = described
    return text


def corecapd_page() -> str:
    return command_page(
        daemon.main,
        8,
        "keep Python / TensorFlow jobs inside their CPU core budget",
        paragraphs(
            "corecapd finds Python processes the moment they exec (the kernel's netlink"
            " process events, and a scan of /proc every daemon.scan_interval), gives each job"
            " that a rule of the policy matches its own cores, confines every thread of it to"
            " them before the interpreter runs its first statement, counts its threads, and"
            " reports a violation, once at onset and once at resolution, when a job runs"
            " more threads than its budget. A job is the matched process and all its"
            " descendants.",
            "It runs as a systemd service (Type=notify, with a watchdog): systemctl enable"
            " --now corecapd. Events go to the journal with structured fields"
            " (journalctl -u corecapd CORECAP_EVENT=violation-started), and to stderr when"
            " not under journald. A bad policy stops the start, with every error found.",
        ),
        [
            (
                "SIGNALS",
                items(
                    (
                        "SIGHUP",
                        "Re-read the policy (systemctl reload corecapd). A policy with errors"
                        " is refused and the one in force stays; keys that take effect at"
                        " restart are reported when they change.",
                    ),
                    (
                        "SIGTERM, SIGINT",
                        "Stop. Every job keeps the CPU mask and the fence it has; the next"
                        " corecapd takes the jobs over.",
                    ),
                ),
            ),
            (
                "FILES",
                items(
                    (str(DEFAULT_POLICY_PATH), "The policy: corecap.toml(5)."),
                    (SOCKET, "The API socket (daemon.socket), open to every local user."),
                    (ROOT_SOCKET, "Root's own socket beside it, mode 0600."),
                    (
                        f"{DaemonSettings().state_dir}/{STATE_FILE}",
                        "What registered jobs declared, kept across restarts (daemon.state_dir).",
                    ),
                ),
            ),
            (
                "EXIT STATUS",
                paragraphs(
                    "0 after a stop by signal; 1 when the policy has errors or corecapd"
                    " cannot start here (the reason on stderr)."
                ),
            ),
        ],
    )


def corecapctl_page() -> str:
    return command_page(
        ctl.main,
        1,
        "who holds which cores, who is over budget, and policy checks",
        paragraphs(
            "corecapctl asks corecapd over its socket which jobs hold which cores, which are"
            " over their thread budget and why, checks a policy file on this host, and makes"
            " corecapd re-read its policy. Anyone may read; reload needs root. Run as root,"
            " it uses root's own socket beside the socket given.",
            "What a job chose (thread names, environment values, command lines) is printed"
            " with control characters escaped; --json output is ASCII JSON.",
        ),
        [
            (
                "TOP",
                paragraphs(
                    "corecapctl top fills the terminal and refreshes it every --interval"
                    " seconds: the CPUs, each marked with the letter of the job that holds it"
                    " (= shared by several jobs, . free, r reserved), the jobs most over"
                    " their thread budget first (a sub-job under its parent), each with a bar"
                    " of its threads against its budget and violations in red, and the"
                    " selected job's members, its layers when explain gives them, and the"
                    " diagnosis when it is over budget. It fits 80x24.",
                    "With --once it prints one frame and exits. When the output is not a"
                    " terminal (a pipe, a file) it prints the status table instead.",
                ),
            ),
            (
                "KEYS (top)",
                items(
                    ("Up, Down, k, j", "Select the job above or below."),
                    ("PageUp, PageDown, Home, End, g, G", "Move the selection further."),
                    ("q", "Quit (so does Ctrl-C)."),
                ),
            ),
            (
                "EXIT STATUS",
                paragraphs(
                    "0 on success; 1 when corecapd is not running or refuses (busy), or, for"
                    " check, when the policy has errors (each on its own line on stderr,"
                    " then how many); 2 for a command line that cannot be parsed."
                ),
            ),
            (
                "ENVIRONMENT",
                items(
                    (
                        "CORECAP_SOCKET",
                        "corecapd's socket when --socket is not given (set by corecap run for"
                        f" its job), before the policy's daemon.socket and {SOCKET}.",
                    ),
                ),
            ),
            (
                "FILES",
                items(
                    (
                        str(DEFAULT_POLICY_PATH),
                        "The policy; its daemon.socket is the default socket.",
                    ),
                    (SOCKET, "The socket when the policy does not name one."),
                ),
            ),
        ],
    )


def corecap_page() -> str:
    variables = ", ".join(GRANT_VARIABLES.values())
    return command_page(
        launcher.main,
        1,
        "run a job with its threads sized to the cores it is granted",
        paragraphs(
            "corecap run registers with corecapd, which grants the job cores (at most what"
            " was asked, the rule's cpus, the user's max_cpus and what the host has), pins"
            " the process to them (not when corecapd is in monitor mode, a dry run), sets"
            " the threading variables of TensorFlow, OpenMP and"
            " BLAS from the grant, and execs CMD, which keeps the registration (same PID)."
            " In the job, import corecapd and corecapd.register() find the grant in the"
            " environment.",
            "Without a daemon, or when it refuses, corecap run applies the same settings to"
            " the CPUs the process has, says why in one line (corecap: warning: ...) and"
            " runs the job all the same.",
            "corecap bench registers for --cpus cores of its own, held for the whole run,"
            " and times CMD on them: --warmup runs of each command not counted, then"
            " --repeats runs, alternated with --vs CMD2 (A B A B ...), every one in the same"
            " environment (the grant's threading variables, built once). It never runs on"
            " shared cores: when another job holds one it waits up to --wait seconds, else"
            " fails and names the job. It prints, per command, the median, IQR, min and max"
            " of the wall time, the CPU time and the --metric (group 1 of the expression's"
            " last match in the output), and the A/B ratio per pair; --json FILE writes every"
            " run with its manifest (the grant, the threading variables, TensorFlow's pools,"
            " the job's own corecapd.register() manifest when it calls it, the load). It"
            " warns when repetitions differ in threading, when another job shared a core"
            " during a run, and when its job went over its thread budget during a run.",
        ),
        [
            (
                "ENVIRONMENT",
                items(
                    (
                        "CORECAP_SOCKET",
                        "corecapd's socket when --socket is not given (else the daemon.socket"
                        f" of {DEFAULT_POLICY_PATH}, else {SOCKET}).",
                    ),
                    (
                        variables,
                        "Set for the job: the granted CPUs (a comma-separated list) and the"
                        " threads of each layer.",
                    ),
                    (
                        "TF_NUM_INTRAOP_THREADS, TF_NUM_INTEROP_THREADS, OMP_NUM_THREADS,"
                        " OPENBLAS_NUM_THREADS, MKL_NUM_THREADS",
                        "Set for the job from the grant, unless the job's own settings ask"
                        " otherwise.",
                    ),
                ),
            ),
            (
                "EXIT STATUS",
                paragraphs(
                    "corecap run: the job's (corecap run execs it); 127 when CMD cannot be"
                    " run. corecap bench: 0 when every run succeeded; 1 when the cores could"
                    " not be had unshared, CMD cannot be run or a run exited non-zero (its"
                    " output is shown). Both: 2 for a command line that cannot be parsed."
                ),
            ),
        ],
    )


SECTIONS = (
    ("", "Top level", "Written before any [table]."),
    ("daemon", "[daemon]", "How corecapd runs."),
    ("defaults", "[defaults]", "What applies to every job unless its rule says otherwise."),
    (
        "rules[]",
        "[[rules]]",
        "One table per rule, in order: the first rule that matches a process makes it a job.",
    ),
    ("users.NAME", "[users.NAME]", "Caps for the user NAME, across all of the user's jobs."),
)


def section_of(key: Key) -> str:
    head, _, _ = key.path.rpartition(".")
    if head.startswith("rules[]"):
        return "rules[]"
    return head


def key_entry(key: Key, section: str) -> str:
    name = key.path.removeprefix(section).lstrip(".") if section else key.path
    what = key.kind if key.default is None else f"{key.kind}, default {key.default}"
    return f".TP\n{bold(name)} ({roff(what, wrap=False)})\n{roff(key.text)}"


def policy_page(shipped: str) -> str:
    """corecap.toml(5): every key of KEYS, by table, and the shipped policy as the example."""
    lines = [
        f'.TH CORECAP.TOML "5" "{DATE}" "{roff(SOURCE, wrap=False)}" "{MANUAL}"',
        ".SH NAME",
        "corecap.toml \\- the policy of corecapd, the CPU core budget daemon",
        ".SH SYNOPSIS",
        roff(str(DEFAULT_POLICY_PATH), wrap=False),
        ".SH DESCRIPTION",
        paragraphs(
            "corecapd(8) reads its policy from a TOML file, UTF-8 text, at start and on"
            " reload. Check a change before reloading with corecapctl check FILE, which runs"
            " the checks corecapd runs, on this host too (CPUs, backend, socket).",
            "A bad policy is refused with every error found, each naming the file and the"
            " line and column, or the key path (rules[1].cpus), and what was expected;"
            " unknown keys are errors, so a typo cannot go unnoticed. On reload the policy in"
            " force stays.",
        ),
    ]
    for prefix, heading, text in SECTIONS:
        keys = [key for key in KEYS if section_of(key) == prefix]
        lines += [f'.SH "{roff(heading, wrap=False)}"', roff(text)]
        lines += [key_entry(key, prefix) for key in keys]
    settings = [line for line in shipped.splitlines() if not line.startswith("#")]
    example = "\n".join(  # the shipped policy without its comments, one blank line at most
        line for i, line in enumerate(settings) if line.strip() or settings[i - 1 : i] != [""]
    ).strip()
    lines += [
        ".SH EXAMPLE",
        roff("The policy corecap ships (monitor mode: it watches and reports, changes nothing):"),
        ".PP",
        ".RS 4",
        ".nf",
        roff(example, wrap=False),
        ".fi",
        ".RE",
        ".SH FILES",
        items((str(DEFAULT_POLICY_PATH), "The policy corecapd reads unless given --config.")),
        ".SH SEE ALSO",
        see_also("corecap.toml"),
    ]
    return "\n".join(lines) + "\n"


def completion(main: Callable[[Sequence[str] | None], int]) -> str:
    """bash completion for a command, from its parser: subcommands, options, and file names
    where the command takes a path."""
    parser = parser_of(main)
    paths = {"socket", "file", "config"}
    preamble = ""
    parsers = [parser]
    while parsers:
        current = parsers.pop()
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += action.choices.values()
            elif action.dest in paths:
                action.complete = shtab.FILE  # type: ignore[attr-defined]
            elif action.nargs == argparse.REMAINDER:  # corecap run -- CMD: a command
                action.complete = {"bash": "_shtab_corecap_compgen_commands"}  # type: ignore[attr-defined]
                preamble = COMMANDS_THEN_FILES
    text = shtab.complete(parser, shell="bash", preamble=preamble)
    return text.rstrip("\n") + "\n"


COMMANDS_THEN_FILES = textwrap.dedent("""\
        # corecap run -- CMD ARGS: a command name, then file names
        _shtab_corecap_compgen_commands() {
          local i
          for ((i = 1; i < COMP_CWORD; i++)); do
            if [[ ${COMP_WORDS[i]} == -- ]]; then
              ((COMP_CWORD > i + 1)) && { compgen -f -- "$1"; return; }
              break
            fi
          done
          compgen -c -- "$1"
        }
        """)


def outputs() -> dict[Path, str]:
    os.environ["COLUMNS"] = "80"  # argparse wraps usage lines to the terminal's width
    shipped = (ROOT / "etc/corecap.toml").read_text()
    return {
        ROOT / "man/corecapd.8": corecapd_page(),
        ROOT / "man/corecapctl.1": corecapctl_page(),
        ROOT / "man/corecap.1": corecap_page(),
        ROOT / "man/corecap.toml.5": policy_page(shipped),
        ROOT / "completions/bash/corecapctl": completion(ctl.main),
        ROOT / "completions/bash/corecap": completion(launcher.main),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate man/ and completions/bash/.")
    parser.add_argument(
        "--check", action="store_true", help="only compare; exit 1 naming the stale files"
    )
    args = parser.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        stale.append(path.relative_to(ROOT))
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if args.check and stale:
        names = ", ".join(map(str, stale))
        print(f"build_docs: out of date: {names}; run scripts/build_docs.py", file=sys.stderr)
        return 1
    for name in stale:
        print(f"build_docs: wrote {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
