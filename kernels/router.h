// Router kernels: per token, choose k experts from the gate logits and weight
// them. Raw pointers and sizes, row-major [tokens, experts]; fp32 in and out.
// Ties go to the lower expert index, so every rank picks the same experts.
#pragma once

#include <cstdint>

namespace switchyard::kernels {

enum class GateScore : uint8_t {
  softmax,        // GShard/Tutel: probabilities = softmax(logits)
  sigmoid_bias,   // DeepSeek-V3: scores = sigmoid(logits); selection by scores + bias
};

struct TopKGateArgs {
  const float* logits = nullptr;  // [tokens, experts]
  const float* bias = nullptr;    // [experts], added for selection only (sigmoid_bias); may be null
  int64_t tokens = 0;
  int experts = 0;
  int k = 1;
  GateScore score = GateScore::softmax;
  bool renormalize = false;  // divide the k weights by their sum
  // Grouped top-k: experts in `groups` equal consecutive groups; only experts in
  // the `topk_groups` groups with the highest group score (the sum of the group's
  // two best selection scores) may be chosen. groups = 1: plain top-k.
  int groups = 1;
  int topk_groups = 1;
  int32_t* experts_out = nullptr;  // [tokens, k], best first
  float* weights_out = nullptr;    // [tokens, k]
  float* scores_out = nullptr;     // [tokens, experts]: softmax probabilities or sigmoid scores; may be null
};

}  // namespace switchyard::kernels

namespace switchyard::kernels::cpu {

void topk_gate(const TopKGateArgs& args);

}  // namespace switchyard::kernels::cpu
