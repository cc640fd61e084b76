#!/usr/bin/env bash
# Builds the container image and smoke-tests it, as root on a Debian bookworm machine with no
# reachable registry (CI): a debootstrap'd bookworm is the base, `podman build` makes the image,
# and as `podman run` is refused on these machines, the image's own Cmd runs with chroot in
# the container's mounted root filesystem, as the image's user and with the image's Env:
# `syncsvc migrate`, then the Cmd (`syncsvc serve`) on a free 127.0.0.1 port until the image's
# HEALTHCHECK command passes and GET /healthz answers 200, then SIGTERM must stop it cleanly.
#
#   sudo bash scripts/image.sh            # IMAGE=localhost/syncsvc, BASE_IMAGE=localhost/base
#
# Prints one timing line per step; any failing step fails the script, and everything it set up
# (server, mounts, container, debootstrap folder) is removed on the way out.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/syncsvc}
BASE_IMAGE=${BASE_IMAGE:-localhost/base}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

say() { echo "image: $*" >&2; }
die() { say "FAILED: $*"; exit 1; }
ms() { local t=${EPOCHREALTIME/[.,]/}; echo $((t / 1000)); }
step_start() { STEP=$1; STEP_T0=$(ms); }
step_done() {
  local d=$(($(ms) - STEP_T0))
  say "$(printf '%-11s %4d.%01d s' "$STEP" $((d / 1000)) $((d % 1000 / 100)))${1:+  ($1)}"
}

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, podman, chroot)"

WORK=$(mktemp -d /var/tmp/syncsvc-image.XXXXXX)
ROOTFS=$WORK/rootfs
CID=
MNT=
SERVE_PID=

