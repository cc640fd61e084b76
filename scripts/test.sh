#!/usr/bin/env bash
# Installs everything the tests need on a fresh Debian machine, then lints, type-checks and tests.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    redis-server postgresql chromium gir1.2-ical-3.0 python3-gi podman debootstrap >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -e '.[test]'
# The container image is built and smoke-tested (scripts/image.sh, as root only: debootstrap,
# podman, chroot) beside the checks and the tests, at a lower priority; its result counts.
image_pid=
image_log=$(mktemp)
if [ "$(id -u)" = 0 ]; then
  nice -n 10 bash scripts/image.sh >"$image_log" 2>&1 &
  image_pid=$!
else
  echo "test.sh: not root, so the image is not built (sudo bash scripts/image.sh does it)" >&2
fi
rc=0
{
  .venv/bin/ruff check . &&
    .venv/bin/ruff format --check . &&
    .venv/bin/mypy &&
    .venv/bin/lint-imports &&
    .venv/bin/pytest -q -p no:cacheprovider "$@"
} || rc=$?
if [ -n "$image_pid" ]; then
  wait "$image_pid" || rc=$((rc ? rc : 1))
  cat "$image_log" >&2
fi
rm -f "$image_log"
exit "$rc"
