#!/usr/bin/env bash
# Installs what corecap needs on a Debian host, and nothing twice: the apt packages that
# systemd-python builds against (and, for tests, the manual page tools), then a virtual
# environment at .venv with the project and its daemon's dependencies (`[daemon]`; the job
# library alone, `pip install corecap`, needs neither).
# Usage: scripts/bootstrap.sh [runtime|test]
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-runtime}

python=${PYTHON:-python3}
need=()
dpkg -s pkg-config >/dev/null 2>&1 || need+=(pkg-config)
dpkg -s gcc >/dev/null 2>&1 || need+=(gcc)
if ! dpkg -s libsystemd-dev >/dev/null 2>&1; then
  # Pinned to the installed libsystemd0: unpinned, apt would also upgrade systemd and udev.
  need+=("libsystemd-dev=$(dpkg-query -W -f='${Version}' libsystemd0)")
fi
"$python" -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
# tests/test_docs.py checks the manual pages with groff, man and mandoc; bench/attribution.py
# takes its ground truth from gdb's backtraces; tests/test_top.py runs corecapctl top in tmux;
# tests/test_prometheus.py runs promtool and a real Prometheus server (package prometheus);
# bench/exec_latency.py measures against cgrulesengd (cgroup-tools) in the same run.
if [ "$profile" = test ]; then
  for package in groff-base man-db mandoc gdb tmux prometheus cgroup-tools; do
    dpkg -s "$package" >/dev/null 2>&1 || need+=("$package")
  done
fi
"$python" -c 'import os, sysconfig; assert os.path.exists(sysconfig.get_paths()["include"] + "/Python.h")' \
  2>/dev/null || need+=(python3-dev)
if ((${#need[@]})); then
  echo "bootstrap: apt-get install ${need[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || "$python" -m venv .venv
extras="[daemon]"
# [test] brings what the tests run for real: TensorFlow, Ray Tune (tests/test_ray.py) and
# Optuna (tests/test_optuna.py); Ray and Optuna add ~1 min from the package index.
[ "$profile" = test ] && extras="[daemon,test]"
stamp=".venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)-$profile"
if [ ! -e "$stamp" ]; then
  echo "bootstrap: pip install -e .$extras" >&2
  .venv/bin/pip install -q --disable-pip-version-check -e ".$extras"
  touch "$stamp"
fi
