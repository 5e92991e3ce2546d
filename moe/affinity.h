// Speculative MoE (Sem-MoE, arXiv 2503.04398): a token's experts are
// predictable from the token itself and from where its previous layers'
// experts were, so experts used together can share a rank (expert grouping,
// moe/expert_grouping.h) and each token can be moved, before the layer, to
// the rank that will probably hold its experts (speculative token shuffling).
// It is lossless: the gate still decides, a wrong guess only sends that
// token's rows through the normal all-to-all.
//
// This file holds the tables built from routing traces (moe/routing_trace.h)
// under a placement of W ranks, the predictor that turns them into a rank
// preference per token, the assignment of a batch's tokens to equal chunks
// per rank, and the local activation rate (LAR) a placement and an
// assignment reach on a trace: the share of (token, choice) pairs whose
// expert is on the token's rank.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "moe/placement.h"
#include "moe/routing_trace.h"

namespace switchyard {

// Which table predicts a token's rank.
enum class AffinityPredictor {
  token,     // the token id's experts (the confidence table), mapped through the placement
  joint,     // keyed by (token id, ranks of its experts in the previous `lookback` layers); unseen keys: token
  sequence,  // keyed by the previous layers' ranks alone (the device-sequence table); unseen keys: token
};
const char* predictor_name(AffinityPredictor p);
AffinityPredictor parse_predictor(const std::string& name);  // throws naming the accepted names

// Votes for each rank: the choices that landed there, and their gate weights
// (the tie-break: with k = 2 a two-rank split is a tie in votes).
struct RankVotes {
  std::vector<float> votes, weights;  // [W]
};

struct AffinityLayer {
  std::vector<int> rank_of_expert;       // [E]: the placement the rank tables were counted under
  std::vector<float> confidence;         // [V, E]: a token's choices per expert, normalised over experts
  std::vector<float> weight_confidence;  // [V, E]: their gate weights, normalised alike
  std::vector<float> mean_confidence, mean_weight_confidence;  // [E]: the layer's, for ids beyond the tables
  // Keys pack (token, rank set of layer l-1, rank set of layer l-2): affinity_key().
  std::unordered_map<uint64_t, RankVotes> joint;
  std::unordered_map<uint64_t, RankVotes> sequence;  // the same keys with token = 0
};

class AffinityTables {
 public:
  // Counted on every token of `trace` under `rank_of_expert` (per layer: the
  // rank of each logical expert on `ranks` ranks). lookback 0..2: layers of
  // previous rank sets the joint and sequence tables key on (0: none built).
  // vocab: token ids below it (0: the trace's largest id + 1).
  static AffinityTables build(const RoutingTrace& trace, int ranks, const std::vector<std::vector<int>>& rank_of_expert,
                              int lookback, int vocab = 0);
  // E / W experts per rank in expert order (what the MoE layer does without a placement).
  static std::vector<std::vector<int>> identity_placement(int layers, int experts, int ranks);

  // Tokens the trace never showed take the rows of their nearest seen
  // neighbour in an embedding [vocab, dim] (Euclidean; ties to the lower id).
  // Without it they keep the layer's mean row.
  void borrow_unseen(const float* embedding, int64_t vocab, int64_t dim);

  // Rank scores of one token at `layer`: votes and weights per rank (W each),
  // masks = the rank sets of its choices in layers l-1 and l-2 (bit w: rank
  // w; 0 where the layer does not exist). Returns whether a look-back table
  // had the key (false: the token table answered).
  bool rank_scores(int layer, int32_t token, uint32_t mask1, uint32_t mask2, AffinityPredictor predictor, float* votes,
                   float* weights) const;

  // The layers' placements as the MoE layers take them (moe/placement.h): a
  // rank's experts on its slots in id order. Throws unless every rank holds E / W.
  std::vector<ExpertPlacement> placements() const;

  void save(const std::string& path) const;
  static AffinityTables load(const std::string& path);  // errors name the file, the tensor and what was expected

  int ranks() const { return ranks_; }
  int layers() const { return static_cast<int>(layers_.size()); }
  int experts() const { return experts_; }
  int k() const { return k_; }
  int vocab() const { return vocab_; }
  int lookback() const { return lookback_; }
  const std::vector<float>& token_frequency() const { return token_frequency_; }  // [V] counts in the build part
  const std::vector<int>& borrowed_from() const { return borrowed_from_; }        // [V]: -1 own row or the mean
  const AffinityLayer& layer(int l) const { return layers_.at(static_cast<size_t>(l)); }
  int64_t built_tokens() const { return built_tokens_; }

