#include "moe/affinity.h"

#include <time.h>

#include <algorithm>
#include <bit>
#include <charconv>
#include <cmath>
#include <numeric>

#include "core/error.h"
#include "core/safetensors.h"

namespace switchyard {
namespace {

constexpr const char* kFormat = "switchyard-affinity-v1";

// The rank set of a token's choices in one layer under that layer's placement.
uint32_t rank_mask(const RoutingTrace& t, int layer, int64_t token, const std::vector<int>& rank_of_expert) {
  uint32_t mask = 0;
  for (int j = 0; j < t.k; ++j) mask |= uint32_t{1} << rank_of_expert[static_cast<size_t>(t.expert(layer, token, j))];
  return mask;
}

// The look-back masks of a token at layer l: its rank sets one and two layers back, 0 where not used.
// rank_of(j): layer j's rank of each expert.
template <class RankOf>
std::pair<uint32_t, uint32_t> lookback_masks(const RoutingTrace& t, const RankOf& rank_of, int l, int64_t token,
                                             int lookback) {
  const uint32_t m1 = lookback >= 1 && l >= 1 ? rank_mask(t, l - 1, token, rank_of(l - 1)) : 0;
  const uint32_t m2 = lookback >= 2 && l >= 2 ? rank_mask(t, l - 2, token, rank_of(l - 2)) : 0;
  return {m1, m2};
}

void add_vote(std::unordered_map<uint64_t, RankVotes>& table, uint64_t key, int ranks, int rank, float weight) {
  RankVotes& v = table[key];
  if (v.votes.empty()) v.votes.assign(static_cast<size_t>(ranks), 0.0f), v.weights.assign(static_cast<size_t>(ranks), 0.0f);
  v.votes[static_cast<size_t>(rank)] += 1.0f;
  v.weights[static_cast<size_t>(rank)] += weight;
}

int metadata_int(const SafetensorsFile& f, const std::string& key, int lo, int hi) {
  const auto it = f.metadata().find(key);
  if (it == f.metadata().end()) SY_THROW(InvalidArgument, "affinity tables ", f.path(), ": no metadata ", key);
  int v = 0;
  const std::string& text = it->second;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || end != text.data() + text.size() || v < lo || v > hi)
    SY_THROW(InvalidArgument, "affinity tables ", f.path(), ": metadata ", key, " = '", text.substr(0, 40),
             "', expected an integer ", lo, "..", hi);
  return v;
}

void check_placement(const std::vector<std::vector<int>>& rank_of_expert, int layers, int experts, int ranks,
                     const std::string& what) {
  if (static_cast<int>(rank_of_expert.size()) != layers)
    SY_THROW(InvalidArgument, what, ": ", rank_of_expert.size(), " layer placements, expected ", layers);
  for (int l = 0; l < layers; ++l) {
    const auto& r = rank_of_expert[static_cast<size_t>(l)];
    if (static_cast<int>(r.size()) != experts)
      SY_THROW(InvalidArgument, what, ": layer ", l, " places ", r.size(), " experts, expected ", experts);
    for (int e = 0; e < experts; ++e)
      if (r[static_cast<size_t>(e)] < 0 || r[static_cast<size_t>(e)] >= ranks)
        SY_THROW(InvalidArgument, what, ": layer ", l, " puts expert ", e, " on rank ", r[static_cast<size_t>(e)],
                 ", expected 0..", ranks - 1);
  }
}

double max_over_median(std::vector<double> v) {
  if (v.empty()) return 0;
  const double mx = *std::max_element(v.begin(), v.end());
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  const double median = n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
  return median > 0 ? mx / median : 0;
}

}  // namespace

const char* predictor_name(AffinityPredictor p) {
  switch (p) {
    case AffinityPredictor::token: return "token";
    case AffinityPredictor::joint: return "joint";
    case AffinityPredictor::sequence: return "sequence";
  }
  return "?";
}

AffinityPredictor parse_predictor(const std::string& name) {
  for (AffinityPredictor p : {AffinityPredictor::token, AffinityPredictor::joint, AffinityPredictor::sequence})
    if (name == predictor_name(p)) return p;
  SY_THROW(InvalidArgument, "predictor '", name, "', expected token, joint or sequence");
}

