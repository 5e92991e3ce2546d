// The emulated backend: data moves for real through an inner communicator
// (threads, mpi, or fake for logic at scale), while every op is charged to a
// virtual clock by an alpha-beta link model with two link classes (inside a
// node, across nodes). An op starts at the latest of its issuing thread's
// virtual time, the end of the previous op on this communicator (one FIFO
// stream, as on a GPU's communication stream) and every member's start (one
// small max-allreduce on the inner communicator per collective); it ends after
// the slowest member's modelled cost. Waiting on its Work moves the waiter's
// virtual time to that end (comm/virtual_time.h). Compute phases are charged
// by their callers with a device model (parallel/cost_model.h).
//
// Costs per member (p ranks, n bytes, alpha/beta of the slowest link class the
// group spans; all-to-all counts each peer's class separately):
//   alltoall(v)  sum over peers of alpha(peer) + max over classes of bytes(class) / bandwidth(class),
//                where a NIC shared by several members (ranks_per_nic > 1) costs at least
//                the busier of its directions, summed over every member on it (and, for
//                concurrent sibling groups, as much again for each NIC-mate outside the group)
//   allreduce    2 (p-1) (alpha + n / p / bandwidth)         (ring)
//   reduce-scatter, allgather(v)  (p-1) (alpha + n / p / bandwidth), n = the full buffer
//   broadcast    ceil(log2 p) (alpha + n / bandwidth);  barrier  ceil(log2 p) alpha
//   send / recv  alpha + n / bandwidth
#pragma once

#include <memory>
#include <string>

#include "comm/communicator.h"

namespace switchyard {

struct LinkClass {
  double latency = 0;    // alpha, seconds per message
  double bandwidth = 1;  // beta^-1, bytes per second, per rank and direction
};

struct LinkModel {
  LinkClass intra;          // inside a node (NVLink, shared memory)
  LinkClass inter;          // across nodes (InfiniBand, Ethernet)
  int ranks_per_node = 1;   // world ranks are placed on nodes in blocks
  // Ranks sharing one inter-node NIC (consecutive ranks of a node): inter.bandwidth
  // is the NIC's, so ranks that cross nodes at once split it. 1: a NIC per rank.
  int ranks_per_nic = 1;
  bool same_node(int world_a, int world_b) const {
    return world_a / ranks_per_node == world_b / ranks_per_node;
  }
  bool same_nic(int world_a, int world_b) const {
    return same_node(world_a, world_b) && world_a / ranks_per_nic == world_b / ranks_per_nic;
  }
};

// Wraps `inner` (usually the world); groups made from the result are emulated
// too and know their members' world ranks. timing_only: floating-point
// payloads over 64 KiB are charged but not moved (outputs keep whatever they
// held), except in allreduce; integer and f64 payloads (counts, clocks) always
// move, so control flow stays real. For virtual timings of clusters whose data
// would not fit this machine.
std::shared_ptr<Communicator> make_emulated_communicator(std::shared_ptr<Communicator> inner, LinkModel model,
                                                         bool timing_only = false);
inline constexpr size_t kEmulatedControlBytes = 64 * 1024;

// The model's cost of ops on a group (for planners and tests): `members` are
// world ranks, `me` an index into them.
struct EmulatedCosts {
  // One member's part of an all-to-all-v: per-message latency, and bytes by link class.
  struct AlltoallParts {
    double latency = 0, intra_bytes = 0, inter_bytes = 0;
    double inter_sent = 0, inter_received = 0;  // a shared NIC is full duplex: each direction on its own
  };
  static AlltoallParts alltoallv_parts(const LinkModel& m, const std::vector<int>& members, int me,
                                       const std::vector<int64_t>& send_bytes, const std::vector<int64_t>& recv_bytes);
  // Without NIC sharing: latency + the slower class's bytes over its bandwidth.
  static double alltoallv(const LinkModel& m, const std::vector<int>& members, int me,
                          const std::vector<int64_t>& send_bytes, const std::vector<int64_t>& recv_bytes);
  static double allreduce(const LinkModel& m, const std::vector<int>& members, int64_t bytes);
  static double reduce_scatter(const LinkModel& m, const std::vector<int>& members, int64_t full_bytes);
  static double allgather(const LinkModel& m, const std::vector<int>& members, int64_t full_bytes);
  static double broadcast(const LinkModel& m, const std::vector<int>& members, int64_t bytes);
  static double barrier(const LinkModel& m, const std::vector<int>& members);
  static double point_to_point(const LinkModel& m, int world_a, int world_b, int64_t bytes);
};

}  // namespace switchyard
