#!/usr/bin/env bash
# Deploy check 4: Dockerfile and Dockerfile.cuda, as far as a machine without
# a container engine can check them (see check_dockerfile.py): stages and
# base image, runtime packages that exist and provide every library the
# built binaries link, non-root user, ports, HEALTHCHECK flags, checkpoint
# path, .dockerignore.
#   bash tests/deploy/check_dockerfile.sh VDM_SERVER VDM_CLIENT REPO_ROOT
set -euo pipefail
server=${1:?usage: check_dockerfile.sh VDM_SERVER VDM_CLIENT REPO_ROOT}
client=${2:?usage: check_dockerfile.sh VDM_SERVER VDM_CLIENT REPO_ROOT}
repo=${3:?usage: check_dockerfile.sh VDM_SERVER VDM_CLIENT REPO_ROOT}
for tool in readelf ldd dpkg apt-cache; do
  command -v "$tool" >/dev/null || { echo "FAILED: $tool is not on PATH" >&2; exit 1; }
done
exec /usr/bin/python3 "$repo/tests/deploy/check_dockerfile.py" "$repo" "$server" "$client"
