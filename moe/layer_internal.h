// Pieces the MoE layer's files share (not part of the public API).
#pragma once

#include <chrono>
#include <cstdint>

#include "comm/virtual_time.h"
#include "moe/moe_layer.h"

namespace switchyard::moe_detail {

// Adds the wall and virtual (emulated) time from construction to destruction
// to a phase's counters.
class PhaseTimer {
 public:
  PhaseTimer(MoEPhaseTimes& wall, MoEPhaseTimes& virt, double MoEPhaseTimes::*phase)
      : wall_(wall.*phase), virtual_(virt.*phase), start_(Clock::now()), virtual_start_(virtual_time::now()) {}
  PhaseTimer(const PhaseTimer&) = delete;
  PhaseTimer& operator=(const PhaseTimer&) = delete;
  ~PhaseTimer() {
    wall_ += std::chrono::duration<double>(Clock::now() - start_).count();
    virtual_ += virtual_time::now() - virtual_start_;
  }

 private:
  double& wall_;
  double& virtual_;
  Clock::time_point start_;
  double virtual_start_;
};

// Hidden piece `piece` of `pieces` of a row block of a weight whose columns are
// the hidden units (w1, b1): `hidden` units, or gate|up halves of `hidden`
// each for gated activations. to_part: full -> part, else part -> full.
// Through `ops`, or on the host.
void copy_hidden_piece(MoEOps& ops, bool gated, int64_t rows, int64_t hidden, int piece, int pieces, float* full,
                       float* part, bool to_part);
void copy_hidden_piece(bool gated, int64_t rows, int64_t hidden, int piece, int pieces, float* full, float* part,
                       bool to_part);

}  // namespace switchyard::moe_detail
