"""corecapd's Prometheus metrics under systemd, hardened. Guest side of the VM tier (see
guest_service.py): the shipped unit with the shipped metrics drop-in and socket unit
(systemd/metrics.conf, systemd/corecapd-metrics.socket), daemon.metrics on.

It checks what issue 13 asks of the unit: with metrics on, `systemd-analyze security` stays
at or below 2.0 for the unit as loaded (drop-in included); the service still may not create
an Internet socket (it serves on the one systemd made and handed over); the socket unit's
IP allow list drops scrapes from elsewhere; and a scrape shows a marked job.
"""

from __future__ import annotations

import re
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from guest_service import MARKER, POLICY, RULE, UNIT, UNIT_DIR, derive_unit, policy, show, unit_log
from guestkit import GUEST_ONLY, PYTHON, SRC, sh, wait_for

pytestmark = GUEST_ONLY

SOCKET_UNIT = "corecapd-metrics.socket"
ADDRESS = "127.0.0.1:9787"  # the socket unit's ListenStream=, as shipped
DROP_IN = UNIT_DIR / f"{UNIT}.d" / "metrics.conf"
# Narrower than the shipped `localhost` (all of 127.0.0.0/8): so that a scrape from
# 127.0.0.2 is one the filter must drop.
SOCKET_DROP_IN = UNIT_DIR / f"{SOCKET_UNIT}.d" / "allow.conf"
MAX_EXPOSURE = 2.0


def scrape() -> str:
    with urllib.request.urlopen(f"http://{ADDRESS}/metrics", timeout=10) as answer:
        return str(answer.read().decode())


def connect_from(source: str, timeout: float) -> None:
    """Open a connection to the metrics socket from `source`, a loopback address."""
    host, port = ADDRESS.split(":")
    with socket.create_connection((host, int(port)), timeout=timeout, source_address=(source, 0)):
        pass


@pytest.fixture(scope="module")
def metrics_service() -> Iterator[subprocess.Popen[bytes]]:
    shipped = (SRC / "systemd" / UNIT).read_text()
    POLICY.write_text(policy().replace("[defaults]", f'metrics = "{ADDRESS}"\n\n[defaults]'))
    (UNIT_DIR / UNIT).write_text(derive_unit(shipped))
    (UNIT_DIR / SOCKET_UNIT).write_text((SRC / "systemd" / SOCKET_UNIT).read_text())
    DROP_IN.parent.mkdir(exist_ok=True)
    DROP_IN.write_text((SRC / "systemd" / "metrics.conf").read_text())
    SOCKET_DROP_IN.parent.mkdir(exist_ok=True)
    SOCKET_DROP_IN.write_text("[Socket]\nIPAddressAllow=\nIPAddressAllow=127.0.0.1\n")
    sh("systemctl", "daemon-reload")
    child = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(600)", MARKER])
    try:
        if sh("systemctl", "start", UNIT, check=False, timeout=150).returncode != 0:
            pytest.fail(f"corecapd with metrics did not start\n{unit_log()}")
        yield child
    finally:
        sh("systemctl", "stop", UNIT, SOCKET_UNIT, check=False)
        child.kill()
        child.wait(timeout=30)
        for path in (DROP_IN, SOCKET_DROP_IN, UNIT_DIR / SOCKET_UNIT, UNIT_DIR / UNIT):
            path.unlink(missing_ok=True)
        for directory in (DROP_IN.parent, SOCKET_DROP_IN.parent):
            if directory.is_dir():
                directory.rmdir()
        POLICY.unlink(missing_ok=True)
        sh("systemctl", "daemon-reload")
        sh("systemctl", "reset-failed", UNIT, SOCKET_UNIT, check=False)


def test_exposure_with_metrics_on_is_at_most_2(metrics_service: subprocess.Popen[bytes]) -> None:
    assert DROP_IN.as_posix() in show("DropInPaths")
    table = sh("systemd-analyze", "security", "--no-pager", UNIT).stdout
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", table)
    assert found, table
    assert float(found.group(1)) <= MAX_EXPOSURE, table


def test_the_service_opens_no_internet_socket_it_serves_systemds(
    metrics_service: subprocess.Popen[bytes],
) -> None:
    families = show("RestrictAddressFamilies")
    assert "AF_INET" not in families and "AF_NETLINK" in families, families
    assert show("IPAddressDeny") and not show("IPAddressAllow")  # the service's: none
    assert show("ActiveState", SOCKET_UNIT) == "active"
    main_pid = show("MainPID")
    listening = sh("ss", "-Hltnp", f"sport = :{ADDRESS.split(':')[1]}").stdout
    # one listening socket, held by PID 1 (which made it) and by corecapd (handed over)
    assert f"pid={main_pid}," in listening and "pid=1," in listening, listening
    log = sh("journalctl", "--no-pager", "-u", UNIT, f"_PID={main_pid}").stdout
    assert "metrics-unavailable" not in log and "no metrics at" not in log, log


def test_a_scrape_shows_the_marked_job(metrics_service: subprocess.Popen[bytes]) -> None:
    pid = metrics_service.pid
    series = re.compile(
        rf'corecap_job_threads\{{corecap_job="{pid}-\d+",rule="{RULE}",user="root"\}} (\S+)'
    )
    found = wait_for(lambda: series.search(scrape()), f"job {pid} in the scrape")
    assert float(found.group(1)) >= 1
    text = scrape()
    assert "corecap_build_info{" in text and "process_cpu_seconds_total" in text
    assert 'corecap_cpus{state="held"} 1.0' in text


def test_the_socket_units_allow_list_drops_other_addresses(
    metrics_service: subprocess.Popen[bytes],
) -> None:
    connect_from("127.0.0.1", timeout=10)
    with pytest.raises(OSError):  # its packets are dropped: the connection times out
        connect_from("127.0.0.2", timeout=3)
    assert "corecap_build_info" in scrape()  # from the allowed address, still served


def test_stopping_corecapd_stops_its_socket(metrics_service: subprocess.Popen[bytes]) -> None:
    sh("systemctl", "stop", UNIT, timeout=150)
    assert show("ActiveState") == "inactive"
    assert show("ActiveState", SOCKET_UNIT) == "inactive"  # PartOf=: no scrape restarts it
    assert Path(f"/proc/{metrics_service.pid}").exists()  # the job is left running
