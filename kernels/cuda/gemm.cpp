#include "kernels/cuda/gemm.h"

#include <cublas_v2.h>

#include <map>

#include "core/error.h"
#include "kernels/cuda/runtime.h"

namespace switchyard::kernels::cuda {
namespace {

void check_cublas(cublasStatus_t status, const char* call) {
  if (status != CUBLAS_STATUS_SUCCESS)
    SY_THROW(IoError, call, " failed: ", cublasGetStatusName(status), ": ", cublasGetStatusString(status));
}
#define SY_CUBLAS_CHECK(call) check_cublas((call), #call)

// Handles are not thread safe; one per (thread, device), made on first use.
cublasHandle_t handle_for(cudaStream_t stream) {
  thread_local std::map<int, cublasHandle_t> handles;
  int device = 0;
  SY_CUDA_CHECK(cudaGetDevice(&device));
  auto it = handles.find(device);
  if (it == handles.end()) {
    cublasHandle_t h = nullptr;
    SY_CUBLAS_CHECK(cublasCreate(&h));
    SY_CUBLAS_CHECK(cublasSetMathMode(h, CUBLAS_DEFAULT_MATH));
    it = handles.emplace(device, h).first;
  }
  SY_CUBLAS_CHECK(cublasSetStream(it->second, stream));
  return it->second;
}

void check_shape(const char* op, int64_t m, int64_t n, int64_t k) {
  constexpr int64_t kMax = (int64_t{1} << 31) - 1;
  if (m < 0 || n < 0 || k < 0 || m > kMax || n > kMax || k > kMax)
    SY_THROW(InvalidArgument, "cuda ", op, ": m = ", m, ", n = ", n, ", k = ", k, "; expected each in 0..2^31-1");
}

// Row-major C[m,n] = op(A) op(B): column-major C^T[n,m] = op(B)^T op(A)^T,
// i.e. cuBLAS with (B, A) swapped and the same transpose flags.
struct ColumnMajor {
  cublasOperation_t op_b, op_a;
  int n, m, k;
};
ColumnMajor column_major(bool ta, bool tb, int64_t m, int64_t n, int64_t k) {
  return {tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
          static_cast<int>(k)};
}

}  // namespace

void gemm_f32(const GemmArgs& a, cudaStream_t stream) { gemm_f32_batched(a, 1, 0, 0, 0, stream); }

void gemm_f32_batched(const GemmArgs& a, int batch, int64_t stride_a, int64_t stride_b, int64_t stride_c,
                      cudaStream_t stream) {
  check_shape("gemm_f32", a.m, a.n, a.k);
  if (a.m == 0 || a.n == 0 || batch == 0) return;
  const ColumnMajor c = column_major(a.transpose_a, a.transpose_b, a.m, a.n, a.k);
  cublasHandle_t h = handle_for(stream);
  if (batch == 1)
    SY_CUBLAS_CHECK(cublasSgemm(h, c.op_b, c.op_a, c.n, c.m, c.k, &a.alpha, a.b, static_cast<int>(a.ldb), a.a,
                                static_cast<int>(a.lda), &a.beta, a.c, static_cast<int>(a.ldc)));
  else
    SY_CUBLAS_CHECK(cublasSgemmStridedBatched(h, c.op_b, c.op_a, c.n, c.m, c.k, &a.alpha, a.b,
                                              static_cast<int>(a.ldb), stride_b, a.a, static_cast<int>(a.lda),
                                              stride_a, &a.beta, a.c, static_cast<int>(a.ldc), stride_c, batch));
}

void gemm_bf16(const GemmBf16Args& a, cudaStream_t stream) { gemm_bf16_batched(a, 1, 0, 0, 0, stream); }

void gemm_bf16_batched(const GemmBf16Args& a, int batch, int64_t stride_a, int64_t stride_b, int64_t stride_c,
                       cudaStream_t stream) {
  check_shape("gemm_bf16", a.m, a.n, a.k);
  if (a.m == 0 || a.n == 0 || batch == 0) return;
  const ColumnMajor c = column_major(a.transpose_a, a.transpose_b, a.m, a.n, a.k);
  const float alpha = 1.f, beta = a.accumulate ? 1.f : 0.f;
  cublasHandle_t h = handle_for(stream);
  SY_CUBLAS_CHECK(cublasGemmStridedBatchedEx(h, c.op_b, c.op_a, c.n, c.m, c.k, &alpha, a.b, CUDA_R_16BF,
                                             static_cast<int>(a.ldb), stride_b, a.a, CUDA_R_16BF,
                                             static_cast<int>(a.lda), stride_a, &beta, a.c, CUDA_R_32F,
                                             static_cast<int>(a.ldc), stride_c, batch, CUBLAS_COMPUTE_32F,
                                             CUBLAS_GEMM_DEFAULT));
}

}  // namespace switchyard::kernels::cuda
