#include "model/serving.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <deque>
#include <limits>
#include <map>
#include <numeric>
#include <thread>

#include "core/error.h"

namespace switchyard {

int RoundRobinScheduler::assign(const Request&, const GroupLoad& load) {
  const int64_t groups = static_cast<int64_t>(load.requests.size());
  return static_cast<int>(next_++ % groups);
}

AffinityScheduler::AffinityScheduler(std::shared_ptr<const AffinityTables> tables) : tables_(std::move(tables)) {
  if (!tables_) SY_THROW(InvalidArgument, "affinity scheduler: no tables");
}

int AffinityScheduler::assign(const Request& request, const GroupLoad& load) {
  const int groups = static_cast<int>(load.requests.size());
  if (groups != tables_->ranks())
    SY_THROW(InvalidArgument, "affinity scheduler: ", groups, " token groups, the tables are for ", tables_->ranks(),
             " ranks (expected data-parallel attention over the tables' ranks)");
  if (in_window_ == 0) taken_.assign(static_cast<size_t>(groups), 0);
  std::vector<double> score(static_cast<size_t>(groups), 0.0);
  std::vector<float> votes(static_cast<size_t>(groups)), weights(static_cast<size_t>(groups));
  for (int l = 0; l < tables_->layers(); ++l)
    for (int t : request.prompt) {
      tables_->rank_scores(l, t, 0, 0, AffinityPredictor::token, votes.data(), weights.data());
      for (int g = 0; g < groups; ++g) score[static_cast<size_t>(g)] += votes[static_cast<size_t>(g)];
    }
  int best = -1;
  for (int g = 0; g < groups; ++g)
    if (!taken_[static_cast<size_t>(g)] && (best < 0 || score[static_cast<size_t>(g)] > score[static_cast<size_t>(best)])) best = g;
  taken_[static_cast<size_t>(best)] = 1;
  in_window_ = (in_window_ + 1) % groups;
  return best;
}

void ServingOptions::validate() const {
  if (max_batch < 1) SY_THROW(InvalidArgument, "serving: max_batch = ", max_batch, ", expected >= 1");
  if (kv_budget < 0) SY_THROW(InvalidArgument, "serving: kv_budget = ", kv_budget, ", expected >= 0 (0: unlimited)");
  if (prefill_chunk < 0)
    SY_THROW(InvalidArgument, "serving: prefill_chunk = ", prefill_chunk, ", expected >= 0 (0: whole prompts)");
  if (!(progress_every > 0)) SY_THROW(InvalidArgument, "serving: progress_every = ", progress_every, ", expected > 0");
  if (redundant_experts < 0 || rebalance_every < 0 || (rebalance_every > 0) != (redundant_experts > 0))
    SY_THROW(InvalidArgument, "serving: redundant_experts = ", redundant_experts, " and rebalance_every = ",
             rebalance_every, ", expected both > 0 (rebalance) or both 0");
}

std::vector<double> poisson_arrivals(int64_t n, double rate, uint64_t seed) {
  if (rate < 0 || !std::isfinite(rate)) SY_THROW(InvalidArgument, "arrivals: rate = ", rate, ", expected >= 0 (0: all at once)");
  std::vector<double> t(static_cast<size_t>(std::max<int64_t>(n, 0)), 0.0);
  if (rate == 0) return t;
  Rng rng(seed);
  double now = 0;
  for (double& a : t) a = now += -std::log(1.0 - rng.uniform()) / rate;
  return t;
}

namespace {

using Clock = std::chrono::steady_clock;

struct Sequence {
  const Request* request;
  RequestResult result;
  KVCache cache;
  Rng rng;
  int64_t reserved;     // KV positions held against the budget
  size_t prefilled = 0; // prompt tokens already in the cache
  int next_token = -1;  // decode input
};

void check_requests(const std::vector<Request>& requests, const ModelConfig& mc, const ServingOptions& o) {
  std::map<int64_t, size_t> seen;
  for (size_t i = 0; i < requests.size(); ++i) {
    const Request& r = requests[i];
    if (!seen.emplace(r.id, i).second) SY_THROW(InvalidArgument, "serve: request id ", r.id, " appears twice");
    if (r.prompt.empty()) SY_THROW(InvalidArgument, "serve: request ", r.id, " has an empty prompt (expected >= 1 token)");
    for (int t : r.prompt)
      if (t < 0 || t >= mc.vocab_size)
        SY_THROW(InvalidArgument, "serve: request ", r.id, ": token ", t, ", expected 0..", mc.vocab_size - 1);
    if (r.max_new_tokens < 1)
      SY_THROW(InvalidArgument, "serve: request ", r.id, ": max_new_tokens = ", r.max_new_tokens, ", expected >= 1");
    const int64_t need = static_cast<int64_t>(r.prompt.size()) + r.max_new_tokens;
    if (need > mc.max_seq)
      SY_THROW(InvalidArgument, "serve: request ", r.id, ": ", r.prompt.size(), " prompt + ", r.max_new_tokens,
               " new tokens exceed max_seq = ", mc.max_seq);
    if (o.kv_budget > 0 && need > o.kv_budget)
      SY_THROW(InvalidArgument, "serve: request ", r.id, " needs ", need, " KV positions, more than kv_budget = ",
               o.kv_budget, " (it could never be admitted)");
    if (!(r.arrival >= 0) || !std::isfinite(r.arrival))
      SY_THROW(InvalidArgument, "serve: request ", r.id, ": arrival = ", r.arrival, ", expected a time >= 0");
    r.sampling.validate();
  }
}

// All-reduces a hash of the request list (max and -min) and fails on every
// rank when the ranks' lists differ.
void verify_same_requests(Communicator& world, const std::vector<Request>& requests) {
  uint64_t h = 1469598103934665603ull;
  auto mix = [&](uint64_t v) { h = (h ^ v) * 1099511628211ull; };
  for (const Request& r : requests) {
    mix(static_cast<uint64_t>(r.id));
    mix(static_cast<uint64_t>(r.max_new_tokens));
    mix(std::hash<double>{}(r.arrival));
    mix(r.sampling.seed);
    mix(std::hash<double>{}(r.sampling.temperature));
    mix(r.prompt.size());
    for (int t : r.prompt) mix(static_cast<uint64_t>(t));
  }
  if (!same_on_every_rank(world, h))
    SY_THROW(InvalidArgument, "serve: the ranks were given different request lists (every rank must pass the same "
             "requests: ids, prompts, lengths, arrivals and sampling)");
}

}  // namespace

std::vector<RequestResult> serve(InferenceEngine& engine, const std::vector<Request>& requests,
                                 RequestScheduler& scheduler, const ServingOptions& options, ServingStats* stats) {
  options.validate();
  if (options.rebalance_every > 0) engine.model().check_redundant_experts(options.redundant_experts);
  const ModelConfig& mc = engine.model().config();
  check_requests(requests, mc, options);
  if (options.check_replicas) engine.set_check_replicas(true);
  const int G = engine.schedule().token_groups(), me = engine.token_group(), V = mc.vocab_size;
  const int64_t N = static_cast<int64_t>(requests.size());
  std::vector<size_t> order(requests.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return requests[a].arrival != requests[b].arrival ? requests[a].arrival < requests[b].arrival
                                                      : requests[a].id < requests[b].id;
  });