std::vector<std::vector<int>> AffinityTables::identity_placement(int layers, int experts, int ranks) {
  if (ranks < 1 || experts % ranks != 0)
    SY_THROW(InvalidArgument, "identity placement: ", experts, " experts on ", ranks, " ranks, expected a rank count dividing them");
  std::vector<int> one(static_cast<size_t>(experts));
  for (int e = 0; e < experts; ++e) one[static_cast<size_t>(e)] = e / (experts / ranks);
  return std::vector<std::vector<int>>(static_cast<size_t>(layers), one);
}

AffinityTables AffinityTables::build(const RoutingTrace& trace, int ranks, const std::vector<std::vector<int>>& rank_of_expert,
                                     int lookback, int vocab) {
  const int L = trace.layers, E = trace.experts, k = trace.k;
  if (ranks < 1 || ranks > E) SY_THROW(InvalidArgument, "affinity tables: ranks = ", ranks, ", expected 1..", E, " (the experts)");
  if (lookback < 0 || lookback > 2) SY_THROW(InvalidArgument, "affinity tables: lookback = ", lookback, ", expected 0, 1 or 2");
  if (lookback > 0 && ranks > kAffinityMaxMaskRanks)
    SY_THROW(InvalidArgument, "affinity tables: look-back tables key rank sets of at most ", kAffinityMaxMaskRanks,
             " ranks, got ranks = ", ranks, " (use lookback 0)");
  check_placement(rank_of_expert, L, E, ranks, "affinity tables");
  int max_token = 0;
  for (int32_t t : trace.tokens) max_token = std::max(max_token, t);
  if (vocab == 0) vocab = max_token + 1;
  if (vocab <= max_token)
    SY_THROW(InvalidArgument, "affinity tables: token ", max_token, " in trace ", trace.path, ", expected below vocab = ", vocab);
  if (vocab > RoutingTrace::kMaxVocab || static_cast<int64_t>(vocab) * E * L > RoutingTrace::kMaxTableEntries)
    SY_THROW(InvalidArgument, "affinity tables: vocab ", vocab, " x ", E, " experts x ", L, " layers, expected a vocab up to ",
             RoutingTrace::kMaxVocab, " and at most ", RoutingTrace::kMaxTableEntries, " entries in all");
  AffinityTables out;
  out.ranks_ = ranks, out.experts_ = E, out.k_ = k, out.vocab_ = vocab, out.lookback_ = lookback;
  out.built_tokens_ = trace.size();
  out.token_frequency_.assign(static_cast<size_t>(vocab), 0.0f);
  out.borrowed_from_.assign(static_cast<size_t>(vocab), -1);
  for (int32_t t : trace.tokens) out.token_frequency_[static_cast<size_t>(t)] += 1.0f;
  out.layers_.resize(static_cast<size_t>(L));
  for (int l = 0; l < L; ++l) out.layers_[static_cast<size_t>(l)].rank_of_expert = rank_of_expert[static_cast<size_t>(l)];
  const size_t VE = static_cast<size_t>(vocab) * static_cast<size_t>(E);
  for (int l = 0; l < L; ++l) {
    AffinityLayer& layer = out.layers_[static_cast<size_t>(l)];
    std::vector<double> counts(VE, 0.0), wsum(VE, 0.0), mean_c(static_cast<size_t>(E), 0.0), mean_w(static_cast<size_t>(E), 0.0);
    for (int64_t i = 0; i < trace.size(); ++i) {
      const size_t row = static_cast<size_t>(trace.tokens[static_cast<size_t>(i)]) * static_cast<size_t>(E);
      const auto [m1, m2] = lookback_masks(trace, [&](int j) -> const std::vector<int>& { return rank_of_expert[static_cast<size_t>(j)]; },
                                           l, i, lookback);
      for (int j = 0; j < k; ++j) {
        const int e = trace.expert(l, i, j);
        const float w = trace.weight(l, i, j);
        counts[row + static_cast<size_t>(e)] += 1.0;
        wsum[row + static_cast<size_t>(e)] += w;
        mean_c[static_cast<size_t>(e)] += 1.0;
        mean_w[static_cast<size_t>(e)] += w;
        if (lookback > 0 && l >= 1) {
          const int r = layer.rank_of_expert[static_cast<size_t>(e)];
          add_vote(layer.joint, affinity_key(trace.tokens[static_cast<size_t>(i)], m1, m2), ranks, r, w);
          add_vote(layer.sequence, affinity_key(0, m1, m2), ranks, r, w);
        }
      }
    }
    auto normalised = [E](const double* v) {
      const double s = std::accumulate(v, v + E, 0.0);
      std::vector<float> row(static_cast<size_t>(E), 0.0f);
      for (int e = 0; e < E; ++e) row[static_cast<size_t>(e)] = s > 0 ? static_cast<float>(v[e] / s) : 1.0f / static_cast<float>(E);
      return row;
    };
    layer.confidence.assign(VE, 0.0f);
    layer.weight_confidence.assign(VE, 0.0f);
    const std::vector<float> mc = normalised(mean_c.data()), mw = normalised(mean_w.data());
    layer.mean_confidence = mc, layer.mean_weight_confidence = mw;
    for (int t = 0; t < vocab; ++t) {
      const size_t row = static_cast<size_t>(t) * static_cast<size_t>(E);
      const bool seen = out.token_frequency_[static_cast<size_t>(t)] > 0;
      const std::vector<float> c = seen ? normalised(&counts[row]) : mc, w = seen ? normalised(&wsum[row]) : mw;
      std::copy(c.begin(), c.end(), layer.confidence.begin() + static_cast<std::ptrdiff_t>(row));
      std::copy(w.begin(), w.end(), layer.weight_confidence.begin() + static_cast<std::ptrdiff_t>(row));
    }
  }
  return out;
}

