#!/usr/bin/env bash
# Builds the container image from Dockerfile for real and checks that what it
# serves works: health, the image's own HEALTHCHECK command, Sample, ScoreBPD
# and /metrics, then a clean stop on SIGTERM.
#
#   scripts/container-check.sh            # as root; installs podman, buildah, debootstrap
#
# Steps:
#   1. The base image (Dockerfile's DEBIAN_IMAGE). When the local store has
#      none, one is made from Debian's archive with
#      `debootstrap --variant=minbase bookworm` and imported into podman, so
#      no registry is needed.
#   2. `podman build --format=docker --isolation=chroot --network=host` of the
#      Dockerfile (docker format: OCI images drop HEALTHCHECK).
#   3. The image's entrypoint runs as the image's user (10001) with
#      `podman run` where the machine allows it; where it refuses (some
#      sandboxes forbid the runtime's setrlimit), from the mounted image in a
#      chroot as that user, with /proc, /sys and /dev bound in and a scratch
#      /tmp (the mounted image is read-only).
#   4. Health, the HEALTHCHECK command, Sample and ScoreBPD through the
#      image's vdm-client, /metrics over HTTP; SIGTERM and exit status 0.
#
# Environment: VDM_IMAGE (tag, default vdm-serve:check), VDM_BASE_IMAGE
# (default localhost/vdm-debian:bookworm), DEBIAN_MIRROR (default: the first
# URIs of /etc/apt/sources.list.d/debian.sources, else deb.debian.org),
# CONTAINER_CHECK_DIR (work directory, default /var/tmp/vdm-container-check).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
say() { echo "container-check: $*"; }
die() { echo "container-check: FAILED: $*" >&2; exit 1; }

image=${VDM_IMAGE:-vdm-serve:check}
base=${VDM_BASE_IMAGE:-localhost/vdm-debian:bookworm}
work=${CONTAINER_CHECK_DIR:-/var/tmp/vdm-container-check}
grpc_port=${VDM_CHECK_GRPC_PORT:-50391}
http_port=${VDM_CHECK_HTTP_PORT:-50392}
mkdir -p "$work"

# ---- 1. tools ----------------------------------------------------------------
need=()
for pair in podman:podman buildah:buildah debootstrap:debootstrap; do
  command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "needs root to install ${need[*]}"
  say "installing ${need[*]} (apt-get)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    "${need[@]}" >/dev/null
else
  say "podman, buildah and debootstrap are installed"
fi

# ---- 2. base image -----------------------------------------------------------
if podman image exists "$base"; then
  say "base image $base is present"
