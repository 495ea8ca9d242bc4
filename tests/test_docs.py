"""The manual pages and the bash completions: up to date with their sources
(scripts/build_docs.py), clean for groff, mandoc and man-db, complete against the policy
schema, named by the unit, and completing for real in bash."""

from __future__ import annotations

import configparser
import itertools
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from corecapd.policy import Policy, PolicyError, parse_policy
from corecapd.policy_keys import KEYS, Key

ROOT = Path(__file__).resolve().parents[1]
MAN = ROOT / "man"
PAGES = sorted(MAN.glob("*.[158]"))
SHIPPED_POLICY = ROOT / "etc/corecap.toml"
UNIT = ROOT / "systemd/corecapd.service"
COMPLETIONS = ROOT / "completions/bash"


def test_generated_files_are_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/build_docs.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_there_is_a_page_for_each_command_and_the_policy() -> None:
    assert [page.name for page in PAGES] == [
        "corecap.1",
        "corecap.toml.5",
        "corecapctl.1",
        "corecapd.8",
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_groff_renders_the_page_without_a_warning(page: Path) -> None:
    result = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-z", str(page)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.skipif(not shutil.which("mandoc"), reason="mandoc not installed (bootstrap test)")
@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_mandoc_lint_finds_nothing(page: Path) -> None:
    result = subprocess.run(
        ["mandoc", "-Tlint", "-Wstyle", str(page)], capture_output=True, text=True, timeout=30
    )
    assert result.stdout + result.stderr == "", result.stdout + result.stderr


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_man_db_reads_its_name_line_and_renders_it(page: Path) -> None:
    whatis = subprocess.run(["lexgrog", str(page)], capture_output=True, text=True, timeout=30)
    name = page.name.rsplit(".", 1)[0]
    assert whatis.returncode == 0 and f'"{name} - ' in whatis.stdout, whatis.stdout
    shown = subprocess.run(
        ["man", "-l", str(page)],
        capture_output=True,
        text=True,
        timeout=30,
        env={"MANPAGER": "cat", "MANWIDTH": "80", "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
    )
    assert shown.returncode == 0 and "SEE ALSO" in shown.stdout, shown.stderr


def test_the_unit_documents_pages_that_exist() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(UNIT)
    references = unit["Unit"]["Documentation"].split()
    pages = [re.fullmatch(r"man:(.+)\(([0-9])\)", ref) for ref in references]
    assert all(pages[:4]) and len(pages) >= 4, references
    for found in pages:
        if found is not None:
            assert (MAN / f"{found[1]}.{found[2]}").is_file(), found[0]


# Each table of the schema and a policy that puts an unknown key in it: the schema answers
# with every key it accepts there ("unknown key (allowed here: ...)").
TABLES = {
    "": "rules = []\nzz_unknown = 1\n",
    "daemon": "rules = []\n[daemon]\nzz_unknown = 1\n",
    "defaults": "rules = []\n[defaults]\nzz_unknown = 1\n",
    "rules[]": '[[rules]]\nname = "a"\nmatch = { exe = ["x"] }\nzz_unknown = 1\n',
    "rules[].match": '[[rules]]\nname = "a"\nmatch = { exe = ["x"], zz_unknown = 1 }\n',
    "users.NAME": "rules = []\n[users.alice]\nzz_unknown = 1\n",
}
SECTIONS = {"daemon", "defaults", "users"}  # tables of their own in the manual page


def schema_keys() -> set[str]:
    """Every key path the schema accepts, as KEYS names them."""
    paths = set()
    for table, text in TABLES.items():
        with pytest.raises(PolicyError) as raised:
            parse_policy(text)
        (error,) = raised.value.errors
        allowed = re.search(r"unknown key \(allowed here: (.*)\)$", error)
        assert allowed, error
        for key in allowed[1].split(", "):
            if not table and key in SECTIONS:
                continue
            paths.add(f"{table}.{key}" if table else key)
    return paths


def manual_keys() -> set[str]:
    """Every key path man/corecap.toml.5 documents: its tagged entries, by section."""
    prefixes = {'"Top level"': "", '"[daemon]"': "daemon", '"[defaults]"': "defaults"}
    prefixes |= {'"[[rules]]"': "rules[]", '"[users.NAME]"': "users.NAME"}
    paths, prefix = set(), None
    lines = (MAN / "corecap.toml.5").read_text().splitlines()
    for line, after in itertools.pairwise(lines):
        if line.startswith(".SH "):
            prefix = prefixes.get(line[4:])
        elif line == ".TP" and prefix is not None:
            entry = re.match(r"\\fB(.+?)\\fR", after)
            assert entry, after
            name = entry[1].replace("\\-", "-")
            paths.add(f"{prefix}.{name}" if prefix else name)
    return paths


def test_every_key_the_schema_accepts_is_in_the_table_and_the_manual_page() -> None:
    documented = {key.path for key in KEYS}
    assert len(documented) == len(KEYS)
    assert schema_keys() == documented
    assert manual_keys() == documented


@pytest.mark.parametrize(
    "key", [k for k in KEYS if k.path.startswith(("daemon.", "defaults."))], ids=lambda k: k.path
)
def test_documented_defaults_are_the_schema_defaults(key: Key) -> None:
    section, name = key.path.split(".")
    explicit = parse_policy(f"rules = []\n[{section}]\n{name} = {key.default}\n")
    assert explicit == parse_policy("rules = []\n") == Policy(source="<string>")


def test_every_key_is_commented_in_the_shipped_policy() -> None:
    lines = SHIPPED_POLICY.read_text().splitlines()
    section = ""
    settings: dict[str, int] = {}  # "daemon.mode" -> its line's index
    for index, line in enumerate(lines):
        if line.startswith("["):
            section = line.strip("[]")
        elif (found := re.match(r"(\w+) = ", line)) and section in ("daemon", "defaults"):
            settings[f"{section}.{found[1]}"] = index
    comments = "\n".join(line for line in lines if line.startswith("#"))
    for key in KEYS:
        name = key.path.rsplit(".", 1)[-1]
        if key.path in settings:  # set in the file, with its comment right above
            assert lines[settings[key.path] - 1].startswith("#"), key.path
        else:  # described in the comments, as `name = ...`
            assert re.search(rf"(?m)^#.*(?<![\w.]){re.escape(name)}`? += ", comments), key.path


def complete(*words: str) -> list[str]:
    """What bash completes for the command line `words` (the last one being typed), with
    the generated completion files sourced."""
    script = f"""
        source {COMPLETIONS / "corecapctl"}
        source {COMPLETIONS / "corecap"}
        COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMP_LINE="$*"; COMP_POINT=${{#COMP_LINE}}
        "_shtab_$1" "$1" "${{COMP_WORDS[-1]}}" "${{COMP_WORDS[-2]}}"
        printf '%s\\n' "${{COMPREPLY[@]}}"
    """
    result = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", script, "bash", *words],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
    return sorted(set(result.stdout.split()))


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (("corecapctl", "st"), ["status"]),
        (("corecapctl", ""), ["check", "explain", "reload", "status", "top", "violations"]),
        (("corecapctl", "--s"), ["--socket"]),
        (("corecapctl", "status", "--"), ["--help", "--json"]),
        (("corecapctl", "explain", "--j"), ["--json"]),
        (("corecapctl", "check", "etc/corecap.t"), ["etc/corecap.toml"]),
        (("corecapctl", "--socket", "etc/corecap.t"), ["etc/corecap.toml"]),
        (("corecap", "r"), ["run"]),
        (("corecap", "run", "--in"), ["--inter-op", "--intra-op"]),
        (("corecap", "run", "--cpus", "2", "--", "bas"), ["bash"]),
        (("corecap", "run", "--", "python3", "etc/corecap.t"), ["etc/corecap.toml"]),
    ],
)
def test_bash_completes_from_the_parsers(words: tuple[str, ...], expected: list[str]) -> None:
    found = complete(*words)
    if words[-1] == "bas":  # a command name: bash and whatever else on PATH starts so
        assert "bash" in found
    else:
        assert found == expected