void AffinityTables::borrow_unseen(const float* embedding, int64_t vocab, int64_t dim) {
  if (vocab != vocab_)
    SY_THROW(InvalidArgument, "affinity tables: an embedding of ", vocab, " tokens for tables of vocab ", vocab_);
  std::vector<int> seen;
  for (int t = 0; t < vocab_; ++t)
    if (token_frequency_[static_cast<size_t>(t)] > 0) seen.push_back(t);
  if (seen.empty()) return;
  const size_t E = static_cast<size_t>(experts_);
  for (int t = 0; t < vocab_; ++t) {
    if (token_frequency_[static_cast<size_t>(t)] > 0) continue;
    const float* a = embedding + static_cast<int64_t>(t) * dim;
    int best = seen.front();
    double best_d = INFINITY;
    for (int s : seen) {
      const float* b = embedding + static_cast<int64_t>(s) * dim;
      double d = 0;
      for (int64_t i = 0; i < dim; ++i) d += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
      if (d < best_d) best_d = d, best = s;
    }
    borrowed_from_[static_cast<size_t>(t)] = best;
    for (AffinityLayer& layer : layers_) {
      std::copy_n(layer.confidence.begin() + static_cast<std::ptrdiff_t>(static_cast<size_t>(best) * E), E,
                  layer.confidence.begin() + static_cast<std::ptrdiff_t>(static_cast<size_t>(t) * E));
      std::copy_n(layer.weight_confidence.begin() + static_cast<std::ptrdiff_t>(static_cast<size_t>(best) * E), E,
                  layer.weight_confidence.begin() + static_cast<std::ptrdiff_t>(static_cast<size_t>(t) * E));
    }
  }
}

bool AffinityTables::rank_scores(int l, int32_t token, uint32_t mask1, uint32_t mask2, AffinityPredictor predictor,
                                 float* votes, float* weights) const {
  const AffinityLayer& layer = layers_.at(static_cast<size_t>(l));
  if (predictor != AffinityPredictor::token && lookback_ > 0 && l >= 1) {
    const auto& table = predictor == AffinityPredictor::joint ? layer.joint : layer.sequence;
    const auto found = table.find(affinity_key(predictor == AffinityPredictor::joint ? token : 0, mask1, mask2));
    if (found != table.end()) {
      std::copy(found->second.votes.begin(), found->second.votes.end(), votes);
      std::copy(found->second.weights.begin(), found->second.weights.end(), weights);
      return true;
    }
  }
  std::fill(votes, votes + ranks_, 0.0f);
  std::fill(weights, weights + ranks_, 0.0f);
  const bool known = token >= 0 && token < vocab_;  // an id beyond the tables: the layer's mean
  const float* c = known ? layer.confidence.data() + static_cast<size_t>(token) * static_cast<size_t>(experts_)
                         : layer.mean_confidence.data();
  const float* w = known ? layer.weight_confidence.data() + static_cast<size_t>(token) * static_cast<size_t>(experts_)
                         : layer.mean_weight_confidence.data();
  for (int e = 0; e < experts_; ++e) {
    const int r = layer.rank_of_expert[static_cast<size_t>(e)];
    votes[r] += c[e];
    weights[r] += w[e];
  }
  return false;
}

