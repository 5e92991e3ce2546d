#include "comm/backends/fake/fake_backend.h"

#include <algorithm>
#include <cstring>
#include <type_traits>

namespace switchyard {
namespace {

class NullTransport : public Transport {
 public:
  NullTransport(int rank, int size) : rank_(rank), size_(size) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void post_send(int, const void*, size_t, uint32_t) override {}
  void post_recv(int, void*, size_t, uint32_t) override {}
  void wait_all(Deadline) override {}

 private:
  int rank_, size_;
};

// n elements of `to` from element `from_at` of `from`: the first min(n, available) copied, the rest zero.
void copy_elements(const TensorView& from, int64_t from_at, const TensorView& to, int64_t to_at, int64_t n,
                   int64_t available = -1) {
  if (n <= 0) return;
  const size_t e = to.element_size();
  const int64_t have = std::max<int64_t>(0, std::min<int64_t>(available < 0 ? n : std::min(n, available),
                                                              from.numel() - from_at));
  auto* dst = static_cast<uint8_t*>(to.data()) + static_cast<size_t>(to_at) * e;
  const auto* src = static_cast<const uint8_t*>(from.data()) + static_cast<size_t>(from_at) * e;
  if (have > 0 && dst != src) std::memmove(dst, src, static_cast<size_t>(have) * e);
  if (have < n) std::memset(dst + static_cast<size_t>(have) * e, 0, static_cast<size_t>(n - have) * e);
}

template <typename T>
void scale_as(void* data, int64_t n, int factor) {
  auto* p = static_cast<T*>(data);
  if constexpr (std::is_integral_v<T>) {  // wrapping, as the sum over real ranks would (no signed overflow)
    using U = std::make_unsigned_t<T>;
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(static_cast<U>(p[i]) * static_cast<U>(factor));
  } else {
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(p[i] * factor);
  }
}

// A sum over `factor` ranks that all hold these values.
void scale(const TensorView& t, int64_t at, int64_t n, int factor) {
  void* p = static_cast<uint8_t*>(t.data()) + static_cast<size_t>(at) * t.element_size();
  switch (t.dtype()) {
    case DType::f32: scale_as<float>(p, n, factor); break;
    case DType::f64: scale_as<double>(p, n, factor); break;
    case DType::i32: scale_as<int32_t>(p, n, factor); break;
    case DType::i64: scale_as<int64_t>(p, n, factor); break;
    default: break;  // bf16 and the rest keep this rank's values
  }
}

class FakeCommunicator : public Communicator {
 public:
  FakeCommunicator(int rank, int size, std::string name)
      : Communicator(rank, size, std::move(name)), transport_(rank, size) {}
  ~FakeCommunicator() override { shutdown_executor(); }
  std::string_view backend_name() const override { return "fake"; }
  std::shared_ptr<Communicator> split(int, int, const OpOptions&) override {
    SY_THROW(NotSupported, "backend fake does not support split(color, key): one process sees no other rank's "
             "color; use create_group(members)");
  }

 protected:
  Transport& transport() override { return transport_; }
  std::shared_ptr<Communicator> do_create_group(const std::vector<int>& members, uint64_t, const std::string& name,
                                                const OpContext&) override {
    int mine = 0;
    for (size_t i = 0; i < members.size(); ++i)
      if (members[i] == rank()) mine = static_cast<int>(i);
    return std::make_shared<FakeCommunicator>(mine, static_cast<int>(members.size()), name);
  }
  // Nothing travels: record the traffic a direct exchange would have, so stats still describe the op,
  // and fill the outputs as if every other rank were this one (never left uninitialised: a dropless
  // exchange reads the counts it receives).
  void do_allreduce(const TensorView& in, const TensorView& out, ReduceOp op, const OpContext&) override {
    count_direct_allreduce(in);
    copy_elements(in, 0, out, 0, in.numel());
    if (op == ReduceOp::sum) scale(out, 0, out.numel(), size());
  }
  void do_reduce_scatter(const TensorView& in, const TensorView& out, ReduceOp op, const OpContext&) override {
    count_direct_reduce_scatter(out);
    copy_elements(in, static_cast<int64_t>(rank()) * out.numel(), out, 0, out.numel());
    if (op == ReduceOp::sum) scale(out, 0, out.numel(), size());
  }
  void do_allgatherv(const TensorView& in, const TensorView& out, std::span<const int64_t> counts,
                     const OpContext&) override {
    count_direct_allgatherv(in, counts);
    int64_t at = 0;
    for (int p = 0; p < size(); ++p) {
      copy_elements(in, 0, out, at, counts[p]);
      at += counts[p];
    }
  }
  void do_alltoallv(const TensorView& in, std::span<const int64_t> send_counts, const TensorView& out,
                    std::span<const int64_t> recv_counts, const OpContext&) override {
    count_direct_alltoallv(in.element_size(), send_counts, recv_counts);
    // From every peer, what this rank sends itself.
    int64_t mine = 0;
    for (int p = 0; p < rank(); ++p) mine += send_counts[p];
    int64_t at = 0;
    for (int p = 0; p < size(); ++p) {
      copy_elements(in, mine, out, at, recv_counts[p], send_counts[rank()]);
      at += recv_counts[p];
    }
  }
  void do_broadcast(const TensorView& buffer, int root, const OpContext&) override {
    count_direct_broadcast(buffer, root);  // the root's values are this rank's own
  }
  void do_send(const TensorView& b, int peer, uint32_t, const OpContext&) override { count_peer_bytes(peer, b.nbytes(), 0); }
  void do_recv(const TensorView& b, int peer, uint32_t, const OpContext&) override {
    count_peer_bytes(peer, 0, b.nbytes());
    std::memset(b.data(), 0, b.nbytes());
  }
  void do_sendrecv(const TensorView& s, int to, const TensorView& r, int from, uint32_t, const OpContext&) override {
    count_peer_bytes(to, s.nbytes(), 0);
    count_peer_bytes(from, 0, r.nbytes());
    // Byte for byte (the two sides need not share a dtype): what fits, the rest zero.
    const size_t n = std::min(s.nbytes(), r.nbytes());
    if (n) std::memmove(r.data(), s.data(), n);
    if (r.nbytes() > n) std::memset(static_cast<uint8_t*>(r.data()) + n, 0, r.nbytes() - n);
  }
  void do_barrier(const OpContext&) override {}

 private:
  NullTransport transport_;
};

}  // namespace

std::shared_ptr<Communicator> make_fake_communicator(int rank, int size) {
  return std::make_shared<FakeCommunicator>(rank, size, "world");
}

}  // namespace switchyard
