#include "comm/backends/emulated/emulated_backend.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.h"

namespace switchyard {
namespace {

// The class of the slowest link a group spans.
LinkClass group_class(const LinkModel& m, const std::vector<int>& members) {
  for (int w : members)
    if (!m.same_node(w, members.front())) return m.inter;
  return m.intra;
}

double log2_steps(size_t p) { return p <= 1 ? 0.0 : std::ceil(std::log2(static_cast<double>(p))); }

class NoTransport : public Transport {
 public:
  NoTransport(int rank, int size) : rank_(rank), size_(size) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void post_send(int, const void*, size_t, uint32_t) override { fail(); }
  void post_recv(int, void*, size_t, uint32_t) override { fail(); }
  void wait_all(Deadline) override {}

 private:
  [[noreturn]] static void fail() {
    SY_THROW(NotSupported, "backend emulated has no transport of its own; every op runs on the inner communicator");
  }
  int rank_, size_;
};

class EmulatedCommunicator : public Communicator {
 public:
  EmulatedCommunicator(std::shared_ptr<Communicator> inner, LinkModel model, std::vector<int> world_ranks,
                       std::string name, bool timing_only)
      : Communicator(inner->rank(), inner->size(), std::move(name)),
        inner_(std::move(inner)),
        model_(model),
        timing_only_(timing_only),
        world_ranks_(std::move(world_ranks)),
        backend_("emulated(" + std::string(inner_->backend_name()) + ")"),
        transport_(inner_->rank(), inner_->size()) {}
  ~EmulatedCommunicator() override { shutdown_executor(); }
  std::string_view backend_name() const override { return backend_; }
  void set_concurrent_siblings(bool on) override { concurrent_siblings_ = on; }

 protected:
  Transport& transport() override { return transport_; }

  std::shared_ptr<Communicator> do_create_group(const std::vector<int>& members, uint64_t, const std::string& name,
                                                const OpContext&) override {
    auto inner_group = inner_->create_group(members, name);
    std::vector<int> world;
    for (int m : members) world.push_back(world_ranks_[static_cast<size_t>(m)]);
    return std::make_shared<EmulatedCommunicator>(inner_group, model_, std::move(world), name, timing_only_);
  }