std::vector<ExpertPlacement> AffinityTables::placements() const {
  std::vector<ExpertPlacement> out;
  const int per_rank = experts_ / ranks_;
  for (size_t l = 0; l < layers_.size(); ++l) {
    std::vector<int> next_slot(static_cast<size_t>(ranks_), 0), position(static_cast<size_t>(experts_));
    for (int e = 0; e < experts_; ++e) {
      const int r = layers_[l].rank_of_expert[static_cast<size_t>(e)];
      if (experts_ % ranks_ != 0 || next_slot[static_cast<size_t>(r)] == per_rank)
        SY_THROW(InvalidArgument, "affinity tables: layer ", l, " puts more than ", per_rank, " experts on rank ", r,
                 "; a placement needs E / W = ", experts_, " / ", ranks_, " experts on every rank");
      position[static_cast<size_t>(e)] = r * per_rank + next_slot[static_cast<size_t>(r)]++;
    }
    out.push_back(ExpertPlacement::from_positions(ranks_, position));
  }
  return out;
}

void AffinityTables::save(const std::string& path) const {
  const int64_t V = vocab_, E = experts_, W = ranks_;
  // Owned storage for the views (sorted keys: the same tables give the same file).
  std::vector<std::vector<int64_t>> keys;
  std::vector<std::vector<float>> values;
  std::vector<std::pair<std::string, TensorView>> tensors;
  auto f32 = [](const std::vector<float>& v, Shape s) {
    return TensorView(const_cast<float*>(v.data()), DType::f32, std::move(s));
  };
  auto i32 = [](const std::vector<int>& v, Shape s) { return TensorView(const_cast<int*>(v.data()), DType::i32, std::move(s)); };
  keys.reserve(2 * layers_.size());
  values.reserve(4 * layers_.size());
  tensors.emplace_back("token_frequency", f32(token_frequency_, {V}));
  tensors.emplace_back("borrowed_from", i32(borrowed_from_, {V}));
  for (size_t l = 0; l < layers_.size(); ++l) {
    const AffinityLayer& layer = layers_[l];
    const std::string p = "layer" + std::to_string(l) + ".";
    tensors.emplace_back(p + "rank_of_expert", i32(layer.rank_of_expert, {E}));
    tensors.emplace_back(p + "confidence", f32(layer.confidence, {V, E}));
    tensors.emplace_back(p + "weight_confidence", f32(layer.weight_confidence, {V, E}));
    tensors.emplace_back(p + "mean_confidence", f32(layer.mean_confidence, {E}));
    tensors.emplace_back(p + "mean_weight_confidence", f32(layer.mean_weight_confidence, {E}));
    for (const auto& [name, table] : {std::pair{"joint", &layer.joint}, std::pair{"sequence", &layer.sequence}}) {
      std::vector<int64_t>& k = keys.emplace_back();
      for (const auto& [key, v] : *table) k.push_back(static_cast<int64_t>(key));
      std::sort(k.begin(), k.end());
      std::vector<float>& votes = values.emplace_back();
      std::vector<float>& weights = values.emplace_back();
      for (int64_t key : k) {
        const RankVotes& v = table->at(static_cast<uint64_t>(key));
        votes.insert(votes.end(), v.votes.begin(), v.votes.end());
        weights.insert(weights.end(), v.weights.begin(), v.weights.end());
      }
      const int64_t K = static_cast<int64_t>(k.size());
      tensors.emplace_back(p + name + ".keys", TensorView(k.data(), DType::i64, {K}));
      tensors.emplace_back(p + name + ".votes", f32(votes, {K, W}));
      tensors.emplace_back(p + name + ".weights", f32(weights, {K, W}));
    }
  }
  save_safetensors(path, tensors,
                   {{"format", kFormat},
                    {"ranks", std::to_string(ranks_)},
                    {"layers", std::to_string(layers_.size())},
                    {"experts", std::to_string(experts_)},
                    {"k", std::to_string(k_)},
                    {"vocab", std::to_string(vocab_)},
                    {"lookback", std::to_string(lookback_)},
                    {"built_tokens", std::to_string(built_tokens_)}});
}

