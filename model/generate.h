// Generation on the Model: a batch of prompts of different lengths is
// prefilled in one forward, then every sequence decodes one token per step.
// Greedy (temperature 0) or sampled with temperature, top-k and top-p from a
// seeded generator; every rank of the expert group makes the same choices.
#pragma once

#include <functional>
#include <vector>

#include "core/rng.h"
#include "model/model.h"

namespace switchyard {

struct SamplingOptions {
  double temperature = 0.0;  // 0: greedy (ties: the lower token)
  int top_k = 0;             // 0: all tokens
  double top_p = 1.0;        // nucleus: the smallest set of likeliest tokens whose probability reaches top_p
  uint64_t seed = 0;
  void validate() const;     // InvalidArgument naming the field
};

// A token and the distribution it was drawn from, after temperature, top-k
// and top-p (speculative sampling compares the draft's and the base's):
// probs[v] over the vocabulary, zero outside the kept set; greedy: one-hot.
struct Sampled {
  int token = 0;
  std::vector<float> probs;
};
Sampled sample(const float* logits, int vocab, const SamplingOptions& options, Rng& rng);
// The token alone (the same draw as sample()).
int sample_token(const float* logits, int vocab, const SamplingOptions& options, Rng& rng);

struct GenerationStats {
  int64_t prefill_tokens = 0, decode_tokens = 0;
  double prefill_seconds = 0, decode_seconds = 0;
};

// The new tokens of each sequence (max_new_tokens each). on_token(sequence,
// token) is called as each one is chosen (streaming).
std::vector<std::vector<int>> generate(Model& model, const std::vector<std::vector<int>>& prompts, int max_new_tokens,
                                       const SamplingOptions& options, GenerationStats* stats = nullptr,
                                       const std::function<void(size_t, int)>& on_token = {});

}  // namespace switchyard
