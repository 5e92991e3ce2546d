#include "launch/gemm_rate.h"

#include <algorithm>
#include <chrono>
#include <vector>

#include "core/error.h"
#include "kernels/gemm.h"

namespace switchyard {

double machine_gemm_rate(Communicator& world, DType compute) {
  if (compute != DType::f32 && compute != DType::bf16)
    SY_THROW(InvalidArgument, "GEMM rate: ", dtype_name(compute), ", expected f32 or bf16");
  const int64_t n = 1024;
  std::vector<float> a(static_cast<size_t>(n * n), 0.5f), b(a.size(), 0.25f), c(a.size());
  std::vector<uint16_t> a16(a.size()), b16(a.size());
  kernels::cpu::to_bf16(a.data(), n * n, a16.data());
  kernels::cpu::to_bf16(b.data(), n * n, b16.data());
  auto gemm = [&] {
    if (compute == DType::bf16) {
      kernels::GemmBf16Args g;
      g.m = g.n = g.k = n, g.a = a16.data(), g.lda = n, g.b = b16.data(), g.ldb = n, g.c = c.data(), g.ldc = n;
      kernels::cpu::gemm_bf16(g);
    } else {
      const kernels::GemmArgs g{.m = n, .n = n, .k = n, .a = a.data(), .lda = n, .b = b.data(), .ldb = n,
                                .c = c.data(), .ldc = n};
      kernels::cpu::gemm_f32(g);
    }
  };
  gemm();  // warm-up (primitive creation, first touch)
  // Several GEMMs per timing, so ranks sharing cores overlap for most of it
  // (one GEMM is short next to their start skew after the barrier).
  const int per_run = 4;
  std::vector<double> runs;
  for (int r = 0; r < 5; ++r) {
    world.barrier().wait();
    const auto t = std::chrono::steady_clock::now();
    for (int i = 0; i < per_run; ++i) gemm();
    const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
    runs.push_back(per_run * 2.0 * n * n * n * world.size() / allreduce_scalar(world, took, ReduceOp::max));
  }
  std::sort(runs.begin(), runs.end());
  return runs[runs.size() / 2];
}

}  // namespace switchyard