AffinityTables AffinityTables::load(const std::string& path) {
  const SafetensorsFile f = SafetensorsFile::open(path);
  const auto fmt = f.metadata().find("format");
  if (fmt == f.metadata().end() || fmt->second != kFormat)
    SY_THROW(InvalidArgument, "affinity tables ", path, ": format '", fmt == f.metadata().end() ? "" : fmt->second,
             "', expected ", kFormat, " (written by switchyard affinity build)");
  AffinityTables t;
  t.ranks_ = metadata_int(f, "ranks", 1, RoutingTrace::kMaxExperts);
  const int L = metadata_int(f, "layers", 1, 1 << 16);
  t.experts_ = metadata_int(f, "experts", t.ranks_, RoutingTrace::kMaxExperts);
  t.k_ = metadata_int(f, "k", 1, 64);
  t.vocab_ = metadata_int(f, "vocab", 1, RoutingTrace::kMaxVocab);
  t.lookback_ = metadata_int(f, "lookback", 0, 2);
  if (t.lookback_ > 0 && t.ranks_ > kAffinityMaxMaskRanks)
    SY_THROW(InvalidArgument, "affinity tables ", path, ": ranks = ", t.ranks_, " with lookback ", t.lookback_,
             ", expected at most ", kAffinityMaxMaskRanks, " ranks (look-back keys hold a rank set in ",
             kAffinityMaxMaskRanks, " bits)");
  if (static_cast<int64_t>(t.vocab_) * t.experts_ * L > RoutingTrace::kMaxTableEntries)
    SY_THROW(InvalidArgument, "affinity tables ", path, ": vocab ", t.vocab_, " x ", t.experts_, " experts x ", L,
             " layers, expected at most ", RoutingTrace::kMaxTableEntries, " entries in all");
  {
    const auto it = f.metadata().find("built_tokens");
    int64_t v = -1;
    const std::string text = it == f.metadata().end() ? "" : it->second;
    const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
    if (ec != std::errc() || end != text.data() + text.size() || v < 0)
      SY_THROW(InvalidArgument, "affinity tables ", path, ": metadata built_tokens = '", text.substr(0, 40),
               "', expected an integer >= 0");
    t.built_tokens_ = v;
  }
  const int64_t V = t.vocab_, E = t.experts_, W = t.ranks_;
  // Arrays follow the tensors in the file (their shapes are checked), so a small file cannot claim gigabytes.
  auto f32 = [&](const std::string& name, const Shape& shape) {
    const Tensor x = f.load(name, shape, DType::f32);
    std::vector<float> v(x.data_as<float>(), x.data_as<float>() + x.numel());
    for (size_t i = 0; i < v.size(); ++i)
      if (!std::isfinite(v[i]) || v[i] < 0)
        SY_THROW(InvalidArgument, "affinity tables ", path, ": ", name, "[", i, "] = ", v[i], ", expected finite and >= 0");
    return v;
  };
  auto i32 = [&](const std::string& name, const Shape& shape, int lo, int hi) {
    const Tensor x = f.load(name, shape, DType::i32);
    std::vector<int> v(x.data_as<int32_t>(), x.data_as<int32_t>() + x.numel());
    for (size_t i = 0; i < v.size(); ++i)
      if (v[i] < lo || v[i] > hi)
        SY_THROW(InvalidArgument, "affinity tables ", path, ": ", name, "[", i, "] = ", v[i], ", expected ", lo, "..", hi);
    return v;
  };
  t.token_frequency_ = f32("token_frequency", {V});
  t.borrowed_from_ = i32("borrowed_from", {V}, -1, t.vocab_ - 1);
  for (int l = 0; l < L; ++l) {
    const std::string p = "layer" + std::to_string(l) + ".";
    AffinityLayer& layer = t.layers_.emplace_back();
    layer.rank_of_expert = i32(p + "rank_of_expert", {E}, 0, t.ranks_ - 1);
    layer.confidence = f32(p + "confidence", {V, E});
    layer.weight_confidence = f32(p + "weight_confidence", {V, E});
    layer.mean_confidence = f32(p + "mean_confidence", {E});
    layer.mean_weight_confidence = f32(p + "mean_weight_confidence", {E});
    for (const auto& [name, table] : {std::pair{"joint", &layer.joint}, std::pair{"sequence", &layer.sequence}}) {
      const std::string base = p + name;
      const Tensor keys = f.load(base + ".keys");
      if (keys.dtype() != DType::i64 || keys.shape().size() != 1)
        SY_THROW(InvalidArgument, "affinity tables ", path, ": ", base, ".keys is ", dtype_name(keys.dtype()), " ",
                 shape_string(keys.shape()), ", expected i64 [K]");
      const int64_t K = keys.shape()[0];
      const std::vector<float> votes = f32(base + ".votes", {K, W}), weights = f32(base + ".weights", {K, W});
      for (int64_t i = 0; i < K; ++i) {
        RankVotes& v = (*table)[static_cast<uint64_t>(keys.data_as<int64_t>()[i])];
        v.votes.assign(votes.begin() + i * W, votes.begin() + (i + 1) * W);
        v.weights.assign(weights.begin() + i * W, weights.begin() + (i + 1) * W);
      }
      if (static_cast<int64_t>(table->size()) != K)
        SY_THROW(InvalidArgument, "affinity tables ", path, ": ", base, ".keys repeats a key");
    }
  }
  if (f.contains("layer" + std::to_string(L) + ".confidence"))
    SY_THROW(InvalidArgument, "affinity tables ", path, ": metadata layers = ", L, " but the file holds layer", L);
  return t;
}

