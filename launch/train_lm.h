// The moe-lm-train job: the byte-level MoE language model (model/lm_train.h)
// trained by `switchyard run` on the fortunes corpus, the plan chosen per
// batch, held-out loss against the unigram baseline, checkpoints and resume.
#pragma once

#include "launch/config.h"
#include "parallel/runtime.h"

namespace switchyard {

// One rank's part of the job (every rank of the runtime calls it).
void train_lm(Runtime& rt, const JobConfig& job);

}  // namespace switchyard