cleanup() {
  local rc=$?
  set +e
  if [ -n "$SERVE_PID" ] && kill -0 "$SERVE_PID" 2>/dev/null; then
    kill -KILL "$SERVE_PID" 2>/dev/null
    wait "$SERVE_PID" 2>/dev/null
  fi
  # Whatever is mounted below our folders (debootstrap's /proc and /sys if it was interrupted,
  # the chroot's /proc), deepest first, before anything is deleted.
  for dir in "$MNT" "$ROOTFS"; do
    [ -n "$dir" ] || continue
    findmnt -rno TARGET | grep -F "$dir/" | sort -r | while read -r target; do
      umount -l "$target"
    done
  done
  if [ -n "$CID" ]; then
    # (podman 4.3 logs an error about systemd healthcheck timers here: there is no systemd.)
    podman umount "$CID" >/dev/null 2>&1
    podman rm -f "$CID" >/dev/null 2>&1
    podman container exists "$CID" && say "warning: could not remove container $CID"
  fi
  rm -rf --one-file-system "$WORK"
  [ "$rc" = 0 ] || say "FAILED (exit $rc); see the messages above"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

step_start install
if ! command -v podman >/dev/null || ! command -v debootstrap >/dev/null; then
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    podman debootstrap >/dev/null
fi
step_done "$(podman --version)"

step_start debootstrap
debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
  || { tail -n 30 "$WORK/debootstrap.log" >&2; die "debootstrap"; }
# The packages it downloaded and apt's lists are of no use in the image.
find "$ROOTFS/var/cache/apt/archives" "$ROOTFS/var/lib/apt/lists" -type f -delete
tar -C "$ROOTFS" -c . | podman import -q - "$BASE_IMAGE" >/dev/null
rm -rf --one-file-system "$ROOTFS"
step_done "$BASE_IMAGE $(podman image inspect -f '{{.Size}}' "$BASE_IMAGE" | numfmt --to=si)B"

step_start build
# These machines reach PyPI through a TLS-inspecting proxy whose CA only the host trusts:
# lend the host's bundle to pip as a build secret (not stored in the image).
secret=()
ca=${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
[ -s "$ca" ] && secret=(--secret "id=pip_ca,src=$ca")
# Docker format keeps the HEALTHCHECK (OCI images have none).
podman build --isolation=chroot --format docker --pull=never "${secret[@]}" \
  --build-arg BASE="$BASE_IMAGE" -t "$IMAGE" . >"$WORK/build.log" 2>&1 \
  || { tail -n 40 "$WORK/build.log" >&2; die "podman build"; }
step_done "$IMAGE $(podman image inspect -f '{{.Size}}' "$IMAGE" | numfmt --to=si)B"

step_start smoke
# What the image declares: its Env, User, WorkingDir, Cmd and HEALTHCHECK command.
mapfile -t image_env < <(podman image inspect -f '{{range .Config.Env}}{{println .}}{{end}}' "$IMAGE" | sed '/^$/d')
mapfile -t cmd < <(podman image inspect -f '{{range .Config.Cmd}}{{println .}}{{end}}' "$IMAGE" | sed '/^$/d')
mapfile -t check < <(podman image inspect -f '{{range .Config.Healthcheck.Test}}{{println .}}{{end}}' "$IMAGE" | sed '/^$/d')
user=$(podman image inspect -f '{{.Config.User}}' "$IMAGE")
workdir=$(podman image inspect -f '{{.Config.WorkingDir}}' "$IMAGE")
[ "${#cmd[@]}" -gt 0 ] || die "the image declares no Cmd"
[ -n "$user" ] || die "the image declares no User (it would run as root)"
[ "${check[0]:-}" = CMD-SHELL ] || die "the image declares no HEALTHCHECK CMD (got '${check[*]:-}')"

CID=$(podman create -q "$IMAGE")
MNT=$(podman mount "$CID")
# The User may be a name: look it up in the image's own passwd/group files.
uid=$(awk -F: -v u="${user%%:*}" '$1 == u || $3 == u { print $3; exit }' "$MNT/etc/passwd")
gid=$(awk -F: -v u="${user%%:*}" '$1 == u || $3 == u { print $4; exit }' "$MNT/etc/passwd")
[ -n "$uid" ] && [ "$uid" != 0 ] || die "the image's user '$user' is missing or root"
mount -t proc proc "$MNT/proc"

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
key=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
# The image's Env, plus what an operator supplies: a secret key and the port (the HEALTHCHECK
# reads SYNCSVC_PORT too).
run_env=("${image_env[@]}" "SYNCSVC_SECRET_KEY=$key" "SYNCSVC_PORT=$port")
# As the image's user, in its WorkingDir, with its environment (each step execs the next,
# so a background job's $! is the server's own PID).
in_image=(env -i "${run_env[@]}" chroot --userspec="$uid:$gid" "$MNT"
  /bin/sh -c 'cd "$0" && exec "$@"' "${workdir:-/}")

"${in_image[@]}" "${cmd[0]}" migrate || die "${cmd[0]} migrate"
[ "$(stat -c %u "$MNT/data/syncsvc.db" 2>/dev/null)" = "$uid" ] \
  || die "migrate left no /data/syncsvc.db owned by uid $uid (SYNCSVC_DATABASE_URL default?)"

# The declared Cmd, bound to loopback only for the test (the last --host wins).
"${in_image[@]}" "${cmd[@]}" --host 127.0.0.1 >"$WORK/serve.log" 2>&1 &
SERVE_PID=$!
for _ in $(seq 1 150); do
  kill -0 "$SERVE_PID" 2>/dev/null || { cat "$WORK/serve.log" >&2; die "serve exited early"; }
  "${in_image[@]}" /bin/sh -c "${check[1]}" >/dev/null 2>&1 && break
  sleep 0.2
done
"${in_image[@]}" /bin/sh -c "${check[1]}" || { cat "$WORK/serve.log" >&2; die "HEALTHCHECK never passed"; }
# The server's process (chroot exec'd into it) runs as the image's user, not root.
serve_uid=$(awk '/^Uid:/ { print $2 }' "/proc/$SERVE_PID/status")
[ "$serve_uid" = "$uid" ] || die "serve runs as uid $serve_uid, not $uid"
python3 - "$port" <<'PY' || { cat "$WORK/serve.log" >&2; die "GET /healthz from the host"; }
import sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/healthz", timeout=5) as r:
    assert r.status == 200, r.status
    print(f"image: GET /healthz -> {r.status} {r.read().decode()[:80]}", file=sys.stderr)
PY
kill -TERM "$SERVE_PID"
rc=0
wait "$SERVE_PID" || rc=$?
SERVE_PID=
[ "$rc" = 0 ] || { cat "$WORK/serve.log" >&2; die "serve exited $rc on SIGTERM"; }
step_done "migrate, serve as uid $uid, HEALTHCHECK, /healthz, SIGTERM"
say "ok: $IMAGE"