else
  mirror=${DEBIAN_MIRROR:-$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' \
      /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)}
  mirror=${mirror:-http://deb.debian.org/debian}
  rootfs="$work/rootfs"
  rm -rf "$rootfs"
  say "making base image $base: debootstrap --variant=minbase bookworm from $mirror"
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" \
    > "$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log"; die "debootstrap"; }
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | podman import - "$base" >/dev/null 2>&1
  rm -rf "$rootfs"
  say "base image made ($(podman image inspect --format '{{.Size}}' "$base") bytes)"
fi

# ---- 3. the image ------------------------------------------------------------
build_start=$(date +%s)
say "building $image from Dockerfile (log: $work/build.log)"
podman build --format=docker --isolation=chroot --network=host \
  --build-arg DEBIAN_IMAGE="$base" -t "$image" -f Dockerfile . \
  > "$work/build.log" 2>&1 || { tail -30 "$work/build.log"; die "podman build"; }
say "image built in $(( $(date +%s) - build_start )) s," \
    "$(podman image inspect --format '{{.Size}}' "$image") bytes"

# ---- 4. run the entrypoint -----------------------------------------------------
entry=$(podman image inspect --format '{{join .Config.Entrypoint " "}}' "$image")
user=$(podman image inspect --format '{{.Config.User}}' "$image")
workdir=$(podman image inspect --format '{{.Config.WorkingDir}}' "$image")
[ "$entry" = vdm-server ] || die "entrypoint is '$entry', not vdm-server"
[ "$user" = 10001:10001 ] || die "image user is '$user', not 10001:10001"
server_flags=(--address="127.0.0.1:$grpc_port" --metrics_address="127.0.0.1:$http_port")

mode=""
container=""
mnt=""
server_pid=""
cleanup() {
  if [ -n "$container" ]; then podman rm -f "$container" >/dev/null 2>&1 || true; fi
  if [ -n "$server_pid" ]; then kill -9 "$server_pid" 2>/dev/null || true; fi
  if [ -n "$mnt" ]; then
    for d in tmp dev sys proc; do umount "$mnt/$d" 2>/dev/null || true; done
    podman image unmount "$image" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

# in_image CMD...: runs CMD inside the image as its user.
in_image() {
  if [ "$mode" = podman ]; then
    podman exec "$container" "$@"
  else
    chroot --userspec="$user" "$mnt" /usr/bin/env -C "$workdir" HOME=/tmp "$@"
  fi
}

if container=$(podman run -d --network=host "$image" "${server_flags[@]}" 2>"$work/run.err"); then
  mode=podman
  say "running the image with podman run (container ${container:0:12})"
else
  container=""
  say "podman run refused here ($(tail -1 "$work/run.err")); running the entrypoint in a chroot of the image as $user"
  mode=chroot
  mnt=$(podman image mount "$image")
  for d in proc sys dev; do mount --bind "/$d" "$mnt/$d"; done
  # The mounted image is read-only: a scratch /tmp for the user's outputs.
  rm -rf "$work/tmp" && mkdir -p "$work/tmp" && chown "$user" "$work/tmp"
  mount --bind "$work/tmp" "$mnt/tmp"
  chroot --userspec="$user" "$mnt" /usr/bin/env -C "$workdir" HOME=/tmp \
    vdm-server "${server_flags[@]}" > "$work/server.log" 2>&1 &
  server_pid=$!
fi

client=(vdm-client --target="127.0.0.1:$grpc_port" --timeout_s=30)
say "waiting for health SERVING"
for _ in $(seq 1 240); do
  if in_image "${client[@]}" --max_attempts=1 health >/dev/null 2>&1; then break; fi
  if [ "$mode" = chroot ] && ! kill -0 "$server_pid" 2>/dev/null; then
    tail -20 "$work/server.log"; die "the server exited before it served"
  fi
  sleep 0.5
done
in_image "${client[@]}" --max_attempts=1 health || die "health"

# The image's own HEALTHCHECK command, exactly as the Dockerfile states it
# (with the check's port).
hc=$(podman image inspect --format '{{join .Config.Healthcheck.Test " "}}' "$image")
say "HEALTHCHECK: $hc"
hc_cmd=${hc#CMD }
hc_cmd=${hc_cmd//localhost:50051/127.0.0.1:$grpc_port}
# shellcheck disable=SC2086
in_image $hc_cmd >/dev/null || die "the HEALTHCHECK command failed"

say "Sample through the image's vdm-client"
in_image "${client[@]}" sample --num=2 --steps=5 --seed=1 --out=/tmp/check.png \
  > "$work/sample.log" 2>&1 || { cat "$work/sample.log"; die "sample"; }
say "ScoreBPD of the sampled grid's source images"
in_image "${client[@]}" sample --num=2 --steps=5 --seed=2 --out=/tmp/grid.png \
  --out_dir=/tmp/imgs > /dev/null 2>&1 || die "sample --out_dir"
in_image sh -c "vdm-client --target=127.0.0.1:$grpc_port --timeout_s=120 score --timesteps=4 /tmp/imgs/*.png" \
  > "$work/score.csv" 2>"$work/score.log" || { cat "$work/score.log"; die "score"; }
rows=$(grep -c '\.png' "$work/score.csv" || true)
[ "$rows" = 2 ] || { cat "$work/score.csv"; die "score wrote $rows rows, not 2"; }
say "metrics over HTTP"
curl -sf "http://127.0.0.1:$http_port/metrics" > "$work/metrics.txt" || die "/metrics"
grep -q '^vdm_requests_total' "$work/metrics.txt" || die "/metrics has no vdm_requests_total"
curl -sf "http://127.0.0.1:$http_port/readyz" >/dev/null || die "/readyz"

say "stopping with SIGTERM"
if [ "$mode" = podman ]; then
  podman stop -t 60 "$container" >/dev/null
  code=$(podman inspect --format '{{.State.ExitCode}}' "$container")
else
  kill -TERM "$server_pid"
  code=0; wait "$server_pid" || code=$?
  server_pid=""
fi
[ "$code" = 0 ] || { tail -20 "$work/server.log" 2>/dev/null; die "server exited with $code"; }
say "passed ($mode) in $(( $(date +%s) - start )) s"