 private:
  int ranks_ = 0, experts_ = 0, k_ = 0, vocab_ = 0, lookback_ = 0;
  int64_t built_tokens_ = 0;
  std::vector<float> token_frequency_;
  std::vector<int> borrowed_from_;
  std::vector<AffinityLayer> layers_;
};

// The key of (token, the rank sets one and two layers back).
inline uint64_t affinity_key(int32_t token, uint32_t mask1, uint32_t mask2) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(token)) << 40) ^ (static_cast<uint64_t>(mask1) << 20) ^ mask2;
}
// Look-back masks are W bits each inside the key: W at most this.
constexpr int kAffinityMaxMaskRanks = 20;

// Equal chunks of a batch: rank w takes rows / W, the first rows mod W one
// more (so a batch smaller than W leaves the last ranks empty).
std::vector<int64_t> equal_chunks(int64_t rows, int ranks);

// Each row's rank for a batch of `rows` rows with scores [rows, W] (votes
// first, then weights): the most confident rows (their best rank's share of
// their votes, then its weight share) choose first, each its best rank that
// still has room in `chunks` (rows each rank may take; at least `rows` in
// all), else its next best (so overflow goes to each row's next-best rank,
// not to whichever rank is left). Ties: lower row, then lower rank.
std::vector<int> assign_to_chunks(const std::vector<float>& votes, const std::vector<float>& weights, int64_t rows,
                                  int ranks, const std::vector<int64_t>& chunks);

// Each row's member of a group of `members` ranks from `first` (the group's
// slice of the tables' W ranks) at `layer`: the rows' rank scores from the
// tables (masks: their rank sets one and two layers back), assigned to the
// members in chunks of `per` rows (assign_to_chunks). keyed (may be null)
// counts the rows a look-back table answered.
std::vector<int> predict_members(const AffinityTables& tables, int layer, const std::vector<int32_t>& tokens,
                                 const std::vector<uint32_t>& mask1, const std::vector<uint32_t>& mask2,
                                 AffinityPredictor predictor, int first, int members, int64_t per,
                                 int64_t* keyed = nullptr);

// What predicting and assigning a batch costs the host: per_batch + per_row x rows seconds.
struct ShuffleCost {
  double per_batch = 0, per_row = 0;
  double seconds(int64_t rows) const { return per_batch + per_row * static_cast<double>(rows); }
};
// predict_members on this thread for a group of `members`, on synthetic
// batches (the tables' tokens in turn, two-rank look-back sets) of 16 and
// 1024 rows: thread CPU time (ranks sharing cores do not inflate it), median
// of three. Not collective: ranks that decide with it agree on it first (the
// slowest's).
ShuffleCost measure_shuffle_cost(const AffinityTables& tables, AffinityPredictor predictor, int members);

// What one configuration reaches on a trace.
struct LocalActivation {
  int64_t pairs = 0, local = 0;              // (token, choice) pairs and those whose expert was on the token's rank
  int64_t remote_rows = 0;                   // rows sent to another rank: one per remote choice
  int64_t remote_rows_once = 0;              // one per (token, remote rank): a token sent once per destination
  std::vector<double> per_layer;             // LAR per layer
  std::vector<int64_t> rows_to_peer;         // [W, W] remote rows from rank a to rank b, summed over layers
  double predicted_share = 0;                // rows of layers >= 1 whose rank came from a look-back table (shuffling)
  double expert_load_max_over_median = 0;    // choices per expert, worst layer
  double rank_load_max_over_median = 0;      // choices arriving at each rank's experts, worst layer
  double lar() const { return pairs ? static_cast<double>(local) / static_cast<double>(pairs) : 0.0; }
};

struct ShuffleOptions {
  bool shuffle = false;  // false: the rows stay where the batch put them (equal chunks in order)
  AffinityPredictor predictor = AffinityPredictor::joint;
  int64_t batch_tokens = 2048;  // consecutive tokens of the trace per batch
};

// The rank of each row of one batch (the trace's tokens b0 .. b0 + rows - 1)
// at `layer`: equal chunks in order, or shuffled to the predicted ranks
// (options.shuffle). keyed (may be null) counts the rows a look-back table answered.
std::vector<int> batch_ranks(const RoutingTrace& trace, const AffinityTables& tables, const ShuffleOptions& options,
                             int64_t b0, int64_t rows, int layer, int64_t* keyed = nullptr);

// The trace in batches under the tables' placement: rows in equal chunks in
// order, or shuffled to their predicted ranks (per layer, from the rank sets
// of the trace's own choices in the previous layers, as a model knows them
// by then). Checks the trace against the tables (layers, experts, k).
LocalActivation score_local_activation(const RoutingTrace& trace, const AffinityTables& tables,
                                       const ShuffleOptions& options);

}  // namespace switchyard
