// Staged communicators: buffers of one memory over a communicator of
// another. Each op copies its inputs across (after the device work the
// calling thread queued), runs the inner op, waits for it (the inner
// communicator's timeout) and copies the results back, all on the calling
// thread. Two copies and a synchronisation slower than a native op.
//  - make_staged_communicator: device buffers over a host communicator (MPI,
//    threads, UCX): CPU clusters with GPUs, thread-ranks sharing one GPU
//    (how the GPU check runs the MoE layer on 2 and 4 ranks of one GPU).
//  - make_host_buffer_communicator: host buffers over a device communicator
//    (nccl), for the small host values next to device traffic (counts, the
//    capacity agreement, plan checks) of code that holds only the device one.
#pragma once

#include <memory>

#include "comm/communicator.h"
#include "core/device_memory.h"

namespace switchyard {

std::shared_ptr<Communicator> make_staged_communicator(std::shared_ptr<Communicator> host,
                                                       std::shared_ptr<DeviceMemory> memory);
std::shared_ptr<Communicator> make_host_buffer_communicator(std::shared_ptr<Communicator> device,
                                                            std::shared_ptr<DeviceMemory> memory);
// `host` as a communicator of CUDA device `device`'s memory. CUDA builds only
// (libswitchyard_comm_staged).
std::shared_ptr<Communicator> make_staged_device_communicator(std::shared_ptr<Communicator> host, int device);

}  // namespace switchyard
