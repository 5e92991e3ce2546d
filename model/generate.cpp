#include "model/generate.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>

#include "core/error.h"

namespace switchyard {

void SamplingOptions::validate() const {
  if (temperature < 0 || !std::isfinite(temperature))
    SY_THROW(InvalidArgument, "sampling: temperature = ", temperature, ", expected >= 0 (0: greedy)");
  if (top_k < 0) SY_THROW(InvalidArgument, "sampling: top_k = ", top_k, ", expected >= 0 (0: all tokens)");
  if (!(top_p > 0 && top_p <= 1)) SY_THROW(InvalidArgument, "sampling: top_p = ", top_p, ", expected in (0, 1]");
}

Sampled sample(const float* logits, int vocab, const SamplingOptions& o, Rng& rng) {
  Sampled out;
  out.probs.assign(static_cast<size_t>(vocab), 0.f);
  if (o.temperature == 0) {
    out.token = static_cast<int>(std::max_element(logits, logits + vocab) - logits);  // first maximum
    out.probs[static_cast<size_t>(out.token)] = 1.f;
    return out;
  }
  // Candidates by probability (ties: the lower token), cut by top-k, then top-p.
  std::vector<int> order(static_cast<size_t>(vocab));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return logits[a] > logits[b]; });
  if (o.top_k > 0 && o.top_k < vocab) order.resize(static_cast<size_t>(o.top_k));
  std::vector<double> p(order.size());
  const double top = logits[order[0]];
  double sum = 0;
  for (size_t i = 0; i < order.size(); ++i) sum += p[i] = std::exp((logits[order[i]] - top) / o.temperature);
  size_t keep = order.size();
  if (o.top_p < 1) {
    double mass = 0;
    for (size_t i = 0; i < order.size(); ++i) {
      mass += p[i] / sum;
      if (mass >= o.top_p) {
        keep = i + 1;
        break;
      }
    }
  }
  const double total = std::accumulate(p.begin(), p.begin() + static_cast<std::ptrdiff_t>(keep), 0.0);
  for (size_t i = 0; i < keep; ++i) out.probs[static_cast<size_t>(order[i])] = static_cast<float>(p[i] / total);
  double u = rng.uniform(0.0, total);
  out.token = order[keep - 1];
  for (size_t i = 0; i < keep; ++i) {
    if (u < p[i]) {
      out.token = order[i];
      break;
    }
    u -= p[i];
  }
  return out;
}

int sample_token(const float* logits, int vocab, const SamplingOptions& o, Rng& rng) {
  return sample(logits, vocab, o, rng).token;
}

std::vector<std::vector<int>> generate(Model& model, const std::vector<std::vector<int>>& prompts, int max_new_tokens,
                                       const SamplingOptions& options, GenerationStats* stats,
                                       const std::function<void(size_t, int)>& on_token) {
  options.validate();
  if (max_new_tokens < 0) SY_THROW(InvalidArgument, "generate: max_new_tokens = ", max_new_tokens, ", expected >= 0");
  const int V = model.config().vocab_size;
  std::vector<KVCache> caches;
  caches.reserve(prompts.size());
  for (const auto& p : prompts) {
    if (p.empty()) SY_THROW(InvalidArgument, "generate: an empty prompt (expected at least one token)");
    const int need = static_cast<int>(p.size()) + max_new_tokens;
    if (need > model.config().max_seq)
      SY_THROW(InvalidArgument, "generate: prompt of ", p.size(), " tokens + ", max_new_tokens, " new ones exceed max_seq = ",
               model.config().max_seq);
    caches.push_back(model.new_cache(need));
  }
  Rng rng(options.seed);
  std::vector<std::vector<int>> out(prompts.size());
  std::vector<Chunk> chunks(prompts.size());
  for (size_t s = 0; s < prompts.size(); ++s) chunks[s] = Chunk{&caches[s], prompts[s]};
  using Clock = std::chrono::steady_clock;
  auto start = Clock::now();
  Tensor logits = model.forward(chunks);
  GenerationStats st;
  st.prefill_seconds = std::chrono::duration<double>(Clock::now() - start).count();
  for (const auto& p : prompts) st.prefill_tokens += static_cast<int64_t>(p.size());
  // The last row of each sequence picks its next token.
  std::vector<int64_t> last(prompts.size());
  int64_t row = -1;
  for (size_t s = 0; s < prompts.size(); ++s) last[s] = row += static_cast<int64_t>(prompts[s].size());
  start = Clock::now();
  for (int step = 0; step < max_new_tokens; ++step) {
    for (size_t s = 0; s < prompts.size(); ++s) {
      const int token = sample_token(logits.data_as<float>() + last[s] * V, V, options, rng);
      out[s].push_back(token);
      chunks[s].tokens = {token};
      if (on_token) on_token(s, token);
    }
    if (step + 1 == max_new_tokens) break;
    logits = model.forward(chunks);
    for (size_t s = 0; s < prompts.size(); ++s) last[s] = static_cast<int64_t>(s);
    st.decode_tokens += static_cast<int64_t>(prompts.size());
  }
  st.decode_seconds = std::chrono::duration<double>(Clock::now() - start).count();
  if (stats) *stats = st;
  return out;
}

}  // namespace switchyard
