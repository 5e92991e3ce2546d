#include "comm/algorithms/alltoallv_pairwise.h"

#include <cstring>
#include <vector>

#include "comm/algorithms/ring_chunks.h"

namespace switchyard::algorithms {
namespace {
std::vector<size_t> byte_offsets(std::span<const int64_t> counts, size_t element_size) {
  std::vector<size_t> off(counts.size() + 1, 0);
  for (size_t p = 0; p < counts.size(); ++p) off[p + 1] = off[p] + static_cast<size_t>(counts[p]) * element_size;
  return off;
}
}  // namespace

void alltoallv_pairwise(Transport& t, const void* in, std::span<const int64_t> send_counts, void* out,
                        std::span<const int64_t> recv_counts, size_t element_size, Deadline deadline) {
  const int n = t.size(), r = t.rank();
  const auto send_off = byte_offsets(send_counts, element_size);
  const auto recv_off = byte_offsets(recv_counts, element_size);
  const char* src = static_cast<const char*>(in);
  char* dst = static_cast<char*>(out);
  const size_t own = send_off[r + 1] - send_off[r];
  if (own) std::memcpy(dst + recv_off[r], src + send_off[r], own);
  for (int i = 1; i < n; ++i) {
    const int to = ring_mod(r + i, n), from = ring_mod(r - i, n);
    t.post_send(to, src + send_off[to], send_off[to + 1] - send_off[to], kCollectiveTag);
    t.post_recv(from, dst + recv_off[from], recv_off[from + 1] - recv_off[from], kCollectiveTag);
  }
  t.wait_all(deadline);
}

}  // namespace switchyard::algorithms
