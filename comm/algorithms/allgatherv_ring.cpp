#include "comm/algorithms/allgatherv_ring.h"

#include <cstring>
#include <vector>

#include "comm/algorithms/ring_chunks.h"

namespace switchyard::algorithms {

void allgatherv_ring(Transport& t, const void* in, void* out, std::span<const int64_t> counts, size_t element_size,
                     Deadline deadline) {
  const int n = t.size(), r = t.rank();
  std::vector<size_t> offset(static_cast<size_t>(n) + 1, 0);
  for (int p = 0; p < n; ++p) offset[p + 1] = offset[p] + static_cast<size_t>(counts[p]) * element_size;
  char* data = static_cast<char*>(out);
  auto bytes = [&](int p) { return offset[p + 1] - offset[p]; };
  if (bytes(r) && data + offset[r] != in) std::memcpy(data + offset[r], in, bytes(r));
  const int next = ring_mod(r + 1, n), prev = ring_mod(r - 1, n);
  for (int step = 0; step < n - 1; ++step) {
    const int send = ring_mod(r - step, n), recv = ring_mod(r - step - 1, n);
    t.post_send(next, data + offset[send], bytes(send), kCollectiveTag);
    t.post_recv(prev, data + offset[recv], bytes(recv), kCollectiveTag);
    t.wait_all(deadline);
  }
}

}  // namespace switchyard::algorithms
