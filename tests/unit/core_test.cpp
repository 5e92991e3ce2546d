// core/: checks, dtypes and their conversions, tensors, DLPack, env parsing.
#include <gtest/gtest.h>

#include <dlpack/dlpack.h>

#include <cmath>
#include <limits>
#include <map>

#include "core/dlpack.h"
#include "core/dtype.h"
#include "core/env.h"
#include "core/error.h"
#include "core/logging.h"
#include "core/rng.h"
#include "core/tensor.h"

namespace switchyard {
namespace {

TEST(Checks, PrintBothValuesAndTheLocation) {
  try {
    const int a = 3, b = 4;
    SY_CHECK_EQ(a, b, "while testing");
    FAIL();
  } catch (const InvalidArgument& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("a == b (3 vs 4)"), std::string::npos) << m;
    EXPECT_NE(m.find("while testing"), std::string::npos) << m;
    EXPECT_NE(m.find("tests/unit/core_test.cpp:"), std::string::npos) << m;
  }
}

TEST(Checks, WithContextKeepsTheErrorType) {
  auto e = with_context(std::make_exception_ptr(TimeoutError("late")), "op: ");
  EXPECT_THROW(std::rethrow_exception(e), TimeoutError);
  try {
    std::rethrow_exception(e);
  } catch (const TimeoutError& t) {
    EXPECT_STREQ(t.what(), "op: late");
  }
}

// float64 reference rounding: the representable neighbours of x in a format with
// `mantissa_bits` and the given exponent range, nearest-even. Checked against
// exhaustive decoding of every bit pattern instead.
template <typename T, typename Bits>
void expect_roundtrip_of_every_pattern(int patterns) {
  for (int b = 0; b < patterns; ++b) {
    T v;
    v.bits = static_cast<Bits>(b);
    const float f = v.to_float();
    if (std::isnan(f)) continue;
    EXPECT_EQ(T::from_float(f).bits, v.bits) << "pattern " << b << " = " << f;
  }
}

TEST(DType, EveryBitPatternRoundTripsThroughFloat) {
  expect_roundtrip_of_every_pattern<bf16, uint16_t>(1 << 16);
  expect_roundtrip_of_every_pattern<f16, uint16_t>(1 << 16);
  expect_roundtrip_of_every_pattern<fp8_e4m3, uint8_t>(1 << 8);
}

// Nearest representable value by brute force over all patterns (the reference).
template <typename T, typename Bits>
float nearest_by_search(double x, int patterns) {
  double best = 0, best_err = std::numeric_limits<double>::infinity();
  Bits best_bits = 0;
  for (int b = 0; b < patterns; ++b) {
    T v;
    v.bits = static_cast<Bits>(b);
    const double f = v.to_float();
    if (std::isnan(f) || std::isinf(f)) continue;
    const double err = std::fabs(f - x);
    // Ties go to the even mantissa (lowest bit clear).
    if (err < best_err || (err == best_err && (b & 1) == 0 && (best_bits & 1) == 1)) {
      best = f, best_err = err, best_bits = static_cast<Bits>(b);
    }
  }
  return static_cast<float>(best);
}

TEST(DType, ConversionsRoundToNearestEvenAgainstBruteForce) {
  Rng rng(fresh_seed());
  SCOPED_TRACE("seed " + std::to_string(rng.seed()));
  for (int i = 0; i < 300; ++i) {
    const float x = static_cast<float>(rng.uniform(-400.0, 400.0) * std::pow(2.0, rng.uniform_int(-12, 0)));
    EXPECT_EQ(fp8_e4m3::from_float(x).to_float(), (nearest_by_search<fp8_e4m3, uint8_t>(x, 256))) << x;
    if (i < 40) {
      EXPECT_EQ(f16::from_float(x).to_float(), (nearest_by_search<f16, uint16_t>(x, 1 << 16))) << x;
      EXPECT_EQ(bf16::from_float(x).to_float(), (nearest_by_search<bf16, uint16_t>(x, 1 << 16))) << x;
    }
  }
}

TEST(DType, SpecialValues) {
  EXPECT_TRUE(std::isnan(bf16::from_float(NAN).to_float()));
  EXPECT_TRUE(std::isnan(f16::from_float(NAN).to_float()));
  EXPECT_TRUE(std::isnan(fp8_e4m3::from_float(NAN).to_float()));
  EXPECT_TRUE(std::isinf(f16::from_float(1e6f).to_float()));
  EXPECT_EQ(fp8_e4m3::from_float(1e6f).to_float(), 448.0f);    // saturates
  EXPECT_EQ(fp8_e4m3::from_float(-1e6f).to_float(), -448.0f);
  EXPECT_EQ(f16::from_float(65504.0f).to_float(), 65504.0f);
  EXPECT_EQ(f16::from_float(std::ldexp(1.0f, -24)).to_float(), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(fp8_e4m3::from_float(std::ldexp(1.0f, -9)).to_float(), std::ldexp(1.0f, -9));
}

TEST(DType, BulkConvertSaturatesIntegersAndNamesParse) {
  const double src[] = {1.5, -2.7, 1e12, -1e12, 300.0};
  int32_t i32[5];
  convert(src, DType::f64, i32, DType::i32, 5);
  EXPECT_EQ(i32[0], 1);
  EXPECT_EQ(i32[1], -2);
  EXPECT_EQ(i32[2], std::numeric_limits<int32_t>::max());
  EXPECT_EQ(i32[3], std::numeric_limits<int32_t>::min());
  uint8_t u8[5];
  convert(src, DType::f64, u8, DType::u8, 5);
  EXPECT_EQ(u8[4], 255);
  for (DType t : kAllDTypes) EXPECT_EQ(parse_dtype(dtype_name(t)), t);
  EXPECT_EQ(parse_dtype("bfloat16"), DType::bf16);
  EXPECT_FALSE(parse_dtype("f12").has_value());
}

TEST(Tensor, IsAlignedSlicesAndChecksShapes) {
  Tensor t = Tensor::empty({5, 3}, DType::f32);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(t.data()) % kHostAlignment, 0u);
  EXPECT_EQ(t.nbytes(), 60u);
  EXPECT_TRUE(t.view().is_contiguous());
  TensorView rows = t.view().slice(1, 3);
  EXPECT_EQ(rows.shape(), (Shape{2, 3}));
  EXPECT_EQ(rows.data(), static_cast<char*>(t.data()) + 12);
  EXPECT_THROW(t.view().slice(2, 6), InvalidArgument);
  EXPECT_THROW(t.view().reshape({4, 4}), InvalidArgument);
  EXPECT_EQ(t.view().reshape({15}).shape(), (Shape{15}));
  EXPECT_THROW((void)t.data_as<double>(), InvalidArgument);
  Tensor empty = Tensor::empty({0, 7}, DType::bf16);
  EXPECT_EQ(empty.numel(), 0);
  EXPECT_THROW(Tensor::empty({-1}, DType::f32), InvalidArgument);
  TensorView strided(t.data(), DType::f32, {3, 2}, {1, 3});
  EXPECT_FALSE(strided.is_contiguous());
}

TEST(Tensor, CloneIsDeepAndCopiesShareStorage) {
  Tensor a = Tensor::zeros({4}, DType::i64);
  Tensor shared = a;
  Tensor deep = a.clone();
  a.data_as<int64_t>()[2] = 9;
  EXPECT_EQ(shared.data_as<int64_t>()[2], 9);
  EXPECT_EQ(deep.data_as<int64_t>()[2], 0);
}

TEST(DLPack, ExportImportIsZeroCopyAndRunsTheDeleterOnce) {
  Tensor t = Tensor::empty({2, 3}, DType::bf16);
  DLManagedTensor* m = to_dlpack(t);
  EXPECT_EQ(m->dl_tensor.data, t.data());
  EXPECT_EQ(m->dl_tensor.dtype.code, kDLBfloat);
  EXPECT_EQ(m->dl_tensor.ndim, 2);
  EXPECT_EQ(m->dl_tensor.shape[1], 3);
  std::weak_ptr<void> storage = t.storage();
  t = Tensor();  // the export alone keeps it alive
  EXPECT_FALSE(storage.expired());
  {
    Tensor back = from_dlpack(m);
    EXPECT_EQ(back.dtype(), DType::bf16);
    EXPECT_EQ(back.shape(), (Shape{2, 3}));
    EXPECT_FALSE(storage.expired());
  }
  EXPECT_TRUE(storage.expired());  // importer released -> export's deleter ran
}

TEST(DLPack, ImportsForeignStridedTensorsAndRejectsUnknownTypes) {
  static int deleted = 0;
  static float data[6] = {0, 1, 2, 3, 4, 5};
  static int64_t shape[2] = {3, 2}, strides[2] = {1, 3};
  auto make = [](DLDataType type) {
    auto* m = new DLManagedTensor{};
    m->dl_tensor = DLTensor{data, {kDLCPU, 0}, 2, type, shape, strides, 0};
    m->deleter = [](DLManagedTensor* self) { ++deleted; delete self; };
    return m;
  };
  deleted = 0;
  {
    Tensor t = from_dlpack(make({kDLFloat, 32, 1}));
    EXPECT_FALSE(t.view().is_contiguous());
    EXPECT_EQ(t.view().strides(), (Shape{1, 3}));
  }
  EXPECT_EQ(deleted, 1);
  EXPECT_THROW(from_dlpack(make({kDLComplex, 64, 1})), NotSupported);
  EXPECT_EQ(deleted, 2);  // the rejected tensor was still released
  EXPECT_THROW(to_dlpack(Tensor::empty({1}, DType::fp8_e4m3)), NotSupported);
}

TEST(Env, ParsesTypedValuesAndNamesBadOnes) {
  std::map<std::string, std::string> vars = {{"SWITCHYARD_COMM_TIMEOUT_MS", "1500"}, {"SWITCHYARD_RANK", "3"}};
  auto lookup = [&](const std::string& n) -> std::optional<std::string> {
    auto it = vars.find(n);
    return it == vars.end() ? std::nullopt : std::optional(it->second);
  };
  Env e = parse_env(lookup);
  EXPECT_EQ(e.comm_timeout_ms, 1500);
  EXPECT_EQ(e.rank, 3);
  EXPECT_FALSE(e.world_size.has_value());
  vars["SWITCHYARD_COMM_TIMEOUT_MS"] = "soon";
  try {
    parse_env(lookup);
    FAIL();
  } catch (const ConfigError& err) {
    EXPECT_NE(std::string(err.what()).find("SWITCHYARD_COMM_TIMEOUT_MS='soon'"), std::string::npos) << err.what();
  }
  auto table = env_table(lookup);
  EXPECT_GE(table.size(), 8u);
  for (const auto& row : table) EXPECT_FALSE(row.doc.empty()) << row.name;
}

TEST(Logging, LevelSpecsParseAndBadOnesAreNamed) {
  set_log_levels("error,comm=debug");
  EXPECT_TRUE(log_enabled(LogLevel::debug, "comm"));
  EXPECT_FALSE(log_enabled(LogLevel::info, "runtime"));
  EXPECT_THROW(set_log_levels("loud"), ConfigError);
  set_log_levels("warn");
}

}  // namespace
}  // namespace switchyard

