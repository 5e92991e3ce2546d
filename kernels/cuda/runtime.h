// CUDA runtime helpers shared by the CUDA kernels, the NCCL backend and the
// device MoE layer: error checks that name the failing call, the calling
// thread's current stream, and device tensors (stream-ordered allocations).
// CUDA builds only.
#pragma once

#include <cuda_runtime_api.h>

#include <memory>

#include "core/device_memory.h"
#include "core/tensor.h"

namespace switchyard::cuda {

// Throws IoError "<call> failed at <file>:<line>: <cuda error name>: <text>".
void check(cudaError_t status, const char* call, const char* file, int line);
#define SY_CUDA_CHECK(call) ::switchyard::cuda::check((call), #call, __FILE__, __LINE__)
// After a kernel launch: launch errors (bad configuration) surface at once.
#define SY_CUDA_CHECK_LAUNCH() SY_CUDA_CHECK(cudaGetLastError())

int device_count();
// "NVIDIA H100 80GB HBM3, sm_90, 132 SMs, 79.2 GiB, driver 13.0, runtime 13.0".
std::string describe_device(int device);

// The stream this thread issues device work on (kernels, copies, and what a
// communicator's Work::wait makes wait). Default: the legacy default stream.
cudaStream_t current_stream();
class StreamGuard {
 public:
  explicit StreamGuard(cudaStream_t stream);
  ~StreamGuard();
  StreamGuard(const StreamGuard&) = delete;
  StreamGuard& operator=(const StreamGuard&) = delete;

 private:
  cudaStream_t previous_;
};

// Device memory on `device`, allocated and freed in order on the current
// stream (cudaMallocAsync), so reuse needs no device-wide synchronisation.
// Users of a tensor on another stream make that stream wait before it is freed
// (a communicator's Work keeps its buffers until the op's event completes).
Tensor empty(Shape shape, DType dtype, int device);
Tensor zeros(Shape shape, DType dtype, int device);
// Host <-> device copies on the current stream; to_host synchronises it.
Tensor to_device(const TensorView& host, int device);
Tensor to_host(const TensorView& t);
// Same shapes, any devices; asynchronous on the current stream.
void copy(const TensorView& dst, const TensorView& src);
// Device `device`'s memory (core/device_memory.h): empty() and copies on the
// calling thread's current stream, synchronised.
std::shared_ptr<DeviceMemory> device_memory(int device);
// Sets every byte (poisoning outputs before a kernel writes them: 0xFF is NaN for floats, -1 for ints).
void fill_bytes(const TensorView& t, unsigned char value);

}  // namespace switchyard::cuda
