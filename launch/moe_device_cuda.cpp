// The CUDA half of launch/moe_device.h, in its own library
// (libswitchyard_device_cuda) that the CLI loads only when a job asks for a
// GPU: linking CUDA, cuBLAS and NCCL into every invocation cost about 90 MB of
// resident memory and the load time even for `switchyard info`.
#include <cuda_runtime_api.h>

#include "comm/backends/staged/staged_backend.h"
#include "core/config.h"
#include "core/error.h"
#include "kernels/cuda/runtime.h"
#include "launch/moe_device.h"
#include "moe/cuda/cuda_ops.h"
#if SWITCHYARD_HAS_NCCL
#include "comm/backends/nccl/nccl_backend.h"
#endif

namespace switchyard {

// C linkage: looked up by name with dlsym. Errors are thrown (same C++ runtime).
extern "C" void switchyard_make_cuda_moe_device(const std::shared_ptr<Communicator>* world_ptr,
                                                const std::string* field_ptr, int local_rank, int local_size,
                                                MoEDevice* out) {
  const std::shared_ptr<Communicator>& world = *world_ptr;
  const std::string& field = *field_ptr;
  // Every rank checks, and one rank without a GPU fails them all alike.
  const int count = cuda::device_count();
  const double fewest = allreduce_scalar(*world, count, ReduceOp::min);
  if (fewest < 1)
    SY_THROW(NotSupported, field, " = cuda: no CUDA device on ", count < 1 ? "this rank's machine" : "another rank's machine",
             " (rank ", world->rank(), " sees ", count, "); expected a GPU per rank, or cpu");
  const bool processes = world->backend_name() != "threads" && world->backend_name() != "fake";
  const int gpu = (processes ? local_rank : world->rank()) % count;
  SY_CUDA_CHECK(cudaSetDevice(gpu));
  MoEDevice d;
  d.ops = std::make_shared<CudaOps>(gpu);
  d.host_group = world;
  std::string over;
  // NCCL takes one rank per GPU: more processes on a node than GPUs share them over staged instead.
  if (processes && local_size <= count) {
#if SWITCHYARD_HAS_NCCL
    d.group = make_nccl_communicator(*world, gpu);
    over = "nccl";
#endif
  }
  if (!d.group) {
    d.group = make_staged_communicator(world, cuda::device_memory(gpu));
    over = "staged over " + std::string(world->backend_name());
  }
  d.group->set_default_timeout(world->default_timeout());
  d.description = cuda::describe_device(gpu) + " (cuda:" + std::to_string(gpu) + "), expert group over " + over;
  *out = std::move(d);
}

}  // namespace switchyard
