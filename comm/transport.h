// Point-to-point transport among the ranks of one communicator: what a backend
// provides so that comm/algorithms can build every collective over it. Used
// only on the communicator's executor thread.
#pragma once

#include <cstddef>
#include <cstdint>

#include "comm/types.h"

namespace switchyard {

using Deadline = Clock::time_point;

// Tags at or above this value belong to collective algorithms; user send/recv
// tags stay below kMaxUserTag.
inline constexpr uint32_t kCollectiveTag = kMaxUserTag;

class Transport {
 public:
  virtual ~Transport() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Post a send or receive; it completes in wait_all(). Buffers must stay valid
  // until then. Messages between a pair with one tag arrive in posting order.
  virtual void post_send(int peer, const void* data, size_t bytes, uint32_t tag) = 0;
  virtual void post_recv(int peer, void* data, size_t bytes, uint32_t tag) = 0;
  // Completes everything posted. Throws TimeoutError naming the peer still
  // awaited at `deadline`, IoError on a size mismatch or an aborted peer.
  virtual void wait_all(Deadline deadline) = 0;
};

}  // namespace switchyard
