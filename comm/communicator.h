// Communicator: the collectives every strategy is built from. Each op is
// validated on the caller's thread, then runs on the communicator's FIFO
// executor and returns a Work. A backend implements the point-to-point
// Transport; it may also override any collective with a native one. An op a
// backend lacks throws "backend X does not support Y".
//
// Counts are elements of the buffers' dtype. Reductions accept f32, f64, bf16,
// f16, i32, i64; data movement accepts any dtype. Buffers must be contiguous
// host memory for the CPU backends.
#pragma once

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "comm/executor.h"
#include "comm/stats.h"
#include "comm/transport.h"
#include "comm/types.h"
#include "comm/work.h"

namespace switchyard {

// What an op body sees on the executor.
struct OpContext {
  std::string_view name;
  Deadline deadline;
  Algorithm algorithm;
  double issue_time = 0;       // the issuing thread's virtual time (comm/virtual_time.h)
  double* end_time = nullptr;    // emulated backends set the op's virtual end here
  double* start_time = nullptr;  // ... and its virtual start
};

class Communicator : public std::enable_shared_from_this<Communicator> {
 public:
  virtual ~Communicator();
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  virtual std::string_view backend_name() const = 0;
  // A readable name for logs and errors, e.g. "world" or "world/ep".
  const std::string& name() const { return name_; }
  Milliseconds default_timeout() const { return default_timeout_; }
  void set_default_timeout(Milliseconds t) { default_timeout_ = t; }

  // out = reduce(in) over ranks; in and out may be the same buffer.
  Work allreduce(Buffer in, Buffer out, const ReduceOptions& opts = {});
  // in holds size() blocks of out.numel() elements; rank r gets reduce(block r).
  Work reduce_scatter(Buffer in, Buffer out, const ReduceOptions& opts = {});
  // out holds size() blocks of in.numel() elements, block r from rank r.
  Work allgather(Buffer in, Buffer out, const OpOptions& opts = {});
  // Like allgather with counts[r] elements from rank r; in.numel() == counts[rank()].
  Work allgatherv(Buffer in, Buffer out, std::vector<int64_t> counts, const OpOptions& opts = {});
  // in and out hold size() equal blocks; block p of in goes to rank p, block p of out comes from p.
  Work alltoall(Buffer in, Buffer out, const OpOptions& opts = {});
  // Packed variable blocks: send_counts[p] elements to p, recv_counts[p] from p,
  // each side laid out in rank order without gaps.
  Work alltoallv(Buffer in, std::vector<int64_t> send_counts, Buffer out, std::vector<int64_t> recv_counts,
                 const OpOptions& opts = {});
  Work broadcast(Buffer buffer, int root, const OpOptions& opts = {});
  Work send(Buffer buffer, int peer, const OpOptions& opts = {});
  Work recv(Buffer buffer, int peer, const OpOptions& opts = {});
  // Both directions in one op (ring shifts, pipelines): on one communicator a
  // send and a recv issued separately run one after the other on the executor.
  Work sendrecv(Buffer send_buffer, int to, Buffer recv_buffer, int from, const OpOptions& opts = {});
  Work barrier(const OpOptions& opts = {});

  // Collective over this communicator: ranks with the same color form a new
  // communicator ordered by (key, rank); color < 0 returns nullptr. Blocks.
  virtual std::shared_ptr<Communicator> split(int color, int key, const OpOptions& opts = {});
  // Collective over the members only: every member passes the same ordered
  // list of ranks of this communicator, which must include the caller. No
  // traffic on backends that need none (threads, fake). Blocks.
  std::shared_ptr<Communicator> create_group(std::vector<int> members, std::string name = "");
  // Emulation: this group's collectives run at the same time as those of
  // sibling groups whose members share its members' inter-node NICs (2DH's
  // cross-node groups, one per local index), each moving about as much, so
  // the emulated NIC carries theirs too. Other backends ignore it.
  virtual void set_concurrent_siblings(bool) {}

  CommStats stats() const;
  void reset_stats();

  // Where op buffers must live: host memory, or the backend's device (nccl, staged).
  virtual Device memory_device() const { return Device::cpu(); }

 protected:
  Communicator(int rank, int size, std::string name);

  // Point-to-point transport the generic algorithms run on (executor thread only).
  virtual Transport& transport() = 0;
  // Builds the group communicator; runs on this communicator's executor.
  // `group_key` is the same on every member: a hash of the member list and of
  // how many groups with that list this communicator made before.
  virtual std::shared_ptr<Communicator> do_create_group(const std::vector<int>& members, uint64_t group_key,
                                                        const std::string& name, const OpContext& ctx) = 0;