  void do_allreduce(const TensorView& in, const TensorView& out, ReduceOp op, const OpContext& ctx) override {
    inner_->allreduce(in, out, opts(ctx, op)).wait();  // always: gate gradients, capacities, clocks
    count_direct_allreduce(in);
    finish(ctx, EmulatedCosts::allreduce(model_, world_ranks_, static_cast<int64_t>(in.nbytes())));
  }
  void do_reduce_scatter(const TensorView& in, const TensorView& out, ReduceOp op, const OpContext& ctx) override {
    if (moves(in)) inner_->reduce_scatter(in, out, opts(ctx, op)).wait();
    count_direct_reduce_scatter(out);
    finish(ctx, EmulatedCosts::reduce_scatter(model_, world_ranks_, static_cast<int64_t>(in.nbytes())));
  }
  void do_allgatherv(const TensorView& in, const TensorView& out, std::span<const int64_t> counts,
                     const OpContext& ctx) override {
    if (moves(out))
      inner_->allgatherv(in, out, std::vector<int64_t>(counts.begin(), counts.end()), opts(ctx)).wait();
    count_direct_allgatherv(in, counts);
    const int64_t total = std::accumulate(counts.begin(), counts.end(), int64_t{0});
    finish(ctx, EmulatedCosts::allgather(model_, world_ranks_, total * static_cast<int64_t>(in.element_size())));
  }
  void do_alltoallv(const TensorView& in, std::span<const int64_t> send_counts, const TensorView& out,
                    std::span<const int64_t> recv_counts, const OpContext& ctx) override {
    if (!timing_only_ || !is_bulk(in.dtype()))  // bulk sizes differ by rank: timing-only never moves them
      inner_->alltoallv(in, std::vector<int64_t>(send_counts.begin(), send_counts.end()), out,
                        std::vector<int64_t>(recv_counts.begin(), recv_counts.end()), opts(ctx))
          .wait();
    count_direct_alltoallv(in.element_size(), send_counts, recv_counts);
    const auto es = static_cast<int64_t>(in.element_size());
    std::vector<int64_t> sb(send_counts.begin(), send_counts.end()), rb(recv_counts.begin(), recv_counts.end());
    for (auto& v : sb) v *= es;
    for (auto& v : rb) v *= es;
    finish_alltoall(ctx, sb, rb);
  }
  void do_alltoall(const TensorView& in, const TensorView& out, const OpContext& ctx) override {
    if (moves(in)) inner_->alltoall(in, out, opts(ctx)).wait();
    const int64_t block = static_cast<int64_t>(in.nbytes()) / size();
    std::vector<int64_t> counts(static_cast<size_t>(size()), block / static_cast<int64_t>(in.element_size()));
    count_direct_alltoallv(in.element_size(), counts, counts);
    std::vector<int64_t> bytes(static_cast<size_t>(size()), block);
    finish_alltoall(ctx, bytes, bytes);
  }
  void do_broadcast(const TensorView& buffer, int root, const OpContext& ctx) override {
    if (moves(buffer)) inner_->broadcast(buffer, root, opts(ctx)).wait();
    count_direct_broadcast(buffer, root);
    finish(ctx, EmulatedCosts::broadcast(model_, world_ranks_, static_cast<int64_t>(buffer.nbytes())));
  }
  void do_barrier(const OpContext& ctx) override {
    inner_->barrier(opts(ctx)).wait();
    finish(ctx, EmulatedCosts::barrier(model_, world_ranks_));
  }
  // Point-to-point: each side charges its own clock (no agreement round).
  void do_send(const TensorView& b, int peer, uint32_t tag, const OpContext& ctx) override {
    if (moves(b)) inner_->send(b, peer, tagged(ctx, tag)).wait();
    count_peer_bytes(peer, b.nbytes(), 0);
    finish_local(ctx, pair_cost(peer, b.nbytes()));
  }
  void do_recv(const TensorView& b, int peer, uint32_t tag, const OpContext& ctx) override {
    if (moves(b)) inner_->recv(b, peer, tagged(ctx, tag)).wait();
    count_peer_bytes(peer, 0, b.nbytes());
    finish_local(ctx, pair_cost(peer, b.nbytes()));
  }
  void do_sendrecv(const TensorView& s, int to, const TensorView& r, int from, uint32_t tag,
                   const OpContext& ctx) override {
    if (moves(s) || moves(r)) inner_->sendrecv(s, to, r, from, tagged(ctx, tag)).wait();
    count_peer_bytes(to, s.nbytes(), 0);
    count_peer_bytes(from, 0, r.nbytes());
    finish_local(ctx, std::max(pair_cost(to, s.nbytes()), pair_cost(from, r.nbytes())));
  }

