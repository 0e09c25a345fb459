#!/usr/bin/env bash
# Installs, with apt-get, the Debian packages vdm-serve needs that are not installed yet.
# Safe to run again: it skips what is already there and says what it does.
set -euo pipefail

packages=(
  cmake g++ make pkg-config
  libtorch-dev python3-torch
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler grpc-proto
  libabsl-dev prometheus-cpp-dev
  googletest libgtest-dev libgmock-dev
  libpng-dev zlib1g-dev
  libopenblas0-pthread
  dataset-fashion-mnist
  nlohmann-json3-dev
  libcpp-httplib-dev libssl-dev libgoogle-glog-dev
  yamllint
  clang libclang-rt-14-dev
  python3-grpcio python3-protobuf python3-numpy python3-pil
  python3-pip python3-venv python3-setuptools python3-wheel
)
optional=(ccache)

missing=()
for p in "${packages[@]}" "${optional[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} required packages are already installed."
  exit 0
fi

echo "install-deps: installing missing packages: ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null; then SUDO="sudo"; else
    echo "install-deps: need root (or sudo) to run apt-get" >&2; exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
required_missing=()
for p in "${missing[@]}"; do
  if [[ " ${optional[*]} " == *" $p "* ]]; then
    $SUDO apt-get install -y -qq --no-install-recommends "$p" >/dev/null \
      || echo "install-deps: optional package $p is not available; continuing without it"
  else
    required_missing+=("$p")
  fi
done
if [ ${#required_missing[@]} -gt 0 ]; then
  $SUDO apt-get install -y -qq --no-install-recommends "${required_missing[@]}"
fi
echo "install-deps: done."
