#include "comm/algorithms/barrier_dissemination.h"

#include "comm/algorithms/ring_chunks.h"

namespace switchyard::algorithms {

void barrier_dissemination(Transport& t, Deadline deadline) {
  const int n = t.size(), r = t.rank();
  char token = 0, sink = 0;
  for (int distance = 1; distance < n; distance <<= 1) {
    t.post_send(ring_mod(r + distance, n), &token, 0, kCollectiveTag);
    t.post_recv(ring_mod(r - distance, n), &sink, 0, kCollectiveTag);
    t.wait_all(deadline);
  }
}

}  // namespace switchyard::algorithms