 private:
  // Payloads move unless timing-only and bulky: floating-point tensors
  // (activations, weights) over the size limit. Integers (counts) and f64
  // (clocks, timings) always move, and so does every allreduce, so control
  // flow stays the same as in a real run. Both sides of an op see the same
  // size in every collective the MoE layer issues; p2p sizes must match too.
  static bool is_bulk(DType t) { return t == DType::f32 || t == DType::bf16 || t == DType::f16 || t == DType::fp8_e4m3; }
  bool moves(const TensorView& t) const {
    return !timing_only_ || !is_bulk(t.dtype()) || t.nbytes() <= kEmulatedControlBytes;
  }
  void do_allgather(const TensorView& in, const TensorView& out, const OpContext& ctx) override {
    std::vector<int64_t> counts(static_cast<size_t>(size()), in.numel());
    do_allgatherv(in, out, counts, ctx);
  }
  static OpOptions opts(const OpContext& ctx) {
    OpOptions o;
    o.timeout = std::chrono::duration_cast<Milliseconds>(ctx.deadline - Clock::now());
    o.algorithm = ctx.algorithm;
    return o;
  }
  static ReduceOptions opts(const OpContext& ctx, ReduceOp op) {
    ReduceOptions o;
    static_cast<OpOptions&>(o) = opts(ctx);
    o.op = op;
    return o;
  }
  static OpOptions tagged(const OpContext& ctx, uint32_t tag) {
    OpOptions o = opts(ctx);
    o.tag = tag;
    return o;
  }
  double pair_cost(int peer, size_t bytes) const {
    return EmulatedCosts::point_to_point(model_, world_ranks_[static_cast<size_t>(rank())],
                                         world_ranks_[static_cast<size_t>(peer)], static_cast<int64_t>(bytes));
  }
  // Collective: start when every member can, end after the slowest member's cost.
  void finish(const OpContext& ctx, double cost) {
    const double start = std::max(ctx.issue_time, stream_free_);
    double agreed[2] = {start, cost};
    if (size() > 1) {
      ReduceOptions o = opts(ctx, ReduceOp::max);
      inner_->allreduce(TensorView(agreed, DType::f64, {2}), TensorView(agreed, DType::f64, {2}), o).wait();
    }
    stream_free_ = agreed[0] + agreed[1];
    if (ctx.end_time) *ctx.end_time = stream_free_;
    if (ctx.start_time) *ctx.start_time = agreed[0];
  }
  // An all-to-all: with shared NICs every member's inter-node bytes are
  // agreed (one max-all-reduce with the start), and each member's NIC
  // carries those of the members on it; else as finish().
  void finish_alltoall(const OpContext& ctx, const std::vector<int64_t>& send_bytes,
                       const std::vector<int64_t>& recv_bytes) {
    const EmulatedCosts::AlltoallParts mine =
        EmulatedCosts::alltoallv_parts(model_, world_ranks_, rank(), send_bytes, recv_bytes);
    if (model_.ranks_per_nic <= 1 || size() == 1) {
      finish(ctx, mine.latency + std::max(mine.intra_bytes / model_.intra.bandwidth,
                                          mine.inter_bytes / model_.inter.bandwidth));
      return;
    }
    const int p = size();
    constexpr int kPer = 5;  // latency, intra bytes, inter bytes, inter sent, inter received
    std::vector<double> agreed(static_cast<size_t>(1 + kPer * p), 0.0);
    agreed[0] = std::max(ctx.issue_time, stream_free_);
    const double values[kPer] = {mine.latency, mine.intra_bytes, mine.inter_bytes, mine.inter_sent, mine.inter_received};
    std::copy(values, values + kPer, agreed.begin() + 1 + kPer * rank());
    ReduceOptions o = opts(ctx, ReduceOp::max);
    inner_->allreduce(TensorView(agreed.data(), DType::f64, {static_cast<int64_t>(agreed.size())}),
                      TensorView(agreed.data(), DType::f64, {static_cast<int64_t>(agreed.size())}), o)
        .wait();
    auto at = [&](int member, int field) { return agreed[static_cast<size_t>(1 + kPer * member + field)]; };
    double cost = 0;
    for (int m = 0; m < p; ++m) {
      const int wm = world_ranks_[static_cast<size_t>(m)];
      double sent = 0, received = 0;
      int mates_here = 0;
      for (int q = 0; q < p; ++q)
        if (model_.same_nic(wm, world_ranks_[static_cast<size_t>(q)])) {
          sent += at(q, 3), received += at(q, 4);
          ++mates_here;
        }
      // Concurrent sibling groups: the NIC-mates outside this group move as much as this member.
      const int outside = concurrent_siblings_ ? model_.ranks_per_nic - mates_here : 0;
      sent += outside * at(m, 3), received += outside * at(m, 4);
      // At least what it pays alone (each pair's larger direction); shared, the NIC's busier direction.
      const double nic = std::max(at(m, 2), std::max(sent, received));
      cost = std::max(cost, at(m, 0) + std::max(at(m, 1) / model_.intra.bandwidth, nic / model_.inter.bandwidth));
    }
    stream_free_ = agreed[0] + cost;
    if (ctx.end_time) *ctx.end_time = stream_free_;
    if (ctx.start_time) *ctx.start_time = agreed[0];
  }
  void finish_local(const OpContext& ctx, double cost) {
    const double start = std::max(ctx.issue_time, stream_free_);
    if (ctx.start_time) *ctx.start_time = start;
    stream_free_ = start + cost;
    if (ctx.end_time) *ctx.end_time = stream_free_;
  }

