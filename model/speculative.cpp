#include "model/speculative.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "core/error.h"

namespace switchyard {
namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

struct Sequence {
  std::vector<int> out;            // committed new tokens
  int last = 0;                    // the newest committed token; the base cache holds everything before it
  std::vector<int> draft_pending;  // committed tokens the draft cache does not hold yet (ends with `last`)
  KVCache base_cache, draft_cache;
  Rng rng;
  std::vector<int> proposals;
  std::vector<std::vector<float>> q;  // the draft's distribution of each proposal
  int gamma = 0;                      // proposals this round
  // The draft's exact prefix: positions [0, exact) of its KV came from exact
  // passes; `unexact` are the committed tokens after it (fed fuzzily or pending).
  int exact = 0;
  std::vector<int> unexact;
  // A calibration pass's proposal for the next round (-1: none; the round then feeds draft_pending first).
  int first = -1;
  std::vector<float> first_q;
  bool calibrate = false;  // the last round asks for a calibration pass (at the next round's start: that pass runs for it)
  double acceptance = 0.5;  // smoothed per proposal (adaptive gamma)
};

// The distribution a request samples from at these logits (after temperature,
// top-k, top-p; greedy: one-hot at the first maximum), without drawing.
std::vector<float> distribution(const float* logits, int vocab, const SamplingOptions& o) {
  Rng unused(0);
  return sample(logits, vocab, o, unused).probs;
}

// A token from norm(max(0, p - q)); p itself where that is empty (p <= q everywhere).
int residual_token(const std::vector<float>& p, const std::vector<float>& q, Rng& rng) {
  std::vector<double> r(p.size());
  double total = 0;
  for (size_t v = 0; v < p.size(); ++v) total += r[v] = std::max(0.0, static_cast<double>(p[v]) - q[v]);
  if (!(total > 0)) {
    for (size_t v = 0; v < p.size(); ++v) total += r[v] = p[v];
  }
  double u = rng.uniform(0.0, total);
  int last_positive = 0;
  for (size_t v = 0; v < r.size(); ++v) {
    if (r[v] <= 0) continue;
    last_positive = static_cast<int>(v);
    if (u < r[v]) return static_cast<int>(v);
    u -= r[v];
  }
  return last_positive;  // rounding left u at the end
}

}  // namespace

const char* calibration_name(Calibration c) {
  switch (c) {
    case Calibration::every: return "every";
    case Calibration::mismatch: return "mismatch";
    case Calibration::never: return "never";
  }
  return "?";
}

Calibration parse_calibration(const std::string& name, const std::string& field) {
  for (Calibration c : {Calibration::every, Calibration::mismatch, Calibration::never})
    if (name == calibration_name(c)) return c;
  SY_THROW(ConfigError, field, " = '", name, "', expected every, mismatch or never");
}

void SpeculativeOptions::validate() const {
  if (gamma < 1 || gamma > 64) SY_THROW(InvalidArgument, "speculative: gamma = ", gamma, ", expected 1..64");
  sampling.validate();
}

