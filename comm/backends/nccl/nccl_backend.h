// The nccl backend: collectives over device memory of one GPU per rank (CUDA
// builds with NCCL). Ops are stream-ordered: each is queued on the
// communicator's own CUDA stream behind the issuing thread's current stream
// (cuda::current_stream()), in issue order. Work::wait() makes the current
// stream wait for the op without blocking the host; Work::wait(timeout) blocks
// the host until the op finished and, when the timeout passes or NCCL reports
// an asynchronous error, aborts the NCCL communicator and throws naming the op.
// alltoall(v), allgatherv, send/recv and sendrecv are grouped ncclSend/ncclRecv.
// Sub-communicators: split() is ncclCommSplit; create_group() passes a fresh
// unique id from the first member to the others over this communicator.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "comm/communicator.h"
#include "comm/store/store.h"

namespace switchyard {

// Collective over `bootstrap` (any backend: mpi, threads, ucx): its rank 0
// makes the NCCL unique id and broadcasts it; rank r of bootstrap becomes rank
// r of the result, on CUDA device `device`.
std::shared_ptr<Communicator> make_nccl_communicator(Communicator& bootstrap, int device, std::string name = "nccl");
// The same through a store: rank 0 publishes the id under `key`, the others wait for it.
std::shared_ptr<Communicator> make_nccl_communicator(Store& store, const std::string& key, int rank, int size,
                                                     int device, std::chrono::milliseconds timeout,
                                                     std::string name = "nccl");
// "2.28.9" (the library loaded at run time).
std::string nccl_version();

}  // namespace switchyard
