// Seeded random numbers for tests and benchmarks. Tests take a fresh seed each
// run (printed, and fixed by SWITCHYARD_TEST_SEED to reproduce a failure).
#pragma once

#include <cstdint>
#include <random>

#include "core/tensor.h"

namespace switchyard {

class Rng {
 public:
  explicit Rng(uint64_t seed) : engine_(seed), seed_(seed) {}
  uint64_t seed() const { return seed_; }
  std::mt19937_64& engine() { return engine_; }

  double uniform(double lo = 0.0, double hi = 1.0) { return std::uniform_real_distribution<double>(lo, hi)(engine_); }
  int64_t uniform_int(int64_t lo, int64_t hi) {  // inclusive
    return std::uniform_int_distribution<int64_t>(lo, hi)(engine_);
  }
  double normal(double mean = 0.0, double stddev = 1.0) { return std::normal_distribution<double>(mean, stddev)(engine_); }

  // Fill any dtype: floating types get uniform [lo, hi) rounded to the type;
  // integer types get uniform integers in [lo, hi] clamped to the type.
  void fill_uniform(const TensorView& t, double lo, double hi);
  void fill_normal(const TensorView& t, double mean, double stddev);

 private:
  std::mt19937_64 engine_;
  uint64_t seed_;
};

// A fresh seed: SWITCHYARD_TEST_SEED when set, else from std::random_device.
uint64_t fresh_seed();

// Fill with a byte pattern that no kernel would produce (NaN for floats), so an
// element a kernel forgot to write stands out.
void poison(const TensorView& t);
void poison_bytes(void* data, size_t bytes);

}  // namespace switchyard
