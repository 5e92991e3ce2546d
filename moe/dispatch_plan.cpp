#include "moe/dispatch_plan.h"

#include <algorithm>
#include <numeric>

#include "moe/placement.h"

namespace switchyard {
namespace {
std::vector<int64_t> chunk_counts(const std::vector<int64_t>& blocks, int chunk, int ranks, int slots) {
  std::vector<int64_t> out(static_cast<size_t>(ranks), 0);
  for (int u = 0; u < ranks; ++u)
    for (int l = 0; l < slots; ++l) out[u] += blocks[static_cast<size_t>((chunk * ranks + u) * slots + l)];
  return out;
}
int64_t chunk_offset(const std::vector<int64_t>& blocks, int chunk, int ranks, int slots) {
  return std::accumulate(blocks.begin(), blocks.begin() + static_cast<ptrdiff_t>(chunk) * ranks * slots, int64_t{0});
}
}  // namespace

int64_t DispatchPlan::recv_rows() const {
  return std::accumulate(recv_block_rows.begin(), recv_block_rows.end(), int64_t{0});
}
std::vector<int64_t> DispatchPlan::send_counts(int chunk) const {
  return chunk_counts(send_block_rows, chunk, exchange_ranks, slots);
}
std::vector<int64_t> DispatchPlan::recv_counts(int chunk) const {
  return chunk_counts(recv_block_rows, chunk, exchange_ranks, slots);
}
int64_t DispatchPlan::send_offset(int chunk) const { return chunk_offset(send_block_rows, chunk, exchange_ranks, slots); }
int64_t DispatchPlan::recv_offset(int chunk) const { return chunk_offset(recv_block_rows, chunk, exchange_ranks, slots); }

DispatchPlan build_dispatch_plan(const RouterConfig& router, const Routing& routing, int64_t tokens,
                                 const ExecPlan& exec, int64_t capacity, const DispatchGeometry& g, uint64_t rotation) {
  const int k = static_cast<int>(routing.experts.shape().size() == 2 ? routing.experts.shape()[1] : router.k);
  const int E = g.experts, S = g.shards, d = exec.d, X = g.exchange_ranks, Lw = g.slots;
  const bool padded = exec.exchange == ExchangeMode::padded;
  const bool sliced = S > 1 && exec.r != 0;
  DispatchPlan p;
  p.exec = exec;
  p.tokens = tokens;
  p.k = k;
  p.copies = g.copies;
  p.exchange_ranks = X;
  p.exchange_first = g.exchange_first;
  p.slots = Lw;
  p.capacity = capacity;
  const int32_t* chosen = tokens ? routing.experts.data_as<int32_t>() : nullptr;
  const float* weight = tokens ? routing.weights.data_as<float>() : nullptr;
  std::vector<std::vector<int64_t>> choice_at(static_cast<size_t>(E));  // per logical expert, in slot order
  std::vector<int64_t> order(static_cast<size_t>(tokens));
  std::iota(order.begin(), order.end(), int64_t{0});
  if (router.batch_prioritized)
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return weight[a * k] > weight[b * k]; });
  for (int j = 0; j < k; ++j)
    for (const int64_t t : order) {
      auto& at = choice_at[static_cast<size_t>(chosen[t * k + j])];
      if (static_cast<int64_t>(at.size()) < p.capacity)
        at.push_back(t * k + j);
      else
        ++p.dropped;
    }
  p.rows_per_expert.resize(static_cast<size_t>(E));
  for (int e = 0; e < E; ++e) p.rows_per_expert[e] = static_cast<int64_t>(choice_at[e].size());

  // Whole experts: each block's choices (a replica takes every count-th kept
  // choice of its expert) and its padded size.
  std::vector<std::vector<int64_t>> block_choices;
  std::vector<int64_t> block_padded;
  if (!sliced) {
    block_choices.resize(static_cast<size_t>(X * Lw));
    block_padded.assign(static_cast<size_t>(X * Lw), 0);
    for (int e = 0; e < E; ++e) {
      const auto& blocks = g.blocks_of_expert[static_cast<size_t>(e)];
      const auto n = static_cast<int64_t>(blocks.size());
      const auto first = static_cast<int64_t>((rotation + static_cast<uint64_t>(g.rank)) % static_cast<uint64_t>(n));
      if (!g.quanta_of_expert.empty()) {
        // Nearest: block b takes floor(m q_b / Q) choices, the remainders by largest fraction (ties in the
        // batch's turn), in runs: never more than ceil(m q_b / Q) <= its padded ceil(C q_b / Q).
        const auto& q = g.quanta_of_expert[static_cast<size_t>(e)];
        const int64_t Q = ExpertPlacement::kShareQuanta, m = static_cast<int64_t>(choice_at[e].size());
        std::vector<int64_t> take(static_cast<size_t>(n));
        std::vector<std::pair<int64_t, int64_t>> rest;  // (remainder, turn order)
        int64_t given = 0;
        for (int64_t b = 0; b < n; ++b) {
          take[static_cast<size_t>(b)] = m * q[static_cast<size_t>(b)] / Q;
          given += take[static_cast<size_t>(b)];
          rest.push_back({m * q[static_cast<size_t>(b)] % Q, (b - first + n) % n});
        }
        std::sort(rest.begin(), rest.end(), [](const auto& a, const auto& b) { return a.first != b.first ? a.first > b.first : a.second < b.second; });
        for (size_t i = 0; given < m; ++i, ++given) ++take[static_cast<size_t>((rest[i].second + first) % n)];
        int64_t next = 0;
        for (int64_t b = 0; b < n; ++b) {
          auto& to = block_choices[static_cast<size_t>(blocks[static_cast<size_t>(b)])];
          for (int64_t i = 0; i < take[static_cast<size_t>(b)]; ++i) to.push_back(choice_at[e][static_cast<size_t>(next++)]);
          block_padded[static_cast<size_t>(blocks[static_cast<size_t>(b)])] = (p.capacity * q[static_cast<size_t>(b)] + Q - 1) / Q;
        }
        continue;
      }
      for (int64_t i = 0; i < static_cast<int64_t>(choice_at[e].size()); ++i)
        block_choices[static_cast<size_t>(blocks[static_cast<size_t>((first + i) % n)])].push_back(choice_at[e][i]);
      for (int b : blocks) block_padded[static_cast<size_t>(b)] = (p.capacity + n - 1) / n;
    }
  }
  // The choices a destination block takes, the slot range of them, and which copy it is.
  struct Block {
    const std::vector<int64_t>* choices;
    int64_t lo, hi;
    int copy;
  };
  auto block = [&](int u, int l) -> Block {
    if (!sliced) {
      const auto b = static_cast<size_t>(u * Lw + l);
      return {&block_choices[b], 0, padded ? block_padded[b] : static_cast<int64_t>(block_choices[b].size()), 0};
    }
    const int pos = u / S, s = u % S, R = g.replicas, q = s % R;
    const auto& at = choice_at[static_cast<size_t>(g.expert_at_position[static_cast<size_t>(pos)])];
    const auto n = static_cast<int64_t>(at.size());
    if (padded) {
      const int64_t per = (p.capacity + R - 1) / R;
      return {&at, q * per, (q + 1) * per, s / R};
    }
    return {&at, q * n / R, (q + 1) * n / R, s / R};
  };
  auto chunk_range = [&](const Block& b, int i) {
    const int64_t width = b.hi - b.lo;
    return std::pair<int64_t, int64_t>{b.lo + i * width / d, b.lo + (i + 1) * width / d};
  };
  p.send_block_rows.assign(static_cast<size_t>(d * X * Lw), 0);
  p.row_of_choice.assign(static_cast<size_t>(tokens * k * p.copies), -1);
  int64_t row = 0;
  for (int i = 0; i < d; ++i)
    for (int u = 0; u < X; ++u)
      for (int l = 0; l < Lw; ++l) {
        const Block b = block(u, l);
        const auto [lo, hi] = chunk_range(b, i);
        p.send_block_rows[static_cast<size_t>((i * X + u) * Lw + l)] = hi - lo;
        const auto& at = *b.choices;
        for (int64_t slot = lo; slot < hi; ++slot, ++row) {
          if (slot >= static_cast<int64_t>(at.size())) {  // padding
            p.token_of_row.push_back(-1);
            p.weight_of_row.push_back(0.f);
            continue;
          }
          const int64_t c = at[static_cast<size_t>(slot)];
          p.token_of_row.push_back(c / k);
          p.weight_of_row.push_back(weight[c]);
          p.row_of_choice[static_cast<size_t>(c * p.copies + b.copy)] = row;
        }
      }
  if (!sliced) {
    p.kept_rows_to_rank.assign(static_cast<size_t>(X), 0);
    for (int u = 0; u < X; ++u)
      for (int l = 0; l < Lw; ++l)
        p.kept_rows_to_rank[static_cast<size_t>(u)] += static_cast<int64_t>(block_choices[static_cast<size_t>(u * Lw + l)].size());
  }
  if (g.send_once && !padded && X > 1) {
    // Distinct tokens per (chunk, peer), in order of first appearance.
    p.send_once = true;
    p.unique_of_row.assign(static_cast<size_t>(p.send_rows()), -1);
    p.unique_send_counts.assign(static_cast<size_t>(d * X), 0);
    std::vector<int64_t> stamp(static_cast<size_t>(tokens), -1);
    std::vector<int32_t> index(static_cast<size_t>(tokens), 0);
    int64_t r = 0;
    for (int i = 0; i < d; ++i)
      for (int u = 0; u < X; ++u) {
        const int64_t group = static_cast<int64_t>(i) * X + u;
        int32_t distinct = 0;
        for (int l = 0; l < Lw; ++l)
          for (int64_t n = p.send_block_rows[static_cast<size_t>(group * Lw + l)]; n > 0; --n, ++r) {
            const int64_t t = p.token_of_row[static_cast<size_t>(r)];
            if (stamp[static_cast<size_t>(t)] != group) {
              stamp[static_cast<size_t>(t)] = group;
              index[static_cast<size_t>(t)] = distinct++;
              p.unique_token.push_back(t);
            }
            p.unique_of_row[static_cast<size_t>(r)] = index[static_cast<size_t>(t)];
          }
        p.unique_send_counts[static_cast<size_t>(group)] = distinct;
      }
  }
  if (X == 1) {
    p.recv_block_rows = p.send_block_rows;
  } else if (padded) {  // every source sends my blocks the same padded sizes
    p.recv_block_rows.resize(p.send_block_rows.size());
    for (int i = 0; i < d; ++i)
      for (int l = 0; l < Lw; ++l) {
        if (sliced) {
          const auto [lo, hi] = chunk_range(block(g.rank, l), i);
          for (int u = 0; u < X; ++u) p.recv_block_rows[static_cast<size_t>((i * X + u) * Lw + l)] = hi - lo;
          continue;
        }
        for (int u = 0; u < X; ++u) {
          const int n = g.replicas_seen_by_source[static_cast<size_t>(u * Lw + l)];
          int64_t padded_rows = n ? (p.capacity + n - 1) / n : 0;
          if (!g.quanta_seen_by_source.empty()) {
            const int64_t q = g.quanta_seen_by_source[static_cast<size_t>(u * Lw + l)], Q = ExpertPlacement::kShareQuanta;
            padded_rows = (p.capacity * q + Q - 1) / Q;
          }
          const Block b{nullptr, 0, padded_rows, 0};
          const auto [lo, hi] = chunk_range(b, i);
          p.recv_block_rows[static_cast<size_t>((i * X + u) * Lw + l)] = hi - lo;
        }
      }
  }
  return p;
}

}  // namespace switchyard