  // Collective bodies, run on the executor. Defaults: the generic algorithms
  // over transport(). Native overrides must honour ctx.deadline and may call
  // the base version to fall back (e.g. for a dtype the backend lacks).
  virtual void do_allreduce(const TensorView& in, const TensorView& out, ReduceOp op, const OpContext& ctx);
  virtual void do_reduce_scatter(const TensorView& in, const TensorView& out, ReduceOp op, const OpContext& ctx);
  virtual void do_allgatherv(const TensorView& in, const TensorView& out, std::span<const int64_t> counts,
                             const OpContext& ctx);
  virtual void do_alltoallv(const TensorView& in, std::span<const int64_t> send_counts, const TensorView& out,
                            std::span<const int64_t> recv_counts, const OpContext& ctx);
  virtual void do_broadcast(const TensorView& buffer, int root, const OpContext& ctx);
  virtual void do_send(const TensorView& buffer, int peer, uint32_t tag, const OpContext& ctx);
  virtual void do_recv(const TensorView& buffer, int peer, uint32_t tag, const OpContext& ctx);
  virtual void do_sendrecv(const TensorView& send_buffer, int to, const TensorView& recv_buffer, int from,
                           uint32_t tag, const OpContext& ctx);
  virtual void do_barrier(const OpContext& ctx);
  // Whether allgather / alltoall with equal blocks have a native form; the
  // defaults route them through the v-variants.
  virtual void do_allgather(const TensorView& in, const TensorView& out, const OpContext& ctx);
  virtual void do_alltoall(const TensorView& in, const TensorView& out, const OpContext& ctx);

  // For native ops: record the bytes exchanged with a peer (the generic
  // algorithms are counted by the transport wrapper).
  void count_peer_bytes(int peer, uint64_t sent, uint64_t received);
  // Native collectives hide their algorithm: record what a direct exchange
  // would move with each peer, so traffic stays comparable across backends.
  // (allreduce = reduce-scatter + allgather; broadcast = root to every rank.)
  void count_direct_allreduce(const TensorView& in);
  void count_direct_reduce_scatter(const TensorView& out);
  void count_direct_allgatherv(const TensorView& in, std::span<const int64_t> counts);
  void count_direct_alltoallv(size_t element_size, std::span<const int64_t> send_counts,
                              std::span<const int64_t> recv_counts);
  void count_direct_broadcast(const TensorView& buffer, int root);
  // Counting wrapper around transport(), used by the default bodies.
  Transport& counted_transport();
  // Stop the executor before a derived class's members go (call first in derived destructors).
  void shutdown_executor();

  // Stream-ordered backends (nccl): an op's body runs on the issuing thread and
  // only queues device work on the backend's stream; after it, stream_work()
  // makes the Work that tracks that work (an event) and keeps `owners` (the
  // op's buffers) until the device is done with them. Its wait() makes the
  // caller's stream wait rather than blocking the host. Errors raised while
  // queueing are thrown to the caller (and break the communicator).
  virtual bool stream_ordered() const { return false; }
  virtual std::shared_ptr<WorkState> stream_work(WorkLabel label, std::vector<std::shared_ptr<void>> owners) {
    return nullptr;
  }

 private:
  Work enqueue(std::string_view op, const OpOptions& opts, uint64_t payload_bytes,
               std::initializer_list<const Buffer*> buffers, std::function<void(const OpContext&)> body);
  void check_usable() const;
  Work enqueue_on_stream(std::string_view op, const OpOptions& opts, uint64_t payload_bytes,
                         std::initializer_list<const Buffer*> buffers,
                         const std::function<void(const OpContext&)>& body);

  int rank_;
  int size_;
  std::string name_;
  Milliseconds default_timeout_;
  mutable std::mutex stats_mutex_;
  CommStats stats_;
  std::string broken_reason_;  // guarded by stats_mutex_; set when an op failed
  std::atomic<bool> broken_{false};
  class CountingTransport;
  std::unique_ptr<CountingTransport> counting_;
  std::map<std::vector<int>, uint64_t> groups_made_;  // per member list: members agree on the count
  std::unique_ptr<Executor> executor_;
};

// One double reduced over the communicator (sum, max or min): timings, losses, counts.
double allreduce_scalar(Communicator& comm, double value, ReduceOp op = ReduceOp::sum);
// True on every rank when every rank passed the same value (one all-reduce of
// its halves as max and -min); a check that ranks computed the same thing.
bool same_on_every_rank(Communicator& comm, uint64_t value);

}  // namespace switchyard
