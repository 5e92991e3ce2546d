#!/usr/bin/env bash
# The GPU check on a machine with an NVIDIA GPU (e.g. a lent H100): prints what
# the machine has, then runs gpu_check (every CUDA kernel against the CPU
# reference, a 1-rank NCCL communicator, the device MoE layer against the host
# layer, and the timing table). Multi-rank NCCL needs one GPU per rank and is
# not checked on a one-GPU machine (gpu_check says so).
# Usage: tests/gpu/run.sh [BUNDLE_DIR]   (made by tests/gpu/bundle.sh; default .gpu-bundle)
#        or, where the project builds: tests/gpu/run.sh --build-dir build
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
if [ "${1:-}" = "--build-dir" ]; then
  binary=$2/bin/gpu_check
  libdir=$2/lib
else
  bundle=${1:-$root/.gpu-bundle}
  binary=$bundle/bin/gpu_check
  libdir=$bundle/lib
fi
[ -x "$binary" ] || { echo "run.sh: no gpu_check at $binary (make one with tests/gpu/bundle.sh)"; exit 2; }
echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 || echo "nvidia-smi failed"
command -v nvcc >/dev/null && nvcc --version | tail -2
uname -r; nproc
# cuBLAS and NCCL: the CUDA toolkit's, or the wheels PyTorch brings.
dirs=$libdir
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do [ -d "$d" ] && dirs=$dirs:$d; done
if command -v python3 >/dev/null; then
  for sp in $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null); do
    [ -d "$sp/nvidia" ] || continue
    for f in $(find "$sp/nvidia" -name 'libnccl.so*' -o -name 'libcublas.so*' -o -name 'libcublasLt.so*' 2>/dev/null); do
      dirs=$dirs:$(dirname "$f")
    done
  done
fi
export LD_LIBRARY_PATH=$dirs:${LD_LIBRARY_PATH:-}
if ldd "$binary" | grep "not found"; then echo "run.sh: missing libraries above"; exit 2; fi
ldd "$binary" | grep -E "nccl|cublas|cudart" | awk '{print "uses " $3}'
echo "== gpu_check"
timeout 420 "$binary" "${@:3}"
