#!/usr/bin/env bash
# Installs the Debian packages Switchyard builds and tests with.
# Idempotent: prints nothing and touches nothing when every package is present.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config
  libopenmpi-dev openmpi-bin
  libucx-dev
  libboost-dev
  libyaml-cpp-dev
  libspdlog-dev libfmt-dev
  libcli11-dev
  libdnnl-dev
  libgtest-dev libgmock-dev
  libbenchmark-dev
  libdlpack-dev
  nlohmann-json3-dev
  zlib1g-dev                               # CRC-32 of checkpoint shards
  gnuplot-nox
  python3-dev pybind11-dev python3-torch   # the Python module and the trainer examples (/usr/bin/python3)
  libopenblas0-openmp                      # torch's BLAS: Debian's default reference BLAS is ~8x slower
  fortunes                                 # English text the tiny language models train on
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install-deps: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  sudo="sudo"
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-deps: done"
