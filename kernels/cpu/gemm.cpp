#include "kernels/gemm.h"

#include <oneapi/dnnl/dnnl.h>
#include <omp.h>

#include "core/error.h"

namespace switchyard::kernels::cpu {

void gemm_f32(const GemmArgs& g) {
  if (g.m == 0 || g.n == 0) return;
  if (g.k == 0) {  // oneDNN wants k >= 1; the product is empty, C = beta * C
    for (int64_t i = 0; i < g.m; ++i)
      for (int64_t j = 0; j < g.n; ++j) g.c[i * g.ldc + j] = g.beta == 0.f ? 0.f : g.beta * g.c[i * g.ldc + j];
    return;
  }
  const dnnl_status_t st = dnnl_sgemm(g.transpose_a ? 'T' : 'N', g.transpose_b ? 'T' : 'N', g.m, g.n, g.k, g.alpha,
                                      g.a, g.lda, g.b, g.ldb, g.beta, g.c, g.ldc);
  if (st != dnnl_success)
    SY_THROW(Error, "dnnl_sgemm failed with status ", static_cast<int>(st), " (m=", g.m, " n=", g.n, " k=", g.k,
             " lda=", g.lda, " ldb=", g.ldb, " ldc=", g.ldc, ")");
}

void set_gemm_threads(int threads) {
  SY_CHECK_GE(threads, 1, "GEMM threads");
  omp_set_num_threads(threads);
}

int gemm_threads() { return omp_get_max_threads(); }

}  // namespace switchyard::kernels::cpu