std::vector<std::vector<int>> speculative_generate(InferenceEngine& base, InferenceEngine& draft,
                                                   const std::vector<std::vector<int>>& prompts, int max_new_tokens,
                                                   const SpeculativeOptions& o, SpeculativeStats* stats) {
  o.validate();
  const auto start = Clock::now();
  const ModelConfig& bc = base.model().config();
  const int V = bc.vocab_size;
  if (max_new_tokens < 0)
    SY_THROW(InvalidArgument, "speculative: max_new_tokens = ", max_new_tokens, ", expected >= 0");
  if (draft.model().config().vocab_size != V)
    SY_THROW(InvalidArgument, "speculative: the draft '", draft.model().config().name, "' has ",
             draft.model().config().vocab_size, " tokens, the base '", bc.name, "' ", V, " (expected the same vocabulary)");
  if (draft.world().size() != base.world().size())
    SY_THROW(InvalidArgument, "speculative: the draft runs on ", draft.world().size(), " rank(s), the base on ",
             base.world().size(), " (expected the same ranks)");
  // A layer-parallel draft's ranks compute its groups' layers for one shared input (each block of ranks gathers the
  // deltas), so every rank must hold the same sequences.
  if (!draft.schedule().layer_groups().empty() && base.schedule().token_groups() != 1)
    SY_THROW(InvalidArgument, "speculative: a layer-parallel draft needs the base's ranks to share their sequences "
             "(one token group: replicated, or tp over every rank); the base has ", base.schedule().token_groups(),
             " token groups");
  SpeculativeStats st;
  std::vector<Sequence> seqs;
  seqs.reserve(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    const std::vector<int>& p = prompts[i];
    if (p.empty()) SY_THROW(InvalidArgument, "speculative: prompt ", i, " is empty; expected at least one token");
    const int capacity = static_cast<int>(p.size()) + max_new_tokens + 1;
    if (capacity > std::min(bc.max_seq, draft.model().config().max_seq) + 1)
      SY_THROW(InvalidArgument, "speculative: prompt ", i, " of ", p.size(), " tokens + ", max_new_tokens,
               " new tokens exceed max_seq (base ", bc.max_seq, ", draft ", draft.model().config().max_seq, ")");
    seqs.push_back({{}, p.back(), {p.back()}, base.new_cache(capacity), draft.new_cache(capacity),
                    Rng(o.sampling.seed + i), {}, {}, 0, static_cast<int>(p.size()) - 1, {p.back()}, -1, {}, false});
  }
  // Prefill both caches with every prompt token but the last (that one is the first round's input).
  {
    std::vector<Chunk> b, d;
    for (size_t i = 0; i < seqs.size(); ++i) {
      if (prompts[i].size() < 2) continue;
      const std::vector<int> context(prompts[i].begin(), prompts[i].end() - 1);
      b.push_back({&seqs[i].base_cache, context});
      d.push_back({&seqs[i].draft_cache, context});
    }
    auto t = Clock::now();
    draft.step_exact(d);  // the prompt's KV exact, whatever the draft's schedule
    st.draft_seconds += seconds_since(t);
    t = Clock::now();
    base.step(b);
    st.verify_seconds += seconds_since(t);
  }
  Tensor agree = Tensor::empty({3}, DType::f64);
  for (;;) {
    // The last round's calibrations (bonus calibration), run here so the
    // round's agreement also says whether any rank has one: the exact pass is
    // collective, and is skipped when no rank needs it. Not for a sequence
    // with fewer than 2 tokens to go: its draft never runs again.
    // s.calibrate: the last round asked for one; from here: this round's pass calibrates it.
    std::vector<Sequence*> to_calibrate;
    for (Sequence& s : seqs) {
      s.calibrate = o.calibration != Calibration::never && s.calibrate && s.gamma >= 0 &&
                    max_new_tokens - static_cast<int>(s.out.size()) >= 2;
      if (s.calibrate) to_calibrate.push_back(&s);
    }
    // Proposals per sequence this round: at most gamma, and no more than it may still commit minus the base's own token.
    // A sequence drafts its proposals in s.gamma steps, or one fewer when the
    // calibration pass proposes the first (s.first).
    int most = -1, any = 0;
    for (Sequence& s : seqs) {
      const int remaining = max_new_tokens - static_cast<int>(s.out.size());
      int want = o.gamma;
      if (o.adaptive_gamma) {
        const double a = std::min(s.acceptance, 0.95);
        want = std::clamp(static_cast<int>(std::lround(a / (1 - a))) + 1, 1, o.gamma);
      }
      s.gamma = remaining > 0 ? std::min(want, remaining - 1) : -1;
      s.proposals.clear(), s.q.clear();
      if (s.gamma >= 0) any = 1;
      most = std::max(most, s.gamma - (s.gamma >= 1 && s.calibrate ? 1 : 0));
    }
    agree.data_as<double>()[0] = any;
    agree.data_as<double>()[1] = most;
    agree.data_as<double>()[2] = to_calibrate.empty() ? 0 : 1;
    base.world().allreduce(agree, agree, {.op = ReduceOp::max}).wait();
    if (agree.data_as<double>()[0] == 0) break;  // every rank's sequences are done: all stop together
    if (agree.data_as<double>()[2] > 0) {
      // Calibration: one exact draft pass over each sequence's committed tokens since its last exact position,
      // collective (ranks with nothing to calibrate pass no rows); its last logits propose the round's first token.
      auto t = Clock::now();
      std::vector<Chunk> exact;
      for (Sequence* s : to_calibrate) {
        s->draft_cache.crop(s->exact);
        exact.push_back({&s->draft_cache, s->unexact});
      }
      const Tensor draft_logits = draft.step_exact(exact);
      ++st.draft_forwards;
      int64_t row = -1;
      for (size_t c = 0; c < exact.size(); ++c) {
        Sequence& s = *to_calibrate[c];
        row += static_cast<int64_t>(exact[c].tokens.size());
        s.exact += static_cast<int>(s.unexact.size());
        s.unexact.clear();
        s.draft_pending.clear();
        ++st.calibrations;
        Sampled pick = sample(draft_logits.data_as<float>() + row * V, V, o.sampling, s.rng);
        s.first = pick.token;
        s.first_q = std::move(pick.probs);
      }
      st.calibration_seconds += seconds_since(t);
    }
    for (Sequence& s : seqs)
      if (s.gamma >= 1 && s.first >= 0) s.proposals.push_back(s.first), s.q.push_back(std::move(s.first_q));
    const int steps = static_cast<int>(agree.data_as<double>()[1]);
    ++st.rounds;
    // Draft: `steps` collective steps; a sequence takes part until it has s.gamma proposals.
    auto t = Clock::now();
    for (int step = 0; step < steps; ++step) {
      std::vector<Chunk> chunks;
      std::vector<Sequence*> owner;
      for (Sequence& s : seqs) {
        if (static_cast<int>(s.proposals.size()) >= s.gamma) continue;
        const bool pending = s.proposals.empty();  // the round's first draft step feeds what the draft has not seen
        chunks.push_back({&s.draft_cache, pending ? s.draft_pending : std::vector<int>{s.proposals.back()}});
        owner.push_back(&s);
      }
      const Tensor logits = draft.step(chunks);
      ++st.draft_forwards;
      int64_t row = -1;
      for (size_t c = 0; c < chunks.size(); ++c) {
        row += static_cast<int64_t>(chunks[c].tokens.size());
        Sampled pick = sample(logits.data_as<float>() + row * V, V, o.sampling, owner[c]->rng);
        owner[c]->proposals.push_back(pick.token);
        owner[c]->q.push_back(std::move(pick.probs));
      }
    }
    st.draft_seconds += seconds_since(t);
    // Verify: [last, proposals...] in one chunk per sequence.
    t = Clock::now();
    std::vector<Chunk> chunks;
    std::vector<Sequence*> owner;
    for (Sequence& s : seqs) {
      if (s.gamma < 0) continue;
      std::vector<int> tokens = {s.last};
      tokens.insert(tokens.end(), s.proposals.begin(), s.proposals.end());
      chunks.push_back({&s.base_cache, std::move(tokens)});
      owner.push_back(&s);
    }
    const Tensor logits = base.step(chunks);
    st.verify_seconds += seconds_since(t);
    int64_t first_row = 0;
    for (size_t c = 0; c < chunks.size(); ++c) {
      Sequence& s = *owner[c];
      const float* rows = logits.data_as<float>() + first_row * V;
      first_row += static_cast<int64_t>(chunks[c].tokens.size());
      int accepted = 0, next = -1;
      for (; accepted < s.gamma; ++accepted) {
        const std::vector<float> p = distribution(rows + static_cast<int64_t>(accepted) * V, V, o.sampling);
        const int d = s.proposals[static_cast<size_t>(accepted)];
        const double pd = p[static_cast<size_t>(d)], qd = s.q[static_cast<size_t>(accepted)][static_cast<size_t>(d)];
        if (pd >= qd || s.rng.uniform(0.0, 1.0) < pd / qd) continue;  // accepted with probability min(1, p / q)
        next = residual_token(p, s.q[static_cast<size_t>(accepted)], s.rng);
        break;
      }
      if (next < 0) next = sample(rows + static_cast<int64_t>(s.gamma) * V, V, o.sampling, s.rng).token;  // bonus
      // Commit the accepted proposals and the base's token.
      const bool had_first = s.first >= 0 && s.gamma >= 1;
      std::vector<int> stream = s.draft_pending;  // what the draft must end up having fed
      for (int i = 0; i < accepted; ++i) {
        s.out.push_back(s.proposals[static_cast<size_t>(i)]);
        stream.push_back(s.proposals[static_cast<size_t>(i)]);
        s.unexact.push_back(s.proposals[static_cast<size_t>(i)]);
      }
      s.out.push_back(next);
      stream.push_back(next);
      s.unexact.push_back(next);
      // The base holds [.., last, accepted proposals]; the rejected positions go.
      s.base_cache.crop(s.base_cache.length() - (s.gamma - accepted));
      s.last = next;
      // The draft fed its pending tokens (unless a calibration proposed the
      // first proposal) and every proposal but the last; it keeps those that
      // were committed.
      const int from_pending = had_first ? 0 : static_cast<int>(s.draft_pending.size());
      const int fed = s.gamma >= 1 ? from_pending + s.gamma - 1 : 0;
      const int kept = std::min(fed, static_cast<int>(s.draft_pending.size()) + accepted);
      s.draft_cache.crop(s.draft_cache.length() - (fed - kept));
      s.draft_pending.assign(stream.begin() + kept, stream.end());
      s.first = -1;
      s.calibrate = o.calibration == Calibration::every || (o.calibration == Calibration::mismatch && accepted < s.gamma);
      if (s.gamma > 0) s.acceptance = 0.7 * s.acceptance + 0.3 * static_cast<double>(accepted) / s.gamma;
      st.proposed += s.gamma;
      st.accepted += accepted;
      st.generated += accepted + 1;
      ++st.sequence_rounds;
    }
  }
  st.total_seconds = seconds_since(start);
  if (stats) *stats = st;
  std::vector<std::vector<int>> out;
  out.reserve(seqs.size());
  for (Sequence& s : seqs) out.push_back(std::move(s.out));
  return out;
}

}  // namespace switchyard
