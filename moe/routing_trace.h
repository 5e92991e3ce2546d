// Routing traces: which experts each token chose, per MoE layer
// (format "switchyard-routing-trace-v1", examples/tiny_lm/README.md). A
// safetensors file with "tokens" [N] i32, "positions" [N] i32, optionally
// "sequences" [N] i32 (the document each token came from, ascending), and
// per MoE layer i "layer<i>.experts" [N, k] i32 (logical experts, best
// first) and "layer<i>.weights" [N, k] f32 (their gate weights); metadata
// "format", "model", "layers", "k", "experts".
//
// Written by examples/tiny_lm/trace.py and by `switchyard trace record`
// (the C++ model on held-out text); read by `trace stats` and by the
// affinity tables of speculative MoE (moe/affinity.h).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/safetensors.h"

namespace switchyard {

struct RoutingTrace {
  std::string path, model;
  int layers = 0, k = 0, experts = 0;
  std::vector<int32_t> tokens, positions;
  // The document of each token, ascending: the file's "sequences", or when
  // it has none, a new one wherever the position does not grow (windows).
  std::vector<int32_t> sequences;
  bool has_documents = false;  // the file held "sequences" (else they are windows)
  std::vector<std::vector<int32_t>> choices;    // [layer][token * k + j]
  std::vector<std::vector<float>> weights;      // [layer][token * k + j]; empty layers: none recorded

  int64_t size() const { return static_cast<int64_t>(tokens.size()); }
  int32_t expert(int layer, int64_t token, int j) const {
    return choices[static_cast<size_t>(layer)][static_cast<size_t>(token * k + j)];
  }
  float weight(int layer, int64_t token, int j) const {
    const auto& w = weights[static_cast<size_t>(layer)];
    return w.empty() ? 0.0f : w[static_cast<size_t>(token * k + j)];
  }

  // Reads and checks a trace: errors name the file, the tensor and what was
  // expected; arrays are sized from the data, never from metadata claims.
  static RoutingTrace load(const std::string& path);
  static RoutingTrace load(const SafetensorsFile& file);
  void save(const std::string& path, const std::map<std::string, std::string>& extra_metadata = {}) const;
  // The tokens of the sequences `keep(sequence)` selects, in order (every
  // field sliced alike).
  template <class Keep>
  RoutingTrace select_sequences(Keep keep) const;

  // Largest ids accepted (a small file must not claim gigabytes of tables).
  static constexpr int32_t kMaxVocab = 1 << 20;
  static constexpr int kMaxExperts = 1 << 16;
  // Dense per-token tables hold (largest id + 1) x experts x layers values: bounded in all.
  static constexpr int64_t kMaxTableEntries = int64_t{1} << 26;
};

template <class Keep>
RoutingTrace RoutingTrace::select_sequences(Keep keep) const {
  RoutingTrace out;
  out.path = path, out.model = model, out.layers = layers, out.k = k, out.experts = experts;
  out.choices.resize(static_cast<size_t>(layers));
  out.weights.resize(static_cast<size_t>(layers));
  for (int64_t i = 0; i < size(); ++i) {
    if (!keep(sequences[static_cast<size_t>(i)])) continue;
    out.tokens.push_back(tokens[static_cast<size_t>(i)]);
    out.positions.push_back(positions[static_cast<size_t>(i)]);
    out.sequences.push_back(sequences[static_cast<size_t>(i)]);
    for (int l = 0; l < layers; ++l) {
      const auto& c = choices[static_cast<size_t>(l)];
      const auto& w = weights[static_cast<size_t>(l)];
      for (int j = 0; j < k; ++j) {
        out.choices[static_cast<size_t>(l)].push_back(c[static_cast<size_t>(i * k + j)]);
        if (!w.empty()) out.weights[static_cast<size_t>(l)].push_back(w[static_cast<size_t>(i * k + j)]);
      }
    }
  }
  return out;
}

}  // namespace switchyard
