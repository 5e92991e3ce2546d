#include "comm/communicator.h"

#include <algorithm>
#include <cstring>
#include <numeric>
#include <set>

#include "comm/algorithms/allgatherv_ring.h"
#include "comm/algorithms/allreduce_ring.h"
#include "comm/algorithms/alltoallv_pairwise.h"
#include "comm/algorithms/barrier_dissemination.h"
#include "comm/algorithms/broadcast_binomial.h"
#include "comm/algorithms/reduce_scatter_ring.h"
#include "comm/virtual_time.h"
#include "core/env.h"
#include "core/logging.h"

namespace switchyard {

uint64_t CommStats::total_sent() const { return std::accumulate(sent_to.begin(), sent_to.end(), uint64_t{0}); }
uint64_t CommStats::total_received() const {
  return std::accumulate(received_from.begin(), received_from.end(), uint64_t{0});
}

// Counts bytes per peer for the generic algorithms; forwards everything else.
class Communicator::CountingTransport : public Transport {
 public:
  explicit CountingTransport(Communicator& owner) : owner_(owner) {}
  int rank() const override { return owner_.rank(); }
  int size() const override { return owner_.size(); }
  void post_send(int peer, const void* data, size_t bytes, uint32_t tag) override {
    owner_.transport().post_send(peer, data, bytes, tag);
    owner_.count_peer_bytes(peer, bytes, 0);
  }
  void post_recv(int peer, void* data, size_t bytes, uint32_t tag) override {
    owner_.transport().post_recv(peer, data, bytes, tag);
    owner_.count_peer_bytes(peer, 0, bytes);
  }
  void wait_all(Deadline deadline) override { owner_.transport().wait_all(deadline); }

