#include "model/engine.h"

#include "core/error.h"

namespace switchyard {

InferenceEngine::InferenceEngine(Model& model, LayerSchedule schedule)
    : model_(model), schedule_(std::move(schedule)), rank_(model.expert_group()->rank()) {
  if (schedule_.world() != model.expert_group()->size())
    SY_THROW(InvalidArgument, "inference engine: the schedule is for ", schedule_.world(), " rank(s), the model's "
             "expert group has ", model.expert_group()->size());
  if (schedule_.layer_count() != model.config().layers)
    SY_THROW(InvalidArgument, "inference engine: the schedule has ", schedule_.layer_count(), " layers, model '",
             model.config().name, "' has ", model.config().layers);
}

void InferenceEngine::verify_replicas(const std::vector<Chunk>& chunks) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a over (chunk length, tokens, cache length)
  auto mix = [&](uint64_t v) { h = (h ^ v) * 1099511628211ull; };
  for (const Chunk& c : chunks) {
    mix(c.tokens.size());
    mix(c.cache ? static_cast<uint64_t>(c.cache->length()) : ~0ull);
    for (int t : c.tokens) mix(static_cast<uint64_t>(t));
  }
  if (!same_on_every_rank(world(), h))
    SY_THROW(InvalidArgument, "inference engine: replicated attention, but the ranks' chunks differ this step (every "
             "rank must pass the same sequences and tokens)");
}

Tensor InferenceEngine::step(const std::vector<Chunk>& chunks) {
  if (check_replicas_ && schedule_.attention() == AttentionMode::replicated && schedule_.world() > 1)
    verify_replicas(chunks);
  // replicated and dp run every layer's attention on this rank's own rows and
  // the FFN's experts over every rank: the model's own layer order. Schedules
  // that place layers elsewhere (tp, parallel layer groups, AFD) walk the
  // blocks here instead.
  return model_.forward(chunks);
}

}  // namespace switchyard
