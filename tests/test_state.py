"""The state file: atomic round trip, and every kind of damage reported, never trusted."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from corecapd import state
from corecapd.declaration import MAX_DECLARED, Declaration, Pool, Registration
from corecapd.model import KeptRegistration
from corecapd.state import (
    MAX_REGISTRATIONS,
    MAX_STATE_BYTES,
    STATE_FILE,
    StateError,
    current_boot_id,
    load_state,
    save_state,
)

REGISTRATION = Registration(
    Declaration(cpus=2, intra_op=4, blas=1), True, (Pool("openblas", 2), Pool("openmp", 16))
)
KEPT = KeptRegistration(1000, REGISTRATION)
BOOT = "2f4ad5b5-6bd3-4f7c-9d1e-0b1f7a1e2c3d"


def test_round_trip(tmp_path: Path) -> None:
    plain = KeptRegistration(0, Registration(Declaration()))
    assert save_state(tmp_path / "run", [("123-456", KEPT), ("7-8", plain)], BOOT) == 0
    assert load_state(tmp_path / "run", BOOT) == {"123-456": KEPT, "7-8": plain}
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [STATE_FILE]  # no temp left
    assert (tmp_path / "run" / STATE_FILE).stat().st_mode & 0o777 == 0o600


def test_this_boot_is_the_default(tmp_path: Path) -> None:
    save_state(tmp_path, [("1-2", KEPT)])
    assert json.loads((tmp_path / STATE_FILE).read_text())["boot_id"] == current_boot_id()
    assert load_state(tmp_path) == {"1-2": KEPT}


def test_no_state_yet_is_empty(tmp_path: Path) -> None:
    assert load_state(tmp_path / "absent") == {}


def document(registrations: object, version: object = 2, boot: object = BOOT) -> str:
    return json.dumps({"version": version, "boot_id": boot, "registrations": registrations})


ENTRY = {"uid": 1000, "declaration": {"cpus": 1}}


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ("{not json", "unreadable"),
        ("[]", "not a corecapd state file"),
        ('{"version": "2"}', "not a corecapd state file"),
        (document({}, version=3), "a version 3 state file"),
        (document([]), "registrations: expected an object"),
        (document({"1-2": {"uid": 1000, "declaration": {"cpus": -1}}}), "cpus"),
        (document({"1-2": []}), r"registrations\['1-2'\]: expected an"),
        (document({"1-2": {"declaration": {}}}), r"\.uid: expected the uid that registered"),
        (document({"1-2": ENTRY | {"uid": True}}), r"\.uid: expected"),
        (document({"1-2": ENTRY | {"uid": -1}}), r"\.uid: expected"),
        (document({"1-2": ENTRY | {"uid": 2**32}}), r"\.uid: expected"),
        (document({"python": ENTRY}), "not a job name"),
        (document({"1-2": ENTRY}, boot="another"), "written before this boot"),
        ('{"version": 2, "x": ' + "9" * 5000 + "}", "unreadable"),  # int() digit limit
        ("[" * 100_000 + "]" * 100_000, "unreadable"),  # RecursionError
        (b"\xff\xfe{}", "unreadable"),
    ],
)
def test_damage_is_a_state_error(tmp_path: Path, content: str | bytes, error: str) -> None:
    path = tmp_path / STATE_FILE
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(StateError, match=error):
        load_state(tmp_path, BOOT)


def test_a_version_1_file_is_not_restored_and_says_why(tmp_path: Path) -> None:
    """Version 1 kept no uid: its entries could enrol any process at their PID and start."""
    (tmp_path / STATE_FILE).write_text(
        '{"version": 1, "registrations": {"1-2": {"declaration": {"cpus": 1}}}}'
    )
    with pytest.raises(StateError, match=r"a version 1 state file .* not restored"):
        load_state(tmp_path, BOOT)


def test_a_huge_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    with open(path, "wb") as file:
        file.truncate(300 * 1024 * 1024)  # sparse: takes no disk, but reading it would
    started = time.monotonic()
    with pytest.raises(StateError, match=f"{300 * 1024 * 1024} bytes, more than the"):
        load_state(tmp_path, BOOT)
    assert time.monotonic() - started < 0.5


def test_too_many_registrations_are_refused(tmp_path: Path) -> None:
    entries = {f"{pid}-1": {"uid": 0} for pid in range(MAX_REGISTRATIONS + 1)}
    (tmp_path / STATE_FILE).write_text(document(entries))
    with pytest.raises(StateError, match=f"more than the {MAX_REGISTRATIONS}"):
        load_state(tmp_path, BOOT)


def test_a_file_others_could_have_written_is_not_trusted(tmp_path: Path) -> None:
    save_state(tmp_path / "run", [("1-2", KEPT)], BOOT)
    path = tmp_path / "run" / STATE_FILE
    for mode, shown in ((0o620, "0620"), (0o602, "0602")):
        path.chmod(mode)
        with pytest.raises(StateError, match=f"writable by group or others \\(mode {shown}\\)"):
            load_state(tmp_path / "run", BOOT)
    path.chmod(0o644)
    (tmp_path / "run").chmod(0o777)
    with pytest.raises(StateError, match="run: writable by group or others"):
        load_state(tmp_path / "run", BOOT)
    (tmp_path / "run").chmod(0o755)
    if os.geteuid() == 0:  # only root can give a file away
        os.chown(path, 65534, 65534)
        with pytest.raises(StateError, match="owned by uid 65534, not by root"):
            load_state(tmp_path / "run", BOOT)
        os.chown(path, 0, 0)
    assert load_state(tmp_path / "run", BOOT) == {"1-2": KEPT}


def test_a_symlink_a_fifo_or_a_directory_is_not_read(tmp_path: Path) -> None:
    save_state(tmp_path / "elsewhere", [("1-2", KEPT)], BOOT)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / STATE_FILE).symlink_to(tmp_path / "elsewhere" / STATE_FILE)
    with pytest.raises(StateError, match="cannot open"):
        load_state(tmp_path / "run", BOOT)
    (tmp_path / "run" / STATE_FILE).unlink()
    os.mkfifo(tmp_path / "run" / STATE_FILE)  # opening it to read would wait for a writer
    with pytest.raises(StateError, match="not a regular file"):
        load_state(tmp_path / "run", BOOT)
    (tmp_path / "run" / STATE_FILE).unlink()
    (tmp_path / "run" / STATE_FILE).mkdir()  # os.fdopen would raise IsADirectoryError
    with pytest.raises(StateError, match="not a regular file"):
        load_state(tmp_path / "run", BOOT)


def test_save_keeps_within_what_load_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The largest registrations there can be, more of them than fit: what is written loads."""
    widest = Registration(
        Declaration(*[MAX_DECLARED] * 5),
        True,
        tuple(Pool(f"{index:02d}" + "x" * 62, MAX_DECLARED) for index in range(64)),
    )
    entries = [
        (f"{4_000_000_000 + n}-{10**19 + n}", KeptRegistration(2**32 - 2, widest))
        for n in range(1000)
    ]
    left_out = save_state(tmp_path, entries, BOOT)
    size = (tmp_path / STATE_FILE).stat().st_size
    assert 0 < left_out < len(entries) and MAX_STATE_BYTES - 10_000 < size <= MAX_STATE_BYTES
    assert len(load_state(tmp_path, BOOT)) == len(entries) - left_out
    monkeypatch.setattr(state, "MAX_REGISTRATIONS", 3)
    assert save_state(tmp_path, [(f"{n}-1", KEPT) for n in range(5)], BOOT) == 2
    assert sorted(load_state(tmp_path, BOOT)) == ["0-1", "1-1", "2-1"]  # the oldest jobs


def test_overwrite_replaces_whole_file(tmp_path: Path) -> None:
    save_state(tmp_path, [("1-1", KEPT)], BOOT)
    save_state(tmp_path, [], BOOT)
    assert json.loads((tmp_path / STATE_FILE).read_text())["registrations"] == {}
