"""The state file: atomic round trip, and every kind of damage reported, never trusted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from corecapd.declaration import Declaration, Pool, Registration
from corecapd.state import STATE_FILE, StateError, load_state, save_state

REGISTRATION = Registration(
    Declaration(cpus=2, intra_op=4, blas=1), True, (Pool("openblas", 2), Pool("openmp", 16))
)


def test_round_trip(tmp_path: Path) -> None:
    save_state(tmp_path / "run", [("123-456", REGISTRATION), ("7-8", Registration(Declaration()))])
    assert load_state(tmp_path / "run") == {
        "123-456": REGISTRATION,
        "7-8": Registration(Declaration()),
    }
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [STATE_FILE]  # no temp left


def test_no_state_yet_is_empty(tmp_path: Path) -> None:
    assert load_state(tmp_path / "absent") == {}


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ("{not json", "unreadable"),
        ("[]", "not a version 1"),
        ('{"version": 2, "registrations": {}}', "not a version 1"),
        ('{"version": 1, "registrations": []}', "registrations: expected an object"),
        ('{"version": 1, "registrations": {"1-2": {"declaration": {"cpus": -1}}}}', "cpus"),
        ('{"version": 1, "registrations": {"1-2": []}}', r"registrations\['1-2'\]: expected an"),
    ],
)
def test_damage_is_a_state_error(tmp_path: Path, content: str, error: str) -> None:
    (tmp_path / STATE_FILE).write_text(content)
    with pytest.raises(StateError, match=error):
        load_state(tmp_path)


def test_overwrite_replaces_whole_file(tmp_path: Path) -> None:
    save_state(tmp_path, [("1-1", REGISTRATION)])
    save_state(tmp_path, [])
    assert json.loads((tmp_path / STATE_FILE).read_text())["registrations"] == {}
