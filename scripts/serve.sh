#!/usr/bin/env bash
# Installs syncsvc into .venv and runs it on the embedded default (SQLite, no Redis).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -e .
exec .venv/bin/syncsvc serve "$@"
