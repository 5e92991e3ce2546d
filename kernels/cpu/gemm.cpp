#include "kernels/gemm.h"

#include <oneapi/dnnl/dnnl.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <thread>

#include "core/error.h"
#include "core/logging.h"

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

WaitPolicy omp_wait_policy() {
  if (const char* v = std::getenv("OMP_WAIT_POLICY")) {
    std::string p(v);
    for (char& c : p) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return {p == "passive" || p == "active" ? p : "default", "OMP_WAIT_POLICY"};
  }
  if (const char* v = std::getenv("GOMP_SPINCOUNT"))
    return {std::string(v) == "0" ? "passive" : "default", "GOMP_SPINCOUNT"};
  return {"default", "unset"};
}

void warn_if_spinning(int gemm_threads, int local_ranks) {
  static std::atomic<bool> warned{false};
  const WaitPolicy w = omp_wait_policy();
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  if (!w.spins() || gemm_threads < 2 || gemm_threads * std::max(1, local_ranks) < cores) return;
  if (warned.exchange(true)) return;
  SY_LOG_WARN("kernels", "OpenMP spins while it waits (OMP_WAIT_POLICY ", w.source == "unset" ? "unset" : "= " + w.policy,
              ") and ", gemm_threads, " GEMM threads x ", local_ranks, " rank(s) leave none of the ", cores,
              " cores free: steps collapse when anything else runs (a data loader, another job). Set "
              "OMP_WAIT_POLICY=passive before the process starts (libgomp reads it once, when it loads); the "
              "switchyard command does so itself");
}

}  // namespace switchyard::kernels::cpu
