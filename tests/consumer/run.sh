#!/usr/bin/env bash
# Embedding check: installs the build at BUILD_DIR into a fresh temporary
# prefix, then configures, builds and runs an embedding project against that
# prefix alone (find_package(switchyard CONFIG)): tests/consumer by default,
# or PROJECT (relative to SOURCE_DIR) and its EXECUTABLE.
# usage: tests/consumer/run.sh SOURCE_DIR BUILD_DIR [PROJECT EXECUTABLE]
set -euo pipefail

if [[ $# -ne 2 && $# -ne 4 ]]; then
  echo "usage: $0 SOURCE_DIR BUILD_DIR [PROJECT EXECUTABLE]" >&2
  exit 2
fi
src="$(cd "$1" && pwd)"
build="$(cd "$2" && pwd)"
consumer_src="$src/${3:-tests/consumer}"
executable="${4:-consumer}"
[[ -f "$consumer_src/CMakeLists.txt" ]] || { echo "no consumer project at $consumer_src" >&2; exit 2; }

tmp="$(mktemp -d "${TMPDIR:-/tmp}/switchyard-consumer.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

echo "-- installing $build into $tmp/prefix"
cmake --install "$build" --prefix "$tmp/prefix" >"$tmp/install.log" 2>&1 || {
  cat "$tmp/install.log" >&2
  echo "consumer: cmake --install failed" >&2
  exit 1
}

echo "-- configuring consumer"
cmake -S "$consumer_src" -B "$tmp/build" -G Ninja \
  -DCMAKE_PREFIX_PATH="$tmp/prefix" \
  -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_FIND_PACKAGE_NO_PACKAGE_REGISTRY=ON

echo "-- building consumer"
cmake --build "$tmp/build"

echo "-- running $executable"
"$tmp/build/$executable"