std::vector<int64_t> equal_chunks(int64_t rows, int ranks) {
  std::vector<int64_t> chunks(static_cast<size_t>(ranks), rows / ranks);
  for (int64_t w = 0; w < rows % ranks; ++w) ++chunks[static_cast<size_t>(w)];
  return chunks;
}

std::vector<int> assign_to_chunks(const std::vector<float>& votes, const std::vector<float>& weights, int64_t rows,
                                  int ranks, const std::vector<int64_t>& chunks) {
  const size_t W = static_cast<size_t>(ranks);
  SY_CHECK(votes.size() == static_cast<size_t>(rows) * W && weights.size() == votes.size() && chunks.size() == W);
  SY_CHECK(std::accumulate(chunks.begin(), chunks.end(), int64_t{0}) >= rows);
  std::vector<int> preference(static_cast<size_t>(rows) * W);
  std::vector<std::pair<float, float>> confidence(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    const float* v = &votes[static_cast<size_t>(r) * W];
    const float* w = &weights[static_cast<size_t>(r) * W];
    int* order = &preference[static_cast<size_t>(r) * W];
    // Insertion sort (stable, no allocation: W is small and this runs per row of every batch).
    for (int i = 0; i < static_cast<int>(W); ++i) {
      int j = i;
      while (j > 0 && (v[order[j - 1]] != v[i] ? v[order[j - 1]] < v[i] : w[order[j - 1]] < w[i])) order[j] = order[j - 1], --j;
      order[j] = i;
    }
    const float vs = std::accumulate(v, v + W, 0.0f), ws = std::accumulate(w, w + W, 0.0f);
    confidence[static_cast<size_t>(r)] = {vs > 0 ? v[order[0]] / vs : 0.0f, ws > 0 ? w[order[0]] / ws : 0.0f};
  }
  // Most confident first, ties to the lower row: one packed key per row (the
  // shares are >= 0, so their bits order as the floats do), sorted in place.
  std::vector<std::pair<uint64_t, int64_t>> by_confidence(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    // + 0.0f turns a -0 share into +0 (its sign bit would sort it first).
    const float vote_share = confidence[static_cast<size_t>(r)].first + 0.0f;
    const float weight_share = confidence[static_cast<size_t>(r)].second + 0.0f;
    const uint64_t key = static_cast<uint64_t>(std::bit_cast<uint32_t>(vote_share)) << 32 | std::bit_cast<uint32_t>(weight_share);
    by_confidence[static_cast<size_t>(r)] = {~key, r};
  }
  std::sort(by_confidence.begin(), by_confidence.end());
  std::vector<int64_t> room = chunks;
  std::vector<int> rank(static_cast<size_t>(rows), -1);
  for (const auto& [key, r] : by_confidence) {
    const int* order = &preference[static_cast<size_t>(r) * W];
    for (size_t i = 0; i < W; ++i) {
      if (room[static_cast<size_t>(order[i])] == 0) continue;
      rank[static_cast<size_t>(r)] = order[i];
      --room[static_cast<size_t>(order[i])];
      break;
    }
  }
  return rank;
}

