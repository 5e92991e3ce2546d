#include "comm/algorithms/reduce_scatter_ring.h"

#include <cstring>
#include <utility>
#include <vector>

#include "comm/algorithms/ring_chunks.h"

namespace switchyard::algorithms {

void reduce_scatter_ring(Transport& t, const void* in, void* out, size_t block_count, DType dtype, ReduceOp op,
                         Deadline deadline) {
  const size_t esize = dtype_size(dtype), block_bytes = block_count * esize;
  const int n = t.size(), r = t.rank();
  const char* input = static_cast<const char*>(in);
  auto block = [&](int b) { return input + static_cast<size_t>(b) * block_bytes; };
  if (n == 1 || block_count == 0) {
    if (block_count) std::memmove(out, block(r), block_bytes);
    return;
  }
  const int next = ring_mod(r + 1, n), prev = ring_mod(r - 1, n);
  std::vector<char> a(block_bytes), b(block_bytes);
  char* sending = a.data();
  char* receiving = b.data();
  // Step s sends the partial of block r-s-1 and receives that of block r-s-2;
  // after n-1 steps the block received is r's own, complete but for our share.
  const char* send_from = block(ring_mod(r - 1, n));
  for (int step = 0; step < n - 1; ++step) {
    const bool last = step == n - 2;
    char* into = last ? static_cast<char*>(out) : receiving;
    t.post_send(next, send_from, block_bytes, kCollectiveTag);
    t.post_recv(prev, into, block_bytes, kCollectiveTag);
    t.wait_all(deadline);
    kernels::cpu::reduce_into(into, block(ring_mod(r - step - 2, n)), block_count, dtype, op);
    send_from = into;
    std::swap(sending, receiving);
  }
}

}  // namespace switchyard::algorithms
