// The staged backend: device buffers over any host communicator. Each op
// waits for the issuing thread's current stream, copies its device inputs to
// host memory, runs the op on the host communicator, and copies the results
// back on the current stream. Slower than NCCL by the two copies and the
// synchronisation, but it needs no NCCL and no GPU per rank: CPU-MPI clusters
// with GPUs, and several thread-ranks sharing one GPU (how the GPU check runs
// the device MoE layer on 2 and 4 ranks with one H100). CUDA builds only.
#pragma once

#include <memory>

#include "comm/communicator.h"

namespace switchyard {

// Ops on the result take device memory of `device`; `host` carries them.
std::shared_ptr<Communicator> make_staged_device_communicator(std::shared_ptr<Communicator> host, int device);

}  // namespace switchyard
