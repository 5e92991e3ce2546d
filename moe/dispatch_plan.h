// DispatchPlan: where every routed copy of a token goes under one ExecPlan.
// Built once per batch (a pure function of the routing, the capacity and the
// layer's geometry) and used by dispatch, combine and backward alike.
#pragma once

#include <cstdint>
#include <vector>

#include "moe/router.h"
#include "parallel/exec_plan.h"

namespace switchyard {

// Rows are sent in blocks ordered [chunk][destination rank][destination slot],
// so each chunk is one all-to-all and each destination's rows within it are
// contiguous. With r > 1 a row goes to `copies` ranks (one per hidden piece);
// their partial outputs are summed by combine.
struct DispatchPlan {
  ExecPlan exec;
  int64_t tokens = 0;
  int k = 0;
  int copies = 1;
  int64_t capacity = 0;
  int exchange_ranks = 1;  // ranks of the all-to-all (1: r = 0, no exchange)
  int exchange_first = 0;  // the expert group's rank of the all-to-all's rank 0 (a replica domain's first)
  int slots = 1;           // working expert slots per rank
  std::vector<int64_t> row_of_choice;       // [T*k*copies]: send row, -1 when dropped
  std::vector<int64_t> token_of_row;        // [rows]: source token, -1 for padding
  std::vector<float> weight_of_row;         // [rows]
  std::vector<int64_t> rows_per_expert;     // [E]: routed (kept) rows of each logical expert
  std::vector<int64_t> send_block_rows;     // [d * X * slots]
  std::vector<int64_t> recv_block_rows;     // [d * X * slots] (after the counts are exchanged)
  int64_t dropped = 0;                      // choices beyond capacity on this rank
  std::vector<int64_t> kept_rows_to_rank;   // [X]: routed rows (no padding) this rank sends each rank; whole experts
  // Sent once per destination rank (MoEConfig::send_once_per_rank; dropless):
  // the forward dispatch carries distinct (chunk, peer, token) rows only.
  bool send_once = false;
  std::vector<int64_t> unique_token;        // [unique rows]: the token each carries, in send order
  std::vector<int32_t> unique_of_row;       // [send rows]: which of its (chunk, peer)'s unique rows a row is
  std::vector<int64_t> unique_send_counts;  // [d * X]: unique rows per (chunk, peer)
  std::vector<int64_t> unique_recv_counts;  // [d * X] (after the counts are exchanged)
  std::vector<int64_t> recv_row_source;     // [recv rows]: the received unique row each expert row copies
  int64_t dispatch_rows() const { return send_once ? static_cast<int64_t>(unique_token.size()) : send_rows(); }
  // The combine layout (CombineLayout), when results leave the sender:
  bool moves_results = false;
  int64_t output_rows = 0;                  // rows of this rank's output (tokens when results stay)
  std::vector<int64_t> result_send_order;   // [T]: my tokens grouped by the rank their result goes to
  std::vector<int64_t> result_send_counts;  // [W]: results I send to each rank of the expert group
  std::vector<int64_t> result_recv_counts;  // [W]: results each rank sends me
  std::vector<int64_t> result_index;        // [received]: the output row of each result I receive, in order
  int64_t send_rows() const { return static_cast<int64_t>(token_of_row.size()); }
  int64_t recv_rows() const;
  // Rows of one chunk per peer, and where the chunk starts, on either side.
  std::vector<int64_t> send_counts(int chunk) const;
  std::vector<int64_t> recv_counts(int chunk) const;
  int64_t send_offset(int chunk) const;
  int64_t recv_offset(int chunk) const;
  int64_t recv_block(int chunk, int rank, int slot) const {
    return recv_block_rows[static_cast<size_t>((chunk * exchange_ranks + rank) * slots + slot)];
  }
};

// Where each token's combined result goes. By default it stays with the rank
// that sent the token, at the token's row; a caller may send it elsewhere (a
// token that moved before the layer goes home; ranks that own no tokens hand
// results to those that do). Every rank of the group gives one, or none does.
struct CombineLayout {
  std::vector<int> rank;       // [T]: the rank that receives token t's result
  std::vector<int64_t> index;  // [T]: its row there
  int64_t output_rows = 0;     // rows this rank receives: its output is [output_rows, M]
};

// What a plan's shape makes of the layer's layout (MoELayer computes it).
struct DispatchGeometry {
  int experts = 0;          // E logical experts
  int shards = 1;           // S ranks per stored expert (sliced, r >= 1); 1 otherwise
  int exchange_ranks = 1;   // X
  int exchange_first = 0;   // the group rank of the exchange's rank 0
  int slots = 1;            // working expert slots per rank (the most any rank has)
  int copies = 1;           // ranks every routed row goes to (r > 1)
  int replicas = 1;         // rank sets a sliced expert's rows are split over (S / r)
  int rank = 0;             // this rank in the exchange (its group rank - exchange_first)
  bool send_once = false;   // MoEConfig::send_once_per_rank, for dropless plans with an exchange
  // Whole experts or r = 0: the destination blocks (u * slots + l) of each
  // logical expert's replicas; its i-th kept choice goes to block i mod count.
  std::vector<std::vector<int>> blocks_of_expert;  // [E]
  // Padded, whole experts: over how many replicas source u spreads the
  // expert of my slot l, 0 when u does not use that slot ([X * slots]).
  std::vector<int> replicas_seen_by_source;
  // Nearest replica choice (MoEConfig::replica_choice): per logical expert,
  // the quanta (of ExpertPlacement::kShareQuanta) of its kept choices each of
  // its blocks_of_expert takes, and, for padded sizes, the quanta source u
  // sends my slot l ([X * slots]). Empty: in turn, equal shares.
  std::vector<std::vector<int64_t>> quanta_of_expert;
  std::vector<int64_t> quanta_seen_by_source;
  // Sliced experts (shards > 1): the logical expert at each position.
  std::vector<int> expert_at_position;  // [E]
};

// Slots are handed out choice by choice (all first choices, then all second
// ...), as GShard and Tutel do, so a token's best expert wins a slot first;
// batch_prioritized orders the tokens by their best weight first. Capacity
// (already agreed across the group) binds per logical expert, before a replica
// is chosen, so replicas never change which choices drop. Padded blocks hold
// ceil(C / replicas) rows; padded plans also know their receive blocks,
// dropless ones learn them from the count exchange.
// `rotation` (the batch's sequence number) turns which replica a source's
// first kept choice of an expert goes to, so replicas share a small batch's
// rows too (the source rank turns it as well).
DispatchPlan build_dispatch_plan(const RouterConfig& router, const Routing& routing, int64_t tokens,
                                 const ExecPlan& exec, int64_t capacity, const DispatchGeometry& geometry,
                                 uint64_t rotation = 0);

}  // namespace switchyard
