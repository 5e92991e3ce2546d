// Speculative decoding on the inference engine: a small draft model proposes
// gamma tokens per round, the base model verifies them in one chunk of
// gamma + 1 positions, and every sequence keeps its own accepted count.
//
// Greedy (temperature 0): the longest prefix of the proposals that equals
// the base's argmax, then the base's own token (a correction, or the bonus
// token when all gamma were accepted). Because the base's logits for a
// position are bit-identical in a verification chunk and in a one-token
// decode step (model/model.h), the output is exactly plain greedy decoding.
//
// Sampling: proposal d_i drawn from the draft's distribution q_i is accepted
// with probability min(1, p_i(d_i) / q_i(d_i)); the first rejected position
// draws from norm(max(0, p_i - q_i)); when all are accepted the bonus token
// is drawn from p_{gamma+1}. p and q are the distributions after the
// request's temperature, top-k and top-p (generate.h's sample()), so each
// token follows the base's filtered distribution exactly (lossless).
//
// Both KV caches are cropped to the committed tokens after each round; the
// draft feeds the committed tokens it has not seen at the next round's start.
// Collective like InferenceEngine::step: every rank runs the same number of
// rounds (one small all-reduce per round agrees whether any sequence is still
// decoding), with its own token group's sequences, possibly none.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model/engine.h"
#include "model/generate.h"

namespace switchyard {

// EasySpec's bonus calibration: after verification the draft's KV is cropped
// to its last exact position and one exact pass (InferenceEngine::step_exact)
// runs over the committed tokens since, accepted ones and the base's token;
// its last logits give the next round's first proposal, so a round still
// takes gamma draft forwards. Needed after fuzzy (layer-parallel) drafting,
// whose KV is inexact; harmless for an exact draft.
enum class Calibration { every, mismatch, never };  // mismatch: only after a round that rejected a proposal
const char* calibration_name(Calibration c);
Calibration parse_calibration(const std::string& name, const std::string& field);  // ConfigError naming field

struct SpeculativeOptions {
  int gamma = 4;  // tokens the draft proposes per round (>= 1); with adaptive_gamma the most
  SamplingOptions sampling;
  Calibration calibration = Calibration::every;
  // Per sequence and round: gamma = clamp(round(a / (1 - a)) + 1, 1, gamma),
  // a the sequence's acceptance so far (smoothed, starting at 0.5), the
  // expected run of accepted proposals plus one: a draft that agrees often
  // proposes more, one that rarely does stops wasting draft steps.
  bool adaptive_gamma = false;
  void validate() const;  // InvalidArgument naming the field
};

struct SpeculativeStats {
  int64_t rounds = 0;           // verification forwards of the base
  int64_t proposed = 0;         // draft tokens proposed (this rank's sequences)
  int64_t accepted = 0;         // of them, accepted
  int64_t generated = 0;        // tokens committed (accepted + corrections / bonus tokens)
  int64_t draft_forwards = 0;   // draft steps run (collective), calibration passes included
  int64_t calibrations = 0;     // this rank's sequences' calibration passes
  double draft_seconds = 0, verify_seconds = 0, calibration_seconds = 0, total_seconds = 0;
  SpeculativeStats& operator+=(const SpeculativeStats& o) {
    rounds += o.rounds, proposed += o.proposed, accepted += o.accepted, generated += o.generated;
    draft_forwards += o.draft_forwards, calibrations += o.calibrations, sequence_rounds += o.sequence_rounds;
    draft_seconds += o.draft_seconds, verify_seconds += o.verify_seconds;
    calibration_seconds += o.calibration_seconds, total_seconds += o.total_seconds;
    return *this;
  }
  double acceptance() const { return proposed > 0 ? static_cast<double>(accepted) / static_cast<double>(proposed) : 0; }
  // Committed tokens per sequence-round (1 + accepted on average).
  int64_t sequence_rounds = 0;
  double tokens_per_round() const {
    return sequence_rounds > 0 ? static_cast<double>(generated) / static_cast<double>(sequence_rounds) : 0;
  }
};

// The new tokens of each of this rank's prompts (max_new_tokens each; every
// prompt at least one token). `base` and `draft` run over the same ranks with
// the same token groups (the caller passes its own group's prompts to both),
// and the draft's vocabulary is the base's. Each prompt samples from its own
// generator (sampling.seed + its index), so its tokens do not depend on the
// batch.
std::vector<std::vector<int>> speculative_generate(InferenceEngine& base, InferenceEngine& draft,
                                                   const std::vector<std::vector<int>>& prompts, int max_new_tokens,
                                                   const SpeculativeOptions& options, SpeculativeStats* stats = nullptr);

}  // namespace switchyard
