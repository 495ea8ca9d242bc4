#!/usr/bin/env bash
# Sets up what is missing, then runs corecapd in the foreground with the shipped policy
# (or the policy given with --config). Needs root: it confines other users' processes.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh runtime
exec .venv/bin/corecapd --config "${CORECAP_CONFIG:-etc/corecap.toml}" "$@"
