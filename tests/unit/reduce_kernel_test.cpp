// kernels/cpu reduce_into against a float64 reference, every dtype and op,
// odd and empty sizes.
#include <gtest/gtest.h>

#include <cmath>

#include "core/rng.h"
#include "kernels/reduce.h"

namespace switchyard {
namespace {

TEST(ReduceKernel, MatchesFloat64ReferenceForEveryDtypeAndOp) {
  Rng rng(fresh_seed());
  SCOPED_TRACE("seed " + std::to_string(rng.seed()));
  for (DType t : {DType::f32, DType::f64, DType::bf16, DType::f16, DType::i32, DType::i64}) {
    for (ReduceOp op : {ReduceOp::sum, ReduceOp::max, ReduceOp::min}) {
      for (int64_t n : {0, 1, 7, 1023, 4099}) {
        Tensor acc = Tensor::empty({n}, t), in = Tensor::empty({n}, t);
        const bool fl = is_floating(t);
        rng.fill_uniform(acc, fl ? -4 : -100000, fl ? 4 : 100000);
        rng.fill_uniform(in, fl ? -4 : -100000, fl ? 4 : 100000);
        std::vector<double> want(static_cast<size_t>(n));
        for (int64_t i = 0; i < n; ++i) {
          const double a = load_as_double(acc.data(), t, i), b = load_as_double(in.data(), t, i);
          want[i] = op == ReduceOp::sum ? a + b : op == ReduceOp::max ? std::max(a, b) : std::min(a, b);
        }
        kernels::cpu::reduce_into(acc.data(), in.data(), static_cast<size_t>(n), t, op);
        // One rounding of the exact result at most.
        const double rel = t == DType::bf16 ? 1.0 / 256 : t == DType::f16 ? 1.0 / 2048 : t == DType::f32 ? 1e-7 : 0;
        for (int64_t i = 0; i < n; ++i)
          ASSERT_NEAR(load_as_double(acc.data(), t, i), want[i], rel * std::fabs(want[i]) + 1e-300)
              << dtype_name(t) << " " << reduce_op_name(op) << " n=" << n << " i=" << i;
      }
    }
  }
  Tensor u = Tensor::zeros({4}, DType::u8);
  EXPECT_THROW(kernels::cpu::reduce_into(u.data(), u.data(), 4, DType::u8, ReduceOp::sum), NotSupported);
}

}  // namespace
}  // namespace switchyard