  // Every rank must hold the same requests: their assignment and the step
  // decisions below are computed, not exchanged. This agreement also starts
  // the ranks' clocks together.
  verify_same_requests(engine.world(), requests);
  const auto start = Clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(Clock::now() - start).count(); };
  ServingStats st;
  GroupLoad load{std::vector<int64_t>(static_cast<size_t>(G), 0), std::vector<int64_t>(static_cast<size_t>(G), 0)};
  size_t next = 0;  // first request (in arrival order) not yet assigned
  std::deque<const Request*> waiting;
  std::vector<std::unique_ptr<Sequence>> active;  // admission order
  std::vector<RequestResult> done;
  int64_t kv_used = 0, finished_mine = 0;
  double last_progress = 0;
  const bool reports = engine.rank() == 0 && static_cast<bool>(options.progress);
  Tensor agree = Tensor::empty({2 + G}, DType::f64);
  double* a = agree.data_as<double>();
  // Times are kept on the agreed clock (the latest rank's): a rank's own clock
  // plus how far it was behind at the last agreement, so an event never
  // precedes the agreed arrival that admitted it.
  double behind = 0;
  // ... and never decreasing: `behind` shrinks when this rank catches up, which must not move a later event
  // before an earlier one (a request's finish before its first token).
  double last_stamp = 0;
  auto stamp = [&] { return last_stamp = std::max(last_stamp, elapsed() + behind); };
  for (;;) {
    // The step's agreement: clock, who still has work, who finished how much.
    std::fill(a, a + 2 + G, 0.0);
    a[0] = elapsed();
    a[1] = active.empty() && waiting.empty() ? 0 : 1;
    if (me >= 0) a[2 + me] = static_cast<double>(finished_mine);  // an FFN rank (me = -1) serves no group
    engine.world().allreduce(agree, agree, {.op = ReduceOp::max}).wait();
    const double now = a[0];
    behind = now - elapsed();  // after the wait: a rank that waited here is not counted late
    const bool busy_anywhere = a[1] > 0;
    int64_t finished_all = 0;
    for (int g = 0; g < G; ++g) finished_all += static_cast<int64_t>(a[2 + g]);
    if (reports && (now - last_progress >= options.progress_every)) {
      last_progress = now;
      options.progress({now, finished_all, N, st.steps});
    }
    bool arrived = false;
    while (next < order.size() && requests[order[next]].arrival <= now) {
      const Request& r = requests[order[next++]];
      const int g = scheduler.assign(r, load);
      if (g < 0 || g >= G)
        SY_THROW(InvalidArgument, "serve: the request scheduler put request ", r.id, " on token group ", g,
                 ", expected 0..", G - 1);
      ++load.requests[static_cast<size_t>(g)];
      load.tokens[static_cast<size_t>(g)] += static_cast<int64_t>(r.prompt.size()) + r.max_new_tokens;
      if (g == me) waiting.push_back(&r);
      arrived = true;
    }
    if (!busy_anywhere && !arrived) {
      if (next == order.size()) break;  // every request finished on every rank: all stop here together
      const double gap = requests[order[next]].arrival - now;  // nothing to run anywhere until then
      if (gap > 0) {
        const double before = elapsed();
        std::this_thread::sleep_for(std::chrono::duration<double>(gap));
        st.waiting_seconds += elapsed() - before;
      }
      continue;
    }
    // Admission: arrival order, within the batch and the KV budget.
    while (!waiting.empty() && static_cast<int>(active.size()) < options.max_batch) {
      const Request& r = *waiting.front();
      const int64_t need = static_cast<int64_t>(r.prompt.size()) + r.max_new_tokens;
      if (options.kv_budget > 0 && kv_used + need > options.kv_budget) break;
      waiting.pop_front();
      auto s = std::make_unique<Sequence>(
          Sequence{&r, RequestResult{}, engine.new_cache(static_cast<int>(need)), Rng(r.sampling.seed), need});
      s->result.id = r.id;
      s->result.group = me;
      s->result.arrival = r.arrival;
      s->result.admitted = now;
      kv_used += need;
      active.push_back(std::move(s));
    }
    st.peak_kv = std::max(st.peak_kv, kv_used);
    st.peak_batch = std::max(st.peak_batch, static_cast<int64_t>(active.size()));
    // This step's rows: one decode token per decoding sequence, prompt pieces within the prefill budget.
    int64_t budget = options.prefill_chunk > 0 ? options.prefill_chunk : std::numeric_limits<int64_t>::max();
    std::vector<Chunk> chunks;
    std::vector<Sequence*> owner;
    int64_t prefill_rows = 0;
    for (auto& s : active) {
      const std::vector<int>& prompt = s->request->prompt;
      if (s->prefilled < prompt.size()) {
        const int64_t n = std::min<int64_t>(static_cast<int64_t>(prompt.size() - s->prefilled), budget);
        if (n == 0) continue;
        budget -= n;
        prefill_rows += n;
        chunks.push_back({&s->cache, std::vector<int>(prompt.begin() + static_cast<std::ptrdiff_t>(s->prefilled),
                                                      prompt.begin() + static_cast<std::ptrdiff_t>(s->prefilled + n))});
        st.prompt_tokens += n;
      } else {
        chunks.push_back({&s->cache, {s->next_token}});
      }
      owner.push_back(s.get());
    }
    st.peak_prefill_rows = std::max(st.peak_prefill_rows, prefill_rows);
    const double raw0 = elapsed();
    const Tensor logits = engine.step(chunks);
    const double t1 = stamp();
    st.step_seconds += elapsed() - raw0;  // the step's own duration, whatever the clamped stamps say
    ++st.steps;
    if (chunks.empty()) ++st.idle_steps;
    int64_t row = 0;
    for (size_t i = 0; i < chunks.size(); ++i) {
      Sequence& s = *owner[i];
      const int64_t n = static_cast<int64_t>(chunks[i].tokens.size());
      row += n;
      st.rows += n;
      if (s.prefilled < s.request->prompt.size()) {
        s.prefilled += static_cast<size_t>(n);
        if (s.prefilled < s.request->prompt.size()) continue;  // more of the prompt next step
      }
      const int token = sample(logits.data_as<float>() + (row - 1) * V, V, s.request->sampling, s.rng).token;
      if (s.result.tokens.empty()) s.result.first_token = t1;
      s.result.tokens.push_back(token);
      s.next_token = token;
      ++st.generated_tokens;
      if (options.on_token) options.on_token(s.request->id, token);
      if (static_cast<int>(s.result.tokens.size()) == s.request->max_new_tokens) {
        s.result.finish = t1;
        kv_used -= s.reserved;
        ++finished_mine;
        done.push_back(std::move(s.result));
        s.request = nullptr;  // leaves the batch below
      }
    }
    std::erase_if(active, [](const std::unique_ptr<Sequence>& s) { return s->request == nullptr; });
    if (options.rebalance_every > 0 && st.steps % options.rebalance_every == 0) {
      // Between steps no MoE batch is in flight, and every rank is here after the same step.
      const double r0 = elapsed();
      const Model::Rebalance done_now = engine.model().rebalance_experts(options.redundant_experts);
      const double took = allreduce_scalar(engine.world(), elapsed() - r0, ReduceOp::max);
      ++st.rebalances;
      st.rebalance_seconds += took;
      if (options.on_rebalance) options.on_rebalance(st.steps, done_now, took);
    }
  }
  st.seconds = stamp();
  if (reports) options.progress({st.seconds, N, N, st.steps});
  if (stats) *stats = st;
  std::sort(done.begin(), done.end(), [](const RequestResult& x, const RequestResult& y) { return x.id < y.id; });
  return done;
}

}  // namespace switchyard