  std::shared_ptr<Communicator> inner_;
  LinkModel model_;
  bool timing_only_;
  std::vector<int> world_ranks_;
  std::string backend_;
  NoTransport transport_;
  double stream_free_ = 0;  // executor thread only
  bool concurrent_siblings_ = false;
};

}  // namespace

EmulatedCosts::AlltoallParts EmulatedCosts::alltoallv_parts(const LinkModel& m, const std::vector<int>& members,
                                                            int me, const std::vector<int64_t>& send_bytes,
                                                            const std::vector<int64_t>& recv_bytes) {
  AlltoallParts parts;
  for (size_t p = 0; p < members.size(); ++p) {
    if (static_cast<int>(p) == me) continue;
    const bool near = m.same_node(members[static_cast<size_t>(me)], members[p]);
    parts.latency += near ? m.intra.latency : m.inter.latency;
    (near ? parts.intra_bytes : parts.inter_bytes) += static_cast<double>(std::max(send_bytes[p], recv_bytes[p]));
    if (!near) {
      parts.inter_sent += static_cast<double>(send_bytes[p]);
      parts.inter_received += static_cast<double>(recv_bytes[p]);
    }
  }
  return parts;
}

double EmulatedCosts::alltoallv(const LinkModel& m, const std::vector<int>& members, int me,
                                const std::vector<int64_t>& send_bytes, const std::vector<int64_t>& recv_bytes) {
  const AlltoallParts p = alltoallv_parts(m, members, me, send_bytes, recv_bytes);
  return p.latency + std::max(p.intra_bytes / m.intra.bandwidth, p.inter_bytes / m.inter.bandwidth);
}

double EmulatedCosts::allreduce(const LinkModel& m, const std::vector<int>& members, int64_t bytes) {
  const double p = static_cast<double>(members.size());
  if (p <= 1) return 0.0;
  const LinkClass c = group_class(m, members);
  return 2 * (p - 1) * (c.latency + static_cast<double>(bytes) / p / c.bandwidth);
}

double EmulatedCosts::reduce_scatter(const LinkModel& m, const std::vector<int>& members, int64_t full_bytes) {
  const double p = static_cast<double>(members.size());
  if (p <= 1) return 0.0;
  const LinkClass c = group_class(m, members);
  return (p - 1) * (c.latency + static_cast<double>(full_bytes) / p / c.bandwidth);
}

double EmulatedCosts::allgather(const LinkModel& m, const std::vector<int>& members, int64_t full_bytes) {
  return reduce_scatter(m, members, full_bytes);
}

double EmulatedCosts::broadcast(const LinkModel& m, const std::vector<int>& members, int64_t bytes) {
  const LinkClass c = group_class(m, members);
  return log2_steps(members.size()) * (c.latency + static_cast<double>(bytes) / c.bandwidth);
}

double EmulatedCosts::barrier(const LinkModel& m, const std::vector<int>& members) {
  return log2_steps(members.size()) * group_class(m, members).latency;
}

double EmulatedCosts::point_to_point(const LinkModel& m, int world_a, int world_b, int64_t bytes) {
  const LinkClass c = m.same_node(world_a, world_b) ? m.intra : m.inter;
  return c.latency + static_cast<double>(bytes) / c.bandwidth;
}

std::shared_ptr<Communicator> make_emulated_communicator(std::shared_ptr<Communicator> inner, LinkModel model,
                                                         bool timing_only) {
  if (model.ranks_per_node < 1)
    SY_THROW(InvalidArgument, "emulated link model: ranks_per_node = ", model.ranks_per_node, ", expected >= 1");
  if (model.ranks_per_nic < 1 || model.ranks_per_node % model.ranks_per_nic != 0)
    SY_THROW(InvalidArgument, "emulated link model: ranks_per_nic = ", model.ranks_per_nic,
             ", expected a divisor of ranks_per_node (", model.ranks_per_node, ")");
  if (model.intra.bandwidth <= 0 || model.inter.bandwidth <= 0)
    SY_THROW(InvalidArgument, "emulated link model: bandwidths must be > 0 (intra ", model.intra.bandwidth,
             ", inter ", model.inter.bandwidth, " bytes/s)");
  std::vector<int> world(static_cast<size_t>(inner->size()));
  std::iota(world.begin(), world.end(), 0);
  const std::string name = inner->name();
  return std::make_shared<EmulatedCommunicator>(std::move(inner), model, std::move(world), name, timing_only);
}

}  // namespace switchyard
