// The UCX backend: UCP tagged send/recv between processes, worker addresses
// exchanged through a Store (the TCP store under `switchyard launch`), every
// collective from comm/algorithms over it, on the communicators' executors
// like the other backends. All UCP calls of the process are serialised by one
// lock (the worker is created UCS_THREAD_MODE_SERIALIZED). A transfer still
// pending at its deadline is cancelled, so a dead peer makes the op fail with
// a TimeoutError naming it instead of hanging.
#pragma once

#include <memory>
#include <string>

#include "comm/communicator.h"
#include "comm/store/store.h"

namespace switchyard {

// Collective over `size` processes: each publishes its worker address under
// `prefix` in the store and connects to every other. Throws TimeoutError
// naming the missing ranks when some never arrive within `timeout`.
std::shared_ptr<Communicator> make_ucx_world_communicator(Store& store, int rank, int size,
                                                          const std::string& prefix = "ucx",
                                                          Milliseconds timeout = Milliseconds(60000));

}  // namespace switchyard
