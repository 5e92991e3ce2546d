// ExecPlan: how one batch runs on the unified layout. Every field may change
// from one batch to the next and none changes the result (to fp rounding);
// what does change the math (capacity factor, top-k) is the user's Routing.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace switchyard {

enum class ExchangeMode : uint8_t {
  padded,    // Tutel: every expert gets C rows from every rank ([E, C, M]), padding included
  dropless,  // DeepEP: all-to-all-v of only the routed rows; counts exchanged first
};

enum class A2AAlgorithm : uint8_t {
  flat,          // the backend's all-to-all over the expert group
  hierarchical,  // 2DH: inside each node, re-layout, then across nodes
};

struct ExecPlan {
  // Sharding degree (Tutel's adaptive r): 0 = data parallel (all experts
  // gathered on every rank, no all-to-all); 1 = expert parallel; 1 < r <= S =
  // expert + tensor parallel (tokens repeated to r ranks that each hold 1/r of
  // the expert's hidden dimension). Valid: 0 and the divisors of S.
  int r = 1;
  // Pipelining degree: the rows split into d chunks so a chunk's all-to-all
  // overlaps the previous chunk's expert compute.
  int d = 1;
  A2AAlgorithm a2a = A2AAlgorithm::flat;
  ExchangeMode exchange = ExchangeMode::padded;
  // Speculative token shuffling (Sem-MoE): the caller moved each row to the
  // rank its tokens' experts probably sit on before the layer (the inference
  // engine does, inside tensor-parallel attention's reduce-scatter), so fewer
  // rows leave their rank. The layer itself runs the same either way; the
  // planner prices the traffic each choice leaves and the shuffle's host work.
  bool shuffle = false;

  // "r = 1, o = 2, a2a = flat, x = padded" (o: Tutel's name for d), then
  // ", shuffled" when shuffle is set.
  std::string describe() const;
  // Equal on every rank that holds an equal plan (checked across ranks in debug mode).
  uint64_t hash() const;
  bool operator==(const ExecPlan&) const = default;
};

// The r a layout with S ranks per expert allows: 0 and the divisors of S.
std::vector<int> valid_sharding_degrees(int shards);

const char* to_string(ExchangeMode mode);
const char* to_string(A2AAlgorithm algorithm);
// Parse "padded" / "dropless" and "flat" / "2dh" (alias "hierarchical"); errors name `field`.
ExchangeMode parse_exchange_mode(const std::string& text, const std::string& field);
A2AAlgorithm parse_a2a_algorithm(const std::string& text, const std::string& field);

}  // namespace switchyard
