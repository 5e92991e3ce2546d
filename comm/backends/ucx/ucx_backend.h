// The UCX backend: UCP tagged send/recv between processes, worker addresses
// exchanged through a Store (the TCP store under `switchyard launch`), every
// collective from comm/algorithms over it, on the communicators' executors
// like the other backends. All UCP calls of the process are serialised by one
// lock (the worker is created UCS_THREAD_MODE_SERIALIZED). A transfer still
// pending at its deadline is cancelled, so a dead peer makes the op fail with
// a TimeoutError naming it instead of hanging.
//
// Endpoints do not ask for UCX's peer error mode: UCX 1.13's shared-memory
// transports do not offer it, and without them every message on one machine
// would take loopback TCP (MPI's alltoall was 3-4x faster). Dead peers are
// found by a heartbeat through the store instead: every rank bumps its
// counter every 250 ms and watches the next live rank's; a counter that
// stops for 2 s (a dead or stopped process) is published under the prefix,
// and every rank's pending and later ops fail naming that rank within about
// 2.5 s. A rank that ends cleanly says so first, so it is never taken for dead.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "comm/communicator.h"
#include "comm/store/store.h"

namespace switchyard {

// Collective over `size` processes: each publishes its worker address under
// `prefix` in the store and connects to every other. Throws TimeoutError
// naming the missing ranks when some never arrive within `timeout`.
// `heartbeat_store` opens a second client of the same store for the
// heartbeat thread (it runs for the world's life); empty: no heartbeat (dead
// peers are then found only at the op timeout).
std::shared_ptr<Communicator> make_ucx_world_communicator(Store& store, int rank, int size,
                                                          const std::string& prefix = "ucx",
                                                          Milliseconds timeout = Milliseconds(60000),
                                                          std::function<std::unique_ptr<Store>()> heartbeat_store = {});

}  // namespace switchyard
