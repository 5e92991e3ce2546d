#include "comm/algorithms/alltoallv_hierarchical.h"

#include <cstring>
#include <numeric>

#include "comm/virtual_time.h"
#include "core/error.h"

namespace switchyard::algorithms {

HierarchicalAlltoall::HierarchicalAlltoall(Communicator& world, int local_size)
    : rank_(world.rank()), size_(world.size()), local_size_(local_size), name_(world.name() + "/2dh") {
  if (local_size < 1 || world.size() % local_size != 0)
    SY_THROW(InvalidArgument, "2D-hierarchical all-to-all: local size = ", local_size, " does not divide the ",
             world.size(), " ranks of '", world.name(), "'; expected a divisor (ranks per node)");
  nodes_ = size_ / local_size;
  const int node = rank_ / local_size, local = rank_ % local_size;
  std::vector<int> same_node, same_local;
  for (int g = 0; g < local_size; ++g) same_node.push_back(node * local_size + g);
  for (int n = 0; n < nodes_; ++n) same_local.push_back(n * local_size + local);
  intra_ = world.create_group(same_node, world.name() + "/node");
  inter_ = world.create_group(same_local, world.name() + "/cross-node");
  inter_->set_concurrent_siblings(true);  // every local index crosses nodes at once
  executor_ = std::make_unique<Executor>(name_);
}

Work HierarchicalAlltoall::alltoall(Buffer in, Buffer out) {
  const int64_t n = in.view.numel();
  if (n % size_ != 0 || out.view.numel() != n)
    SY_THROW(InvalidArgument, "alltoall (2dh) on '", name_, "': in has ", n, " elements and out ", out.view.numel(),
             "; expected equal sizes divisible by the ", size_, " ranks");
  std::vector<int64_t> counts(static_cast<size_t>(size_), n / size_);
  return run(std::move(in), counts, std::move(out), counts, true);
}

Work HierarchicalAlltoall::alltoallv(Buffer in, std::vector<int64_t> send_counts, Buffer out,
                                     std::vector<int64_t> recv_counts) {
  auto check = [&](const char* what, const std::vector<int64_t>& counts, const TensorView& t) {
    if (static_cast<int>(counts.size()) != size_)
      SY_THROW(InvalidArgument, "alltoallv (2dh) on '", name_, "': ", what, " has ", counts.size(),
               " entries, expected one per rank (", size_, ")");
    const int64_t total = std::accumulate(counts.begin(), counts.end(), int64_t{0});
    if (total > t.numel())
      SY_THROW(InvalidArgument, "alltoallv (2dh) on '", name_, "': ", what, " sum to ", total,
               " elements but the buffer holds ", t.numel());
  };
  check("send_counts", send_counts, in.view);
  check("recv_counts", recv_counts, out.view);
  if (in.view.dtype() != out.view.dtype())
    SY_THROW(InvalidArgument, "alltoallv (2dh) on '", name_, "': out dtype ", dtype_name(out.view.dtype()),
             " differs from in dtype ", dtype_name(in.view.dtype()));
  return run(std::move(in), std::move(send_counts), std::move(out), std::move(recv_counts), false);
}

Work HierarchicalAlltoall::run(Buffer in, std::vector<int64_t> send_counts, Buffer out,
                               std::vector<int64_t> recv_counts, bool uniform) {
  auto state = std::make_shared<WorkState>(
      WorkLabel{"alltoallv_2dh", name_, rank_, size_, intra_->backend_name()});
  if (in.owner) state->keep_alive(in.owner);
  if (out.owner) state->keep_alive(out.owner);
  // Under emulation the phases start at the caller's virtual time and the
  // caller's wait ends at the last phase's end.
  const double issue_time = virtual_time::now();
  executor_->post([this, state, in = in.view, out = out.view, sc = std::move(send_counts),
                   rc = std::move(recv_counts), uniform, issue_time] {
    try {
      virtual_time::advance_to(issue_time);
      exchange(in, sc, out, rc, uniform);
      state->set_virtual_end(virtual_time::now());
      state->complete();
    } catch (...) {
      state->complete(std::current_exception());
    }
  });
  return Work(state);
}

void HierarchicalAlltoall::exchange(const TensorView& in, const std::vector<int64_t>& sc, const TensorView& out,
                                    const std::vector<int64_t>& rc, bool uniform) {
  const int G = local_size_, N = nodes_;
  const size_t es = dtype_size(in.dtype());
  auto offsets = [](const std::vector<int64_t>& counts) {
    std::vector<int64_t> off(counts.size() + 1, 0);
    std::partial_sum(counts.begin(), counts.end(), off.begin() + 1);
    return off;
  };
  // Block sizes that pass through this rank: through[g * N + n] elements came
  // from local rank g of this node and go to node n (same local rank as this one).
  std::vector<int64_t> through(static_cast<size_t>(G * N));
  if (uniform) {
    std::fill(through.begin(), through.end(), sc.empty() ? 0 : sc[0]);
  } else {
    Tensor mine = Tensor::empty({static_cast<int64_t>(G) * N}, DType::i64);
    Tensor theirs = Tensor::empty({static_cast<int64_t>(G) * N}, DType::i64);
    for (int g = 0; g < G; ++g)
      for (int n = 0; n < N; ++n) mine.data_as<int64_t>()[g * N + n] = sc[static_cast<size_t>(n * G + g)];
    intra_->alltoall(mine, theirs).wait();
    std::memcpy(through.data(), theirs.data(), theirs.nbytes());
  }
  // Phase 1 within the node: to local rank g everything bound for (any node, g),
  // so the input's [node][local] blocks are re-laid out as [local][node].
  const auto send_off = offsets(sc);
  std::vector<int64_t> to_local(static_cast<size_t>(G), 0), from_local(static_cast<size_t>(G), 0);
  for (int g = 0; g < G; ++g)
    for (int n = 0; n < N; ++n) {
      to_local[g] += sc[static_cast<size_t>(n * G + g)];
      from_local[g] += through[static_cast<size_t>(g * N + n)];
    }
  const int64_t staged_in = std::accumulate(to_local.begin(), to_local.end(), int64_t{0});
  const int64_t staged_out = std::accumulate(from_local.begin(), from_local.end(), int64_t{0});
  Tensor stage1 = Tensor::empty({staged_in}, in.dtype()), stage2 = Tensor::empty({staged_out}, in.dtype());
  if (!skip_copies_) {
    char* dst = static_cast<char*>(stage1.data());
    for (int g = 0; g < G; ++g)
      for (int n = 0; n < N; ++n) {
        const int w = n * G + g;
        const size_t bytes = static_cast<size_t>(sc[w]) * es;
        if (bytes) std::memcpy(dst, static_cast<const char*>(in.data()) + send_off[w] * es, bytes);
        dst += bytes;
      }
  }
  if (copy_bandwidth_ > 0) virtual_time::charge(2.0 * static_cast<double>(staged_in) * es / copy_bandwidth_);
  intra_->alltoallv(stage1, to_local, stage2, from_local).wait();
  // stage2 holds [source local g][destination node n]; phase 2 sends node n the
  // blocks of every g in order, which is the receiver's world-rank order.
  Tensor stage3 = Tensor::empty({staged_out}, in.dtype());
  std::vector<int64_t> to_node(static_cast<size_t>(N), 0), from_node(static_cast<size_t>(N), 0);
  {
    std::vector<int64_t> block_off(static_cast<size_t>(G * N) + 1, 0);
    std::partial_sum(through.begin(), through.end(), block_off.begin() + 1);
    char* dst = static_cast<char*>(stage3.data());
    for (int n = 0; n < N; ++n)
      for (int g = 0; g < G; ++g) {
        const size_t b = static_cast<size_t>(g * N + n);
        const size_t bytes = static_cast<size_t>(through[b]) * es;
        if (bytes && !skip_copies_) std::memcpy(dst, static_cast<const char*>(stage2.data()) + block_off[b] * es, bytes);
        dst += bytes;
        to_node[n] += through[b];
      }
    for (int n = 0; n < N; ++n)
      for (int g = 0; g < G; ++g) from_node[n] += rc[static_cast<size_t>(n * G + g)];
  }
  const int64_t received = std::accumulate(from_node.begin(), from_node.end(), int64_t{0});
  if (copy_bandwidth_ > 0) virtual_time::charge(2.0 * static_cast<double>(staged_out) * es / copy_bandwidth_);
  inter_->alltoallv(stage3, to_node, TensorView(out.data(), out.dtype(), {received}), from_node).wait();
}

}  // namespace switchyard::algorithms
