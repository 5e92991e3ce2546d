#include "core/rng.h"

#include <cstring>

#include "core/env.h"

namespace switchyard {

void Rng::fill_uniform(const TensorView& t, double lo, double hi) {
  SY_CHECK(t.device().is_cpu() && t.is_contiguous(), "fill_uniform needs a contiguous host tensor");
  const auto n = static_cast<size_t>(t.numel());
  if (is_floating(t.dtype())) {
    std::uniform_real_distribution<double> dist(lo, hi);
    for (size_t i = 0; i < n; ++i) store_from_double(t.data(), t.dtype(), i, dist(engine_));
  } else {
    std::uniform_int_distribution<int64_t> dist(static_cast<int64_t>(lo), static_cast<int64_t>(hi));
    for (size_t i = 0; i < n; ++i) store_from_double(t.data(), t.dtype(), i, static_cast<double>(dist(engine_)));
  }
}

void Rng::fill_normal(const TensorView& t, double mean, double stddev) {
  SY_CHECK(t.device().is_cpu() && t.is_contiguous(), "fill_normal needs a contiguous host tensor");
  std::normal_distribution<double> dist(mean, stddev);
  const auto n = static_cast<size_t>(t.numel());
  for (size_t i = 0; i < n; ++i) store_from_double(t.data(), t.dtype(), i, dist(engine_));
}

uint64_t fresh_seed() {
  if (env().test_seed) return *env().test_seed;
  std::random_device rd;
  return (static_cast<uint64_t>(rd()) << 32) ^ rd();
}

void poison_bytes(void* data, size_t bytes) {
  // 0xFF bytes: NaN in every floating type, -1 / max in integers.
  if (bytes) std::memset(data, 0xff, bytes);
}

void poison(const TensorView& t) {
  SY_CHECK(t.device().is_cpu() && t.is_contiguous(), "poison needs a contiguous host tensor");
  poison_bytes(t.data(), t.nbytes());
}

}  // namespace switchyard
