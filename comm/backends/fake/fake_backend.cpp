#include "comm/backends/fake/fake_backend.h"

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
  // Nothing moves: record the traffic a direct exchange would have, so stats still describe the op.
  void do_allreduce(const TensorView& in, const TensorView&, ReduceOp, const OpContext&) override {
    count_direct_allreduce(in);
  }
  void do_reduce_scatter(const TensorView&, const TensorView& out, ReduceOp, const OpContext&) override {
    count_direct_reduce_scatter(out);
  }
  void do_allgatherv(const TensorView& in, const TensorView&, std::span<const int64_t> counts,
                     const OpContext&) override {
    count_direct_allgatherv(in, counts);
  }
  void do_alltoallv(const TensorView& in, std::span<const int64_t> send_counts, const TensorView&,
                    std::span<const int64_t> recv_counts, const OpContext&) override {
    count_direct_alltoallv(in.element_size(), send_counts, recv_counts);
  }
  void do_broadcast(const TensorView& buffer, int root, const OpContext&) override {
    count_direct_broadcast(buffer, root);
  }
  void do_send(const TensorView& b, int peer, uint32_t, const OpContext&) override { count_peer_bytes(peer, b.nbytes(), 0); }
  void do_recv(const TensorView& b, int peer, uint32_t, const OpContext&) override { count_peer_bytes(peer, 0, b.nbytes()); }
  void do_sendrecv(const TensorView& s, int to, const TensorView& r, int from, uint32_t, const OpContext&) override {
    count_peer_bytes(to, s.nbytes(), 0);
    count_peer_bytes(from, 0, r.nbytes());
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
