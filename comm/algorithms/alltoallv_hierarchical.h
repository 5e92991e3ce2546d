// Two-dimensional hierarchical all-to-all(v) (Tutel's 2DH), written over
// Communicators: an exchange inside each node, a local re-layout, then an
// exchange among the ranks with the same local rank on every node. With N
// nodes of G ranks each rank talks to G-1 + N-1 peers instead of N*G-1, so
// messages across the slow links are G times larger: it wins when per-message
// latency dominates (many nodes, small blocks) and loses the two extra copies
// otherwise.
#pragma once

#include <memory>
#include <vector>

#include "comm/communicator.h"
#include "comm/executor.h"

namespace switchyard::algorithms {

class HierarchicalAlltoall {
 public:
  // Collective over `world`: rank w is on node w / local_size with local rank
  // w % local_size; creates the node group and the cross-node group once.
  // local_size must divide world.size().
  HierarchicalAlltoall(Communicator& world, int local_size);

  int local_size() const { return local_size_; }
  int nodes() const { return nodes_; }
  const std::shared_ptr<Communicator>& intra() const { return intra_; }
  const std::shared_ptr<Communicator>& inter() const { return inter_; }

  // The contract of Communicator::alltoall / alltoallv over `world`. Runs on
  // this object's FIFO executor: calls return at once and the Work completes
  // when the last phase is done. alltoallv exchanges the per-node counts first;
  // alltoall (equal blocks) needs no such round.
  Work alltoall(Buffer in, Buffer out);
  // Emulation: charge the two local re-layouts to virtual time at this many
  // bytes per second (0: not charged).
  void set_copy_bandwidth(double bytes_per_second) { copy_bandwidth_ = bytes_per_second; }
  // Timing-only emulation: the phases' payloads do not move, so the local
  // re-layouts are charged but not done (staging memory stays untouched).
  void set_skip_copies(bool skip) { skip_copies_ = skip; }
  Work alltoallv(Buffer in, std::vector<int64_t> send_counts, Buffer out, std::vector<int64_t> recv_counts);

 private:
  Work run(Buffer in, std::vector<int64_t> send_counts, Buffer out, std::vector<int64_t> recv_counts, bool uniform);
  void exchange(const TensorView& in, const std::vector<int64_t>& send_counts, const TensorView& out,
                const std::vector<int64_t>& recv_counts, bool uniform);
  int rank_, size_, local_size_, nodes_;
  std::string name_;
  std::shared_ptr<Communicator> intra_, inter_;
  double copy_bandwidth_ = 0;
  bool skip_copies_ = false;
  std::unique_ptr<Executor> executor_;
};

}  // namespace switchyard::algorithms
