// `switchyard generate` (stream a model's continuation of a prompt) and
// `switchyard bench decode` (decode throughput and latency per batch size,
// with the per-phase breakdown and the memory floor), over thread-ranks or
// the ranks of mpirun, experts spread over them.
#pragma once

#include <string>
#include <vector>

#include "model/generate.h"

namespace switchyard {

struct GenerateOptions {
  std::string model;  // a folder with config.json and model.safetensors
  std::string prompt;
  int max_new_tokens = 64;
  SamplingOptions sampling;
  std::string backend;  // threads | mpi | "" (from the launcher)
  int ranks = 1;
};
int run_generate(const GenerateOptions& options);

struct BenchDecodeOptions {
  std::string model;
  std::vector<int> batches = {1, 2, 4, 8, 16, 32, 64};
  int prompt_tokens = 32;
  int steps = 32;
  std::string backend;
  int ranks = 1;
  std::string csv;  // optional: one row per batch size
};
int run_bench_decode(const BenchDecodeOptions& options);

}  // namespace switchyard
