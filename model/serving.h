// Serving many requests on the InferenceEngine: continuous batching (a
// finished sequence leaves, waiting ones join between steps), chunked
// prefill, a KV budget per rank, arrivals over time.
//
// Every rank runs serve() with the same request list (checked: a hash of it
// is all-reduced on entry). Requests are assigned
// to token groups (schedule.token_groups(): one per rank under dp) by a
// RequestScheduler, in arrival order, from values every rank agrees on, so
// all ranks make the same assignments without exchanging them. Each step
// starts with one small all-reduce (max) that agrees the clock, which groups
// still have work and how many requests each finished; ranks with nothing to
// compute still run the step (empty rows) while anyone has work, and all
// ranks stop together.
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include "model/engine.h"
#include "model/generate.h"

namespace switchyard {

struct Request {
  int64_t id = 0;
  std::vector<int> prompt;
  int max_new_tokens = 16;  // >= 1
  double arrival = 0;       // seconds after serve() starts
  // The request's own generator (seed): its tokens do not depend on the batch.
  SamplingOptions sampling;
};

struct RequestResult {
  int64_t id = 0;
  int group = 0;  // token group that served it
  std::vector<int> tokens;
  double arrival = 0, admitted = 0, first_token = 0, finish = 0;  // seconds since serve() started
  double ttft() const { return first_token - arrival; }
  // Time per output token after the first.
  double tpot() const { return tokens.size() > 1 ? (finish - first_token) / static_cast<double>(tokens.size() - 1) : 0; }
};

// What every rank knows identically when a request arrives.
struct GroupLoad {
  std::vector<int64_t> requests;  // requests assigned so far, per token group
  std::vector<int64_t> tokens;    // prompt + max_new_tokens assigned so far, per token group
};

class RequestScheduler {
 public:
  virtual ~RequestScheduler() = default;
  // The token group (0..groups-1) that serves `request`; a deterministic
  // function of its arguments (every rank calls it with the same ones).
  virtual int assign(const Request& request, const GroupLoad& load) = 0;
};

// Request i (in arrival order) to group i mod groups.
class RoundRobinScheduler : public RequestScheduler {
 public:
  int assign(const Request& request, const GroupLoad& load) override;

 private:
  int64_t next_ = 0;
};

// Sem-MoE's request scheduling for data-parallel attention (moe/affinity.h):
// a request goes to the token group (one per rank) whose experts its prompt's
// tokens use most (the tables' token-id confidence summed over the prompt
// and the layers), under a round-robin mask: every `groups` consecutive
// requests take every group once, so the load stays round-robin's while
// each window is matched to its requests. Sticky: a request keeps its group
// for its whole decode (serve() assigns once). The tables' ranks must be the
// groups, and the model must hold their placement.
class AffinityScheduler : public RequestScheduler {
 public:
  explicit AffinityScheduler(std::shared_ptr<const AffinityTables> tables);
  int assign(const Request& request, const GroupLoad& load) override;

 private:
  std::shared_ptr<const AffinityTables> tables_;
  std::vector<char> taken_;  // groups the current window has used
  int64_t in_window_ = 0;
};

struct ServeProgress {
  double seconds = 0;
  int64_t finished = 0, total = 0, steps = 0;
};

struct ServingOptions {
  int max_batch = 64;       // sequences in flight per rank
  int64_t kv_budget = 0;    // KV positions a rank may hold (prompt + max_new_tokens reserved per request); 0: unlimited
  int prefill_chunk = 0;    // prompt tokens a rank prefills per step (0: whole prompts at once)
  // Admission is first come, first served: a request that does not fit the
  // KV budget yet waits, and so do the ones behind it (no overtaking).
  bool check_replicas = false;  // true: InferenceEngine::set_check_replicas(true)
  double progress_every = 1.0;  // seconds between progress calls (rank 0)
  std::function<void(const ServeProgress&)> progress;
  // Each token as it is chosen, on the ranks of the request's group.
  std::function<void(int64_t id, int token)> on_token;
  // Redundant experts (EPLB): after every rebalance_every steps (a count
  // every rank shares) the MoE layers re-place E + redundant_experts physical
  // experts from the loads routed since the last time
  // (Model::rebalance_experts); outputs stay bit for bit. on_rebalance hears
  // each one on every rank: after which step, what it did, its seconds (the
  // slowest rank's).
  int redundant_experts = 0;
  int64_t rebalance_every = 0;  // 0: never
  std::function<void(int64_t step, const Model::Rebalance& done, double seconds)> on_rebalance;
  void validate() const;  // InvalidArgument naming the field
};

struct ServingStats {
  int64_t steps = 0;          // steps this rank ran (collective, so the same on every rank)
  int64_t idle_steps = 0;     // of them, steps with no rows on this rank
  int64_t rows = 0;           // rows this rank computed (prefill + decode)
  int64_t prompt_tokens = 0, generated_tokens = 0;  // of this rank's token group
  double seconds = 0;         // from start to the last step
  double step_seconds = 0;    // inside engine.step()
  double waiting_seconds = 0; // asleep until the next arrival (nothing to run anywhere)
  int64_t peak_kv = 0;        // most KV positions this rank held reserved at once
  int64_t peak_batch = 0;     // most sequences this rank had in flight at once
  int64_t peak_prefill_rows = 0;  // most prompt rows this rank prefilled in one step
  int64_t rebalances = 0;          // expert re-placements (ServingOptions::rebalance_every)
  double rebalance_seconds = 0;    // spent in them (in `seconds`, not in `step_seconds`)
};

// Results of the requests this rank's token group served, in id order.
std::vector<RequestResult> serve(InferenceEngine& engine, const std::vector<Request>& requests,
                                 RequestScheduler& scheduler, const ServingOptions& options,
                                 ServingStats* stats = nullptr);

// Arrival times of n requests at `rate` per second (Poisson: exponential gaps
// from a seeded generator); rate 0: all at time 0.
std::vector<double> poisson_arrivals(int64_t n, double rate, uint64_t seed);

}  // namespace switchyard
