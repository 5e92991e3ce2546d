// Speculative MoE tools (moe/affinity.h, moe/expert_grouping.h):
//   switchyard trace record --model DIR -o FILE     routing trace of the held-out fortunes, by the C++ model
//   switchyard affinity build TRACE --ranks W -o F  tables (+ expert grouping) from a trace's build part
//   switchyard bench specmoe --model DIR            LAR of vanilla, grouping, shuffling and both per W
// Traces are split by document, never by position: document j builds the
// tables iff j % build_every == 0, the rest is scored.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "moe/routing_trace.h"

namespace switchyard {

class Model;

// The model (on this rank alone) over documents, each cut into windows of at
// most the model's max_seq tokens; tokens until max_tokens (0: all).
// sequences = the document's index. Prints progress when `progress`.
RoutingTrace record_routing_trace(Model& model, const std::vector<std::string>& documents, int64_t max_tokens,
                                  bool progress);

struct TraceRecordOptions {
  std::string model, out;
  std::string corpus = "/usr/share/games/fortunes";
  int64_t max_tokens = 0;  // 0: every held-out fortune
};
int run_trace_record(const TraceRecordOptions& options);

struct AffinityBuildOptions {
  std::string trace, out;
  std::string model;  // optional: unseen tokens borrow their nearest neighbour's rows in its embedding
  int ranks = 4;
  int lookback = 2;
  bool grouping = true;
  int build_every = 5;  // 1: build on the whole trace (tables for use; the LAR printed is in-sample)
  int64_t batch_tokens = 2048;
};
int run_affinity_build(const AffinityBuildOptions& options);

struct BenchSpecMoeOptions {
  std::string model;
  std::string trace;  // optional: else the held-out fortunes are recorded through the model
  std::string corpus = "/usr/share/games/fortunes";
  std::vector<int> ranks = {4, 8};
  int lookback = 2;
  int build_every = 5;
  int64_t batch_tokens = 2048;
  int64_t max_tokens = 0;
  std::string csv, png;
};
int run_bench_specmoe(const BenchSpecMoeOptions& options);

}  // namespace switchyard
