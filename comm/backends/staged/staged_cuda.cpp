#include "comm/backends/staged/staged_backend.h"
#include "kernels/cuda/runtime.h"

namespace switchyard {

std::shared_ptr<Communicator> make_staged_device_communicator(std::shared_ptr<Communicator> host, int device) {
  SY_CHECK(host != nullptr, "make_staged_device_communicator needs a host communicator");
  return make_staged_communicator(std::move(host), cuda::device_memory(device));
}

}  // namespace switchyard
