"""The shipped systemd unit, checked by systemd's own offline analyser."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).parents[1] / "systemd"
UNIT = SYSTEMD / "corecapd.service"
METRICS_SOCKET = SYSTEMD / "corecapd-metrics.socket"
METRICS_DROP_IN = SYSTEMD / "metrics.conf"
MAX_EXPOSURE = 2.0  # issue 13: with metrics on too


def test_unit_is_notify_with_watchdog_and_reload() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(UNIT)
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["WatchdogSec"]
    assert "kill -HUP $MAINPID" in service["ExecReload"]
    assert service["RuntimeDirectory"] == "corecap"


def exposure(*args: str) -> tuple[float, str]:
    """`systemd-analyze security --offline=true ARGS`: the overall exposure, and the table."""
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    return float(found.group(1)), result.stdout


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_unit_hardening_exposure_is_low() -> None:
    level, table = exposure(str(UNIT))
    assert level <= MAX_EXPOSURE, table


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_with_metrics_on_the_exposure_stays_low(tmp_path: Path) -> None:
    """The metrics drop-in as the README installs it: the socket is systemd's, handed over,
    so the service gets no Internet address family and no IP allow list of its own."""
    units = tmp_path / "etc/systemd/system"
    (units / "corecapd.service.d").mkdir(parents=True)
    shutil.copy(UNIT, units)
    shutil.copy(METRICS_SOCKET, units)
    shutil.copy(METRICS_DROP_IN, units / "corecapd.service.d")
    level, table = exposure(f"--root={tmp_path}", "corecapd.service")
    assert level <= MAX_EXPOSURE, table
    assert "Service may allocate Internet sockets" not in table, table
    assert "Service blocks all IP address ranges" in table, table


def test_metrics_socket_filters_who_may_scrape_and_goes_with_the_service() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(METRICS_SOCKET)
    assert unit["Unit"]["PartOf"] == "corecapd.service"
    socket = unit["Socket"]
    assert socket["Service"] == "corecapd.service"
    assert socket["ListenStream"] == "127.0.0.1:9787"  # the README's daemon.metrics
    assert (socket["IPAddressDeny"], socket["IPAddressAllow"]) == ("any", "localhost")
    assert not unit.has_section("Install")  # started by corecapd's drop-in only
    drop_in = configparser.ConfigParser(strict=False, interpolation=None)
    drop_in.read(METRICS_DROP_IN)
    assert drop_in["Service"]["Sockets"] == METRICS_SOCKET.name
    assert drop_in["Unit"]["Wants"] == drop_in["Unit"]["After"] == METRICS_SOCKET.name
