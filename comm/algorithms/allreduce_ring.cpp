#include "comm/algorithms/allreduce_ring.h"

#include <cstring>
#include <vector>

#include "comm/algorithms/ring_chunks.h"

namespace switchyard::algorithms {

void allreduce_ring(Transport& t, const void* in, void* out, size_t count, DType dtype, ReduceOp op,
                    Deadline deadline) {
  const size_t esize = dtype_size(dtype);
  char* data = static_cast<char*>(out);
  if (in != out && count) std::memcpy(out, in, count * esize);
  const int n = t.size(), r = t.rank();
  if (n == 1 || count == 0) return;
  const int next = ring_mod(r + 1, n), prev = ring_mod(r - 1, n);
  std::vector<char> incoming(ring_chunk(count, n, 0).count * esize);

  // Reduce-scatter: after n-1 steps rank r holds the full result of chunk r+1.
  for (int step = 0; step < n - 1; ++step) {
    const Chunk send = ring_chunk(count, n, ring_mod(r - step, n));
    const Chunk recv = ring_chunk(count, n, ring_mod(r - step - 1, n));
    t.post_send(next, data + send.offset * esize, send.count * esize, kCollectiveTag);
    t.post_recv(prev, incoming.data(), recv.count * esize, kCollectiveTag);
    t.wait_all(deadline);
    kernels::cpu::reduce_into(data + recv.offset * esize, incoming.data(), recv.count, dtype, op);
  }
  // Allgather of the reduced chunks.
  for (int step = 0; step < n - 1; ++step) {
    const Chunk send = ring_chunk(count, n, ring_mod(r + 1 - step, n));
    const Chunk recv = ring_chunk(count, n, ring_mod(r - step, n));
    t.post_send(next, data + send.offset * esize, send.count * esize, kCollectiveTag);
    t.post_recv(prev, data + recv.offset * esize, recv.count * esize, kCollectiveTag);
    t.wait_all(deadline);
  }
}

}  // namespace switchyard::algorithms
