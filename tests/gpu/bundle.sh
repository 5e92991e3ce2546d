#!/usr/bin/env bash
# Packs the GPU check for a machine that has a GPU but none of our Debian
# libraries: the gpu_check binary built here plus every shared library it
# loads that such a machine lacks (ours, oneDNN, spdlog, fmt, OpenMP, the CUDA
# runtime). cuBLAS and NCCL are large and come from the GPU machine (its CUDA
# toolkit or PyTorch's wheels); glibc and libstdc++ come from its system.
# Usage: tests/gpu/bundle.sh [BUILD_DIR] [OUT_DIR]   (defaults: build, .gpu-bundle)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${1:-$root/build}
out=${2:-$root/.gpu-bundle}
cmake --build "$build" --target gpu_check >/dev/null
rm -rf "$out" && mkdir -p "$out/bin" "$out/lib" "$out/scripts"
cp "$build/bin/gpu_check" "$out/bin/"
ldd "$build/bin/gpu_check" | awk '/=> \// {print $1, $3}' | while read -r name path; do
  case "$name" in
    libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*|ld-linux*|libstdc++.so*|libgcc_s.so*) ;;  # the system's
    libcublas*|libnccl*|libcuda.so*) ;;                                                          # the GPU machine's
    *) cp -L "$path" "$out/lib/$name" ;;
  esac
done
strip --strip-unneeded "$out/bin/gpu_check" "$out"/lib/libswitchyard_* 2>/dev/null || true
cp "$root/tests/gpu/run.sh" "$out/scripts/"
du -sh "$out" | awk '{print "gpu bundle: " $1 " in '"$out"'"}'