 private:
  Communicator& owner_;
};

namespace {

// Buffers live where the backend moves memory: the host, or its one device (nccl).
void check_memory(std::string_view op, std::string_view what, const TensorView& t, Device expected) {
  if (t.device() != expected) {
    if (expected.is_cpu())
      SY_THROW(NotSupported, op, ": ", what, " is on ", to_string(t.device()), "; this backend moves host memory only");
    SY_THROW(NotSupported, op, ": ", what, " is on ", to_string(t.device()), "; this backend moves memory of ",
             to_string(expected), " only");
  }
  if (!t.is_contiguous())
    SY_THROW(InvalidArgument, op, ": ", what, " must be contiguous, got shape ", shape_string(t.shape()),
             " strides ", shape_string(t.strides()));
}

void check_same_dtype(std::string_view op, const TensorView& in, const TensorView& out) {
  if (in.dtype() != out.dtype())
    SY_THROW(InvalidArgument, op, ": out dtype ", dtype_name(out.dtype()), " differs from in dtype ",
             dtype_name(in.dtype()));
}

// Both buffers host-resident and contiguous, of one dtype, and not overlapping
// (allreduce also accepts in == out exactly: in place).
void check_in_out(std::string_view op, const TensorView& in, const TensorView& out, Device device,
                  bool in_place_ok = false) {
  check_memory(op, "in", in, device);
  check_memory(op, "out", out, device);
  check_same_dtype(op, in, out);
  const auto* a = static_cast<const char*>(in.data());
  const auto* b = static_cast<const char*>(out.data());
  const bool overlap = in.nbytes() && out.nbytes() && a < b + out.nbytes() && b < a + in.nbytes();
  if (overlap && !(in_place_ok && a == b && in.nbytes() == out.nbytes()))
    SY_THROW(InvalidArgument, op, ": in and out overlap; ", op,
             in_place_ok ? " runs in place only with in == out" : " needs separate buffers");
}

void check_reducible(std::string_view op, DType t) {
  if (!is_reducible(t))
    SY_THROW(InvalidArgument, op, ": dtype ", dtype_name(t),
             " cannot be reduced; expected one of f32, f64, bf16, f16, i32, i64");
}

void check_numel(std::string_view op, std::string_view what, int64_t got, int64_t expected, std::string_view why) {
  if (got != expected)
    SY_THROW(InvalidArgument, op, ": ", what, " has ", got, " elements, expected ", expected, " (", why, ")");
}

void check_counts(std::string_view op, std::string_view what, const std::vector<int64_t>& counts, int size) {
  if (static_cast<int>(counts.size()) != size)
    SY_THROW(InvalidArgument, op, ": ", what, " has ", counts.size(), " entries, expected one per rank (", size, ")");
  for (size_t p = 0; p < counts.size(); ++p)
    if (counts[p] < 0) SY_THROW(InvalidArgument, op, ": ", what, "[", p, "] = ", counts[p], ", expected >= 0");
}

void check_peer(std::string_view op, std::string_view what, int peer, int size) {
  if (peer < 0 || peer >= size)
    SY_THROW(InvalidArgument, op, ": ", what, " ", peer, " out of range, expected 0..", size - 1);
}

void check_tag(std::string_view op, uint32_t tag) {
  if (tag >= kMaxUserTag) SY_THROW(InvalidArgument, op, ": tag ", tag, " out of range, expected < ", kMaxUserTag);
}

int64_t sum(const std::vector<int64_t>& v) { return std::accumulate(v.begin(), v.end(), int64_t{0}); }

}  // namespace

Communicator::Communicator(int rank, int size, std::string name)
    : rank_(rank),
      size_(size),
      name_(std::move(name)),
      default_timeout_(Milliseconds(env().comm_timeout_ms)),
      counting_(std::make_unique<CountingTransport>(*this)) {
  SY_CHECK(size >= 1 && rank >= 0 && rank < size, "communicator rank ", rank, " of size ", size);
  stats_.sent_to.assign(static_cast<size_t>(size), 0);
  stats_.received_from.assign(static_cast<size_t>(size), 0);
  executor_ = std::make_unique<Executor>("sy-" + std::to_string(rank));
}

Communicator::~Communicator() { shutdown_executor(); }

void Communicator::shutdown_executor() { executor_.reset(); }

Transport& Communicator::counted_transport() { return *counting_; }

void Communicator::count_peer_bytes(int peer, uint64_t sent, uint64_t received) {
  std::lock_guard lock(stats_mutex_);
  stats_.sent_to[static_cast<size_t>(peer)] += sent;
  stats_.received_from[static_cast<size_t>(peer)] += received;
}

void Communicator::count_direct_allreduce(const TensorView& in) {
  const uint64_t share = 2 * in.nbytes() / static_cast<uint64_t>(size_);
  for (int p = 0; p < size_; ++p)
    if (p != rank_) count_peer_bytes(p, share, share);
}

void Communicator::count_direct_reduce_scatter(const TensorView& out) {
  for (int p = 0; p < size_; ++p)
    if (p != rank_) count_peer_bytes(p, out.nbytes(), out.nbytes());
}

void Communicator::count_direct_allgatherv(const TensorView& in, std::span<const int64_t> counts) {
  for (int p = 0; p < size_; ++p)
    if (p != rank_) count_peer_bytes(p, in.nbytes(), static_cast<uint64_t>(counts[p]) * in.element_size());
}

void Communicator::count_direct_alltoallv(size_t element_size, std::span<const int64_t> send_counts,
                                          std::span<const int64_t> recv_counts) {
  for (int p = 0; p < size_; ++p)
    if (p != rank_)
      count_peer_bytes(p, static_cast<uint64_t>(send_counts[p]) * element_size,
                       static_cast<uint64_t>(recv_counts[p]) * element_size);
}

void Communicator::count_direct_broadcast(const TensorView& buffer, int root) {
  for (int p = 0; p < size_; ++p) {
    if (rank_ == root && p != root) count_peer_bytes(p, buffer.nbytes(), 0);
    if (rank_ != root && p == root) count_peer_bytes(p, 0, buffer.nbytes());
  }
}

CommStats Communicator::stats() const {
  std::lock_guard lock(stats_mutex_);
  return stats_;
}

void Communicator::reset_stats() {
  std::lock_guard lock(stats_mutex_);
  stats_.ops.clear();
  std::fill(stats_.sent_to.begin(), stats_.sent_to.end(), 0);
  std::fill(stats_.received_from.begin(), stats_.received_from.end(), 0);
}

void Communicator::check_usable() const {
  if (broken_.load()) {
    std::lock_guard lock(stats_mutex_);
    SY_THROW(IoError, "communicator '", name_, "' (", backend_name(), ") is unusable after an earlier failure: ",
             broken_reason_);
  }
}

Work Communicator::enqueue(std::string_view op, const OpOptions& opts, uint64_t payload_bytes,
                           std::initializer_list<const Buffer*> buffers,
                           std::function<void(const OpContext&)> body) {
  check_usable();
  SY_CHECK(executor_ != nullptr, "communicator '", name_, "' was shut down");
  if (stream_ordered()) return enqueue_on_stream(op, opts, payload_bytes, buffers, body);
  auto state = std::make_shared<WorkState>(WorkLabel{op, name_, rank_, size_, backend_name()});
  for (const Buffer* b : buffers)
    if (b->owner) state->keep_alive(b->owner);
  // Capped so that start + timeout cannot overflow (Milliseconds::max() means "no limit").
  const Milliseconds timeout = std::min(opts.timeout.value_or(default_timeout_),
                                        Milliseconds(std::chrono::hours(24 * 365 * 100)));
  const Algorithm algorithm = opts.algorithm;
  const double issue_time = virtual_time::now();
  executor_->post([this, state, op = std::string(op), timeout, algorithm, payload_bytes, issue_time,
                   body = std::move(body)] {
    if (broken_.load()) {
      std::string reason;
      {
        std::lock_guard lock(stats_mutex_);
        reason = broken_reason_;
      }
      state->complete(std::make_exception_ptr(IoError(detail::make_string(
          state->description(), ": not run, the communicator failed earlier: ", reason))));
      return;
    }
    const auto start = Clock::now();
    double virtual_end = -1.0, virtual_start = -1.0;
    try {
      body(OpContext{op, start + timeout, algorithm, issue_time, &virtual_end, &virtual_start});
    } catch (...) {
      // Any failure leaves the peers out of step: later ops on this communicator are refused.
      auto error = with_context(std::current_exception(), state->description() + ": ");
      std::string reason = "unknown error";
      try {
        std::rethrow_exception(error);
      } catch (const std::exception& e) {
        reason = e.what();
      }
      SY_LOG_DEBUG("comm", reason);
      {
        std::lock_guard lock(stats_mutex_);
        broken_reason_ = std::move(reason);
      }
      broken_.store(true);
      state->complete(error);
      return;
    }
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    {
      std::lock_guard lock(stats_mutex_);
      OpStats& s = stats_.ops[op];
      s.calls += 1;
      s.bytes += payload_bytes;
      s.seconds += seconds;
      if (virtual_end >= 0 && virtual_start >= 0) s.virtual_seconds += virtual_end - virtual_start;
    }
    if (virtual_end >= 0) state->set_virtual_end(virtual_end);
    state->complete();
  });
  return Work(std::move(state));
}

Work Communicator::enqueue_on_stream(std::string_view op, const OpOptions& opts, uint64_t payload_bytes,
                                     std::initializer_list<const Buffer*> buffers,
                                     const std::function<void(const OpContext&)>& body) {
  // The body only queues device work, in issue order (one issuing thread per
  // communicator), so it runs here; the Work tracks the queued work.
  const Milliseconds timeout = std::min(opts.timeout.value_or(default_timeout_),
                                        Milliseconds(std::chrono::hours(24 * 365 * 100)));
  const auto start = Clock::now();
  WorkLabel label{op, name_, rank_, size_, backend_name()};
  try {
    body(OpContext{op, start + timeout, opts.algorithm, virtual_time::now(), nullptr, nullptr});
  } catch (const std::exception& e) {
    {
      std::lock_guard lock(stats_mutex_);
      broken_reason_ = label.describe() + ": " + e.what();
    }
    broken_.store(true);
    throw;
  }
  std::vector<std::shared_ptr<void>> owners;
  for (const Buffer* b : buffers)
    if (b->owner) owners.push_back(b->owner);
  std::shared_ptr<WorkState> state = stream_work(std::move(label), std::move(owners));
  SY_CHECK(state != nullptr, "backend ", backend_name(), " is stream-ordered but made no Work");
  std::lock_guard lock(stats_mutex_);
  OpStats& s = stats_.ops[std::string(op)];
  s.calls += 1;
  s.bytes += payload_bytes;
  s.seconds += std::chrono::duration<double>(Clock::now() - start).count();  // issue time on the host
  return Work(std::move(state));
}

// ---- public ops: validate on the caller's thread, then enqueue ----

Work Communicator::allreduce(Buffer in, Buffer out, const ReduceOptions& opts) {
  constexpr std::string_view op = "allreduce";
  check_in_out(op, in.view, out.view, memory_device(), /*in_place_ok=*/true);
  check_reducible(op, in.view.dtype());
  check_numel(op, "out", out.view.numel(), in.view.numel(), "same as in");
  const ReduceOp rop = opts.op;
  return enqueue(op, opts, in.view.nbytes(), {&in, &out},
                 [this, i = in.view, o = out.view, rop](const OpContext& ctx) { do_allreduce(i, o, rop, ctx); });
}

Work Communicator::reduce_scatter(Buffer in, Buffer out, const ReduceOptions& opts) {
  constexpr std::string_view op = "reduce_scatter";
  check_in_out(op, in.view, out.view, memory_device());
  check_reducible(op, in.view.dtype());
  check_numel(op, "in", in.view.numel(), out.view.numel() * size_, "size() blocks of out's elements");
  const ReduceOp rop = opts.op;
  return enqueue(op, opts, in.view.nbytes(), {&in, &out},
                 [this, i = in.view, o = out.view, rop](const OpContext& ctx) { do_reduce_scatter(i, o, rop, ctx); });
}

Work Communicator::allgather(Buffer in, Buffer out, const OpOptions& opts) {
  constexpr std::string_view op = "allgather";
  check_in_out(op, in.view, out.view, memory_device());
  check_numel(op, "out", out.view.numel(), in.view.numel() * size_, "size() blocks of in's elements");
  return enqueue(op, opts, in.view.nbytes(), {&in, &out},
                 [this, i = in.view, o = out.view](const OpContext& ctx) { do_allgather(i, o, ctx); });
}

Work Communicator::allgatherv(Buffer in, Buffer out, std::vector<int64_t> counts, const OpOptions& opts) {
  constexpr std::string_view op = "allgatherv";
  check_in_out(op, in.view, out.view, memory_device());
  check_counts(op, "counts", counts, size_);
  check_numel(op, "in", in.view.numel(), counts[static_cast<size_t>(rank_)], "counts[rank]");
  check_numel(op, "out", out.view.numel(), sum(counts), "sum of counts");
  return enqueue(op, opts, in.view.nbytes(), {&in, &out},
                 [this, i = in.view, o = out.view, counts = std::move(counts)](const OpContext& ctx) {
                   do_allgatherv(i, o, counts, ctx);
                 });
}

Work Communicator::alltoall(Buffer in, Buffer out, const OpOptions& opts) {
  constexpr std::string_view op = "alltoall";
  check_in_out(op, in.view, out.view, memory_device());
  check_numel(op, "out", out.view.numel(), in.view.numel(), "same as in");
  if (in.view.numel() % size_ != 0)
    SY_THROW(InvalidArgument, op, ": in has ", in.view.numel(), " elements, expected a multiple of the size ", size_);
  return enqueue(op, opts, in.view.nbytes(), {&in, &out},
                 [this, i = in.view, o = out.view](const OpContext& ctx) { do_alltoall(i, o, ctx); });
}

Work Communicator::alltoallv(Buffer in, std::vector<int64_t> send_counts, Buffer out,
                             std::vector<int64_t> recv_counts, const OpOptions& opts) {
  constexpr std::string_view op = "alltoallv";
  check_in_out(op, in.view, out.view, memory_device());
  check_counts(op, "send_counts", send_counts, size_);
  check_counts(op, "recv_counts", recv_counts, size_);
  check_numel(op, "in", in.view.numel(), sum(send_counts), "sum of send_counts");
  check_numel(op, "out", out.view.numel(), sum(recv_counts), "sum of recv_counts");
  return enqueue(op, opts, in.view.nbytes(), {&in, &out},
                 [this, i = in.view, o = out.view, sc = std::move(send_counts),
                  rc = std::move(recv_counts)](const OpContext& ctx) { do_alltoallv(i, sc, o, rc, ctx); });
}

Work Communicator::broadcast(Buffer buffer, int root, const OpOptions& opts) {
  constexpr std::string_view op = "broadcast";
  check_memory(op, "buffer", buffer.view, memory_device());
  check_peer(op, "root", root, size_);
  return enqueue(op, opts, rank_ == root ? buffer.view.nbytes() : 0, {&buffer},
                 [this, b = buffer.view, root](const OpContext& ctx) { do_broadcast(b, root, ctx); });
}

Work Communicator::send(Buffer buffer, int peer, const OpOptions& opts) {
  constexpr std::string_view op = "send";
  check_memory(op, "buffer", buffer.view, memory_device());
  check_peer(op, "peer", peer, size_);
  if (peer == rank_) SY_THROW(InvalidArgument, op, ": peer ", peer, " is this rank; copy locally instead");
  check_tag(op, opts.tag);
  const uint32_t tag = opts.tag;
  return enqueue(op, opts, buffer.view.nbytes(), {&buffer},
                 [this, b = buffer.view, peer, tag](const OpContext& ctx) { do_send(b, peer, tag, ctx); });
}

Work Communicator::recv(Buffer buffer, int peer, const OpOptions& opts) {
  constexpr std::string_view op = "recv";
  check_memory(op, "buffer", buffer.view, memory_device());
  check_peer(op, "peer", peer, size_);
  if (peer == rank_) SY_THROW(InvalidArgument, op, ": peer ", peer, " is this rank; copy locally instead");
  check_tag(op, opts.tag);
  const uint32_t tag = opts.tag;
  return enqueue(op, opts, 0, {&buffer},
                 [this, b = buffer.view, peer, tag](const OpContext& ctx) { do_recv(b, peer, tag, ctx); });
}

Work Communicator::sendrecv(Buffer send_buffer, int to, Buffer recv_buffer, int from, const OpOptions& opts) {
  constexpr std::string_view op = "sendrecv";
  check_memory(op, "send_buffer", send_buffer.view, memory_device());
  check_memory(op, "recv_buffer", recv_buffer.view, memory_device());
  check_peer(op, "to", to, size_);
  check_peer(op, "from", from, size_);
  check_tag(op, opts.tag);
  const uint32_t tag = opts.tag;
  return enqueue(op, opts, send_buffer.view.nbytes(), {&send_buffer, &recv_buffer},
                 [this, s = send_buffer.view, to, r = recv_buffer.view, from, tag](const OpContext& ctx) {
                   do_sendrecv(s, to, r, from, tag, ctx);
                 });
}

Work Communicator::barrier(const OpOptions& opts) {
  return enqueue("barrier", opts, 0, {}, [this](const OpContext& ctx) { do_barrier(ctx); });
}

std::shared_ptr<Communicator> Communicator::split(int color, int key, const OpOptions& opts) {
  Tensor mine = Tensor::empty({2}, DType::i64);
  mine.data_as<int64_t>()[0] = color;
  mine.data_as<int64_t>()[1] = key;
  Tensor all = Tensor::empty({2 * static_cast<int64_t>(size_)}, DType::i64);
  allgather(mine, all, opts).wait();
  if (color < 0) return nullptr;
  const int64_t* entries = all.data_as<int64_t>();
  std::vector<std::pair<int64_t, int>> order;  // (key, rank) of ranks with my color
  for (int r = 0; r < size_; ++r)
    if (entries[2 * r] == color) order.emplace_back(entries[2 * r + 1], r);
  std::sort(order.begin(), order.end());
  std::vector<int> members;
  for (auto& [k, r] : order) members.push_back(r);
  return create_group(std::move(members), "split" + std::to_string(color));
}

std::shared_ptr<Communicator> Communicator::create_group(std::vector<int> members, std::string name) {
  std::set<int> seen;
  for (int m : members) {
    check_peer("create_group", "member", m, size_);
    if (!seen.insert(m).second) SY_THROW(InvalidArgument, "create_group: member ", m, " listed twice");
  }
  if (!seen.count(rank_))
    SY_THROW(InvalidArgument, "create_group: rank ", rank_, " calls it but is not among the ", members.size(),
             " members");
  const uint64_t made_before = groups_made_[members]++;
  uint64_t key = 0xcbf29ce484222325ull;  // FNV-1a over the member list and the count
  for (uint64_t v : members) key = (key ^ (v + 1)) * 0x100000001b3ull;
  key = (key ^ made_before) * 0x100000001b3ull;
  if (name.empty()) name = "group" + std::to_string(key % 100000);
  std::shared_ptr<Communicator> result;
  const std::string full_name = name_ + "/" + name;
  enqueue("create_group", OpOptions{}, 0, {},
          [this, &result, &members, key, &full_name](const OpContext& ctx) {
            result = do_create_group(members, key, full_name, ctx);
          })
      .wait();
  return result;
}

// ---- default bodies: generic algorithms over the transport ----

void Communicator::do_allreduce(const TensorView& in, const TensorView& out, ReduceOp op, const OpContext& ctx) {
  algorithms::allreduce_ring(counted_transport(), in.data(), out.data(), static_cast<size_t>(in.numel()),
                             in.dtype(), op, ctx.deadline);
}

void Communicator::do_reduce_scatter(const TensorView& in, const TensorView& out, ReduceOp op, const OpContext& ctx) {
  algorithms::reduce_scatter_ring(counted_transport(), in.data(), out.data(), static_cast<size_t>(out.numel()),
                                  in.dtype(), op, ctx.deadline);
}

void Communicator::do_allgatherv(const TensorView& in, const TensorView& out, std::span<const int64_t> counts,
                                 const OpContext& ctx) {
  algorithms::allgatherv_ring(counted_transport(), in.data(), out.data(), counts, in.element_size(), ctx.deadline);
}

void Communicator::do_allgather(const TensorView& in, const TensorView& out, const OpContext& ctx) {
  std::vector<int64_t> counts(static_cast<size_t>(size_), in.numel());
  do_allgatherv(in, out, counts, ctx);
}

void Communicator::do_alltoallv(const TensorView& in, std::span<const int64_t> send_counts, const TensorView& out,
                                std::span<const int64_t> recv_counts, const OpContext& ctx) {
  algorithms::alltoallv_pairwise(counted_transport(), in.data(), send_counts, out.data(), recv_counts,
                                 in.element_size(), ctx.deadline);
}

void Communicator::do_alltoall(const TensorView& in, const TensorView& out, const OpContext& ctx) {
  std::vector<int64_t> counts(static_cast<size_t>(size_), in.numel() / size_);
  do_alltoallv(in, counts, out, counts, ctx);
}

void Communicator::do_broadcast(const TensorView& buffer, int root, const OpContext& ctx) {
  algorithms::broadcast_binomial(counted_transport(), buffer.data(), buffer.nbytes(), root, ctx.deadline);
}

void Communicator::do_send(const TensorView& buffer, int peer, uint32_t tag, const OpContext& ctx) {
  counted_transport().post_send(peer, buffer.data(), buffer.nbytes(), tag);
  counted_transport().wait_all(ctx.deadline);
}

void Communicator::do_recv(const TensorView& buffer, int peer, uint32_t tag, const OpContext& ctx) {
  counted_transport().post_recv(peer, buffer.data(), buffer.nbytes(), tag);
  counted_transport().wait_all(ctx.deadline);
}

void Communicator::do_sendrecv(const TensorView& send_buffer, int to, const TensorView& recv_buffer, int from,
                               uint32_t tag, const OpContext& ctx) {
  counted_transport().post_send(to, send_buffer.data(), send_buffer.nbytes(), tag);
  counted_transport().post_recv(from, recv_buffer.data(), recv_buffer.nbytes(), tag);
  counted_transport().wait_all(ctx.deadline);
}

void Communicator::do_barrier(const OpContext& ctx) { algorithms::barrier_dissemination(counted_transport(), ctx.deadline); }

double allreduce_scalar(Communicator& comm, double value, ReduceOp op) {
  Tensor t = Tensor::empty({1}, DType::f64);
  t.data_as<double>()[0] = value;
  ReduceOptions options;
  options.op = op;
  comm.allreduce(t, t, options).wait();
  return t.data_as<double>()[0];
}

bool same_on_every_rank(Communicator& comm, uint64_t value) {
  if (comm.size() == 1) return true;
  Tensor t = Tensor::empty({4}, DType::f64);  // 32-bit halves are exact in a double
  double* p = t.data_as<double>();
  p[0] = static_cast<double>(value >> 32), p[1] = static_cast<double>(value & 0xffffffffu);
  p[2] = -p[0], p[3] = -p[1];
  ReduceOptions options;
  options.op = ReduceOp::max;
  comm.allreduce(t, t, options).wait();
  return p[0] == -p[2] && p[1] == -p[3];
}

}  // namespace switchyard