namespace switchyard {
namespace {

TEST(Allocator, LargeBlocksAreReusedAlignedAndReleasable) {
  release_host_cache();
  const HostCacheStats before = host_cache_stats();
  void* first = nullptr;
  {
    Tensor a = Tensor::empty({3 << 20}, DType::u8);  // 3 MiB: cached size class
    first = a.data();
    EXPECT_EQ(reinterpret_cast<uintptr_t>(first) % kHostAlignment, 0u);
  }
  EXPECT_GE(host_cache_stats().cached_bytes, uint64_t{3} << 20);
  {
    Tensor b = Tensor::empty({(3 << 20) - 100}, DType::u8);  // same 2 MiB-rounded class
    EXPECT_EQ(b.data(), first);
    Tensor c = Tensor::empty({3 << 20}, DType::u8);  // the cached one is taken: a new block
    EXPECT_NE(c.data(), first);
  }
  const HostCacheStats after = host_cache_stats();
  EXPECT_EQ(after.hits - before.hits, 1u);
  EXPECT_EQ(after.misses - before.misses, 2u);
  release_host_cache();
  EXPECT_EQ(host_cache_stats().cached_bytes, 0u);
  Tensor small = Tensor::empty({100}, DType::f32);  // small blocks bypass the cache
  EXPECT_EQ(reinterpret_cast<uintptr_t>(small.data()) % kHostAlignment, 0u);
}

}  // namespace
}  // namespace switchyard
