#include "comm/algorithms/broadcast_binomial.h"

#include "comm/algorithms/ring_chunks.h"

namespace switchyard::algorithms {

void broadcast_binomial(Transport& t, void* buffer, size_t bytes, int root, Deadline deadline) {
  const int n = t.size();
  const int relative = ring_mod(t.rank() - root, n);
  int mask = 1;
  while (mask < n) {
    if (relative & mask) {
      t.post_recv(ring_mod(relative - mask + root, n), buffer, bytes, kCollectiveTag);
      t.wait_all(deadline);
      break;
    }
    mask <<= 1;
  }
  for (mask >>= 1; mask > 0; mask >>= 1)
    if (relative + mask < n) t.post_send(ring_mod(relative + mask + root, n), buffer, bytes, kCollectiveTag);
  t.wait_all(deadline);
}

}  // namespace switchyard::algorithms
