// GEMM on the host: C = alpha * op(A) * op(B) + beta * C, row-major fp32,
// through oneDNN's dnnl_sgemm (201 GFLOP/s on this 2-core machine at 2048^3
// against 126 for OpenBLAS).
#pragma once

#include <string>

#include <cstdint>

namespace switchyard::kernels {

// The argument types are the same for every device (kernels/cuda takes them too).
struct GemmArgs {
  bool transpose_a = false;
  bool transpose_b = false;
  int64_t m = 0, n = 0, k = 0;
  float alpha = 1.f;
  const float* a = nullptr;
  int64_t lda = 0;
  const float* b = nullptr;
  int64_t ldb = 0;
  float beta = 0.f;
  float* c = nullptr;
  int64_t ldc = 0;
};

// C (fp32) = op(A) * op(B) (+ C when accumulate), A and B bf16 (raw bits),
// accumulated in fp32.
struct GemmBf16Args {
  bool transpose_a = false;
  bool transpose_b = false;
  int64_t m = 0, n = 0, k = 0;
  const uint16_t* a = nullptr;
  int64_t lda = 0;
  const uint16_t* b = nullptr;
  int64_t ldb = 0;
  bool accumulate = false;
  float* c = nullptr;
  int64_t ldc = 0;
  // The row count (m, or k when A is transposed: a weight gradient) changes
  // from call to call, as in dropless batches: the CPU kernel then runs one
  // primitive for every count instead of compiling one per count. A given
  // setting always computes alike; the two settings may differ in the last bits.
  bool rows_vary = false;
};

}  // namespace switchyard::kernels

namespace switchyard::kernels::cpu {

void gemm_f32(const GemmArgs& args);

// GEMM threads for the calling thread's GEMMs (OpenMP is per thread, so each
// thread-rank sets its own share: cores / ranks on the machine).
void set_gemm_threads(int threads);
int gemm_threads();

// OpenMP's wait policy as the process's libgomp read it when it loaded (it
// never reads it again): "passive", "active", or "default" (libgomp then
// spins for a while before sleeping), with what set it.
struct WaitPolicy {
  std::string policy;
  std::string source;  // "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "unset"
  bool spins() const { return policy != "passive"; }
};
WaitPolicy omp_wait_policy();
// Warns once per process (log subsystem "kernels") when OpenMP spins and
// `gemm_threads` x `local_ranks` threads leave no core free: anything else on
// the machine then collapses the steps. Embedders' settings are never changed.
void warn_if_spinning(int gemm_threads, int local_ranks);

}  // namespace switchyard::kernels::cpu

namespace switchyard::kernels::cpu {

// oneDNN's matmul primitive, one cached per shape.
void gemm_bf16(const GemmBf16Args& args);

// dst = bf16(src), round to nearest even, on the calling thread's OpenMP threads.
void to_bf16(const float* src, int64_t n, uint16_t* dst);
// dst = float(src), exact (bf16 is the top half of an f32).
void from_bf16(const uint16_t* src, int64_t n, float* dst);

}  // namespace switchyard::kernels::cpu