std::vector<int> predict_members(const AffinityTables& tables, int layer, const std::vector<int32_t>& tokens,
                                 const std::vector<uint32_t>& mask1, const std::vector<uint32_t>& mask2,
                                 AffinityPredictor predictor, int first, int members, int64_t per, int64_t* keyed) {
  const int W = tables.ranks();
  SY_CHECK(first >= 0 && members >= 1 && first + members <= W && mask1.size() == tokens.size() &&
           mask2.size() == tokens.size());
  const int64_t rows = static_cast<int64_t>(tokens.size());
  std::vector<float> votes(static_cast<size_t>(W)), weights(static_cast<size_t>(W));
  std::vector<float> member_votes(static_cast<size_t>(rows * members)), member_weights(member_votes.size());
  for (int64_t r = 0; r < rows; ++r) {
    const size_t i = static_cast<size_t>(r);
    const bool key = tables.rank_scores(layer, tokens[i], mask1[i], mask2[i], predictor, votes.data(), weights.data());
    if (keyed) *keyed += key;
    std::copy_n(votes.begin() + first, members, member_votes.begin() + r * members);
    std::copy_n(weights.begin() + first, members, member_weights.begin() + r * members);
  }
  return assign_to_chunks(member_votes, member_weights, rows, members, std::vector<int64_t>(static_cast<size_t>(members), per));
}

namespace {
double thread_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}
}  // namespace

ShuffleCost measure_shuffle_cost(const AffinityTables& tables, AffinityPredictor predictor, int members) {
  const int W = tables.ranks(), layer = std::min(1, tables.layers() - 1), vocab = std::max(1, tables.vocab());
  members = std::clamp(members, 1, W);
  auto seconds = [&](int64_t rows) {
    std::vector<int32_t> tokens(static_cast<size_t>(rows));
    std::vector<uint32_t> m1(tokens.size()), m2(tokens.size());
    for (int64_t r = 0; r < rows; ++r) {
      tokens[static_cast<size_t>(r)] = static_cast<int32_t>(r * 37 % vocab);
      m1[static_cast<size_t>(r)] = (1u << (r % W)) | (1u << (r * 7 % W));
      m2[static_cast<size_t>(r)] = (1u << (r * 3 % W)) | (1u << (r * 5 % W));
    }
    const int64_t per = (rows + members - 1) / members;
    std::vector<double> t;
    for (int rep = 0; rep < 3; ++rep) {
      const double start = thread_cpu_seconds();
      predict_members(tables, layer, tokens, m1, m2, predictor, 0, members, per);
      t.push_back(thread_cpu_seconds() - start);
    }
    std::sort(t.begin(), t.end());
    return t[1];
  };
  constexpr int64_t small = 16, large = 1024;
  const double t_small = seconds(small), t_large = seconds(large);
  ShuffleCost c;
  c.per_row = std::max(0.0, (t_large - t_small) / static_cast<double>(large - small));
  c.per_batch = std::max(0.0, t_small - c.per_row * small);
  return c;
}

std::vector<int> batch_ranks(const RoutingTrace& trace, const AffinityTables& tables, const ShuffleOptions& options,
                             int64_t b0, int64_t rows, int layer, int64_t* keyed) {
  const int W = tables.ranks();
  const std::vector<int64_t> chunks = equal_chunks(rows, W);
  if (!options.shuffle) {
    std::vector<int> rank(static_cast<size_t>(rows), 0);
    int64_t r = 0;
    for (int w = 0; w < W; ++w)
      for (int64_t i = 0; i < chunks[static_cast<size_t>(w)]; ++i) rank[static_cast<size_t>(r++)] = w;
    return rank;
  }
  std::vector<float> votes(static_cast<size_t>(rows) * static_cast<size_t>(W), 0.0f), weights(votes.size(), 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const auto [m1, m2] = lookback_masks(trace, [&](int j) -> const std::vector<int>& { return tables.layer(j).rank_of_expert; },
                                         layer, b0 + r, tables.lookback());
    const bool from_lookback = tables.rank_scores(layer, trace.tokens[static_cast<size_t>(b0 + r)], m1, m2, options.predictor,
                                                  &votes[static_cast<size_t>(r) * W], &weights[static_cast<size_t>(r) * W]);
    if (keyed) *keyed += from_lookback;  // only layers >= 1 have a look-back key
  }
  return assign_to_chunks(votes, weights, rows, W, chunks);
}

LocalActivation score_local_activation(const RoutingTrace& trace, const AffinityTables& tables, const ShuffleOptions& options) {
  const int L = trace.layers, k = trace.k, W = tables.ranks();
  if (L != tables.layers() || trace.experts != tables.experts() || k != tables.k())
    SY_THROW(InvalidArgument, "trace ", trace.path, " (", L, " layers, ", trace.experts, " experts, top-", k,
             ") does not match the affinity tables (", tables.layers(), " layers, ", tables.experts(), " experts, top-",
             tables.k(), ")");
  if (options.batch_tokens < 1) SY_THROW(InvalidArgument, "batch_tokens = ", options.batch_tokens, ", expected >= 1");
  LocalActivation out;
  out.per_layer.assign(static_cast<size_t>(L), 0.0);
  out.rows_to_peer.assign(static_cast<size_t>(W) * static_cast<size_t>(W), 0);
  std::vector<int64_t> layer_pairs(static_cast<size_t>(L), 0), layer_local(static_cast<size_t>(L), 0);
  std::vector<std::vector<double>> expert_load(static_cast<size_t>(L), std::vector<double>(static_cast<size_t>(trace.experts), 0.0));
  std::vector<std::vector<double>> rank_load(static_cast<size_t>(L), std::vector<double>(static_cast<size_t>(W), 0.0));
  int64_t predicted = 0, shuffled = 0;
  std::vector<int> rank;
  std::vector<char> remote_seen;
  for (int64_t b0 = 0; b0 < trace.size(); b0 += options.batch_tokens) {
    const int64_t T = std::min(options.batch_tokens, trace.size() - b0);
    for (int l = 0; l < L; ++l) {
      const std::vector<int>& rank_of_expert = tables.layer(l).rank_of_expert;
      int64_t keyed = 0;
      rank = batch_ranks(trace, tables, options, b0, T, l, &keyed);
      if (options.shuffle && l >= 1) predicted += keyed, shuffled += T;
      for (int64_t r = 0; r < T; ++r) {
        const int home = rank[static_cast<size_t>(r)];
        remote_seen.assign(static_cast<size_t>(W), 0);
        for (int j = 0; j < k; ++j) {
          const int e = trace.expert(l, b0 + r, j);
          const int dest = rank_of_expert[static_cast<size_t>(e)];
          expert_load[static_cast<size_t>(l)][static_cast<size_t>(e)] += 1;
          rank_load[static_cast<size_t>(l)][static_cast<size_t>(dest)] += 1;
          ++layer_pairs[static_cast<size_t>(l)];
          if (dest == home) {
            ++layer_local[static_cast<size_t>(l)];
          } else {
            ++out.remote_rows;
            ++out.rows_to_peer[static_cast<size_t>(home) * static_cast<size_t>(W) + static_cast<size_t>(dest)];
            out.remote_rows_once += !remote_seen[static_cast<size_t>(dest)];
            remote_seen[static_cast<size_t>(dest)] = 1;
          }
        }
      }
    }
  }
  for (int l = 0; l < L; ++l) {
    out.pairs += layer_pairs[static_cast<size_t>(l)];
    out.local += layer_local[static_cast<size_t>(l)];
    out.per_layer[static_cast<size_t>(l)] =
        layer_pairs[static_cast<size_t>(l)] ? static_cast<double>(layer_local[static_cast<size_t>(l)]) / layer_pairs[static_cast<size_t>(l)] : 0;
    out.expert_load_max_over_median = std::max(out.expert_load_max_over_median, max_over_median(expert_load[static_cast<size_t>(l)]));
    out.rank_load_max_over_median = std::max(out.rank_load_max_over_median, max_over_median(rank_load[static_cast<size_t>(l)]));
  }
  out.predicted_share = shuffled ? static_cast<double>(predicted) / static_cast<double>(shuffled) : 0.0;
  return out;
}

}  // namespace switchyard
