#include "moe/cuda/cuda_ops.h"

#include "kernels/cuda/gemm.h"
#include "kernels/cuda/kernels.h"
#include "kernels/cuda/runtime.h"

namespace switchyard {

namespace kc = kernels::cuda;

CudaOps::CudaOps(int device) : device_(device) {
  const int devices = cuda::device_count();
  if (devices == 0) SY_THROW(NotSupported, "CudaOps: no CUDA device (this build has CUDA, the machine has no GPU)");
  if (device < 0 || device >= devices)
    SY_THROW(InvalidArgument, "CudaOps: device = ", device, ", expected 0..", devices - 1, " (",
             devices, " CUDA device(s) here)");
  memory_ = cuda::device_memory(device);
}

void CudaOps::synchronize() { SY_CUDA_CHECK(cudaStreamSynchronize(cuda::current_stream())); }

std::string CudaOps::name() const { return "cuda:" + std::to_string(device_); }

Tensor CudaOps::allocate(Shape shape, DType dtype, bool zeroed) {
  return zeroed ? cuda::zeros(std::move(shape), dtype, device_) : cuda::empty(std::move(shape), dtype, device_);
}

void CudaOps::zero(void* dst, int64_t bytes) {
  if (bytes > 0) SY_CUDA_CHECK(cudaMemsetAsync(dst, 0, static_cast<size_t>(bytes), cuda::current_stream()));
}

void CudaOps::copy_2d(void* dst, int64_t dst_pitch, const void* src, int64_t src_pitch, int64_t width_bytes,
                      int64_t rows, OpData) {
  if (width_bytes <= 0 || rows <= 0) return;
  SY_CUDA_CHECK(cudaMemcpy2DAsync(dst, static_cast<size_t>(dst_pitch), src, static_cast<size_t>(src_pitch),
                                  static_cast<size_t>(width_bytes), static_cast<size_t>(rows),
                                  cudaMemcpyDefault, cuda::current_stream()));  // host or device pointers (UVA)
}

// cuBLAS reads every operand once per call; a grouped GEMM would read an
// expert's weight once for all its blocks (weights_read is the emulator's).
void CudaOps::gemm(const kernels::GemmArgs& args, OpData, bool) { kc::gemm_f32(args, cuda::current_stream()); }

void CudaOps::gemm_bf16(const kernels::GemmBf16Args& args, bool) { kc::gemm_bf16(args, cuda::current_stream()); }

void CudaOps::to_bf16(const float* src, int64_t n, uint16_t* dst) { kc::to_bf16(src, n, dst, cuda::current_stream()); }
void CudaOps::from_bf16(const uint16_t* src, int64_t n, float* dst) {
  kc::from_bf16(src, n, dst, cuda::current_stream());
}
void CudaOps::to_fp8_rows(const float* src, int64_t rows, int64_t width, uint8_t* dst) {
  kc::to_fp8_rows(src, rows, width, dst, cuda::current_stream());
}
void CudaOps::from_fp8_rows(const uint8_t* src, int64_t rows, int64_t width, float* dst) {
  kc::from_fp8_rows(src, rows, width, dst, cuda::current_stream());
}

void CudaOps::gather_rows(const float* src, const int64_t* index, int64_t rows, int64_t width, float* dst) {
  kc::gather_rows(src, index, rows, width, dst, cuda::current_stream());
}

void CudaOps::scatter_rows(const float* src, const int64_t* index, int64_t rows, int64_t width, float* dst) {
  kc::scatter_rows(src, index, rows, width, dst, cuda::current_stream());
}

void CudaOps::gather_scaled_rows(const float* src, const int64_t* index, const float* scale, int64_t rows,
                                 int64_t width, float* dst) {
  kc::gather_scaled_rows(src, index, scale, rows, width, dst, cuda::current_stream());
}

void CudaOps::combine_rows(const float* src, const int64_t* row, const float* scale, int64_t tokens, int k,
                           int64_t width, float* out) {
  kc::combine_rows(src, row, scale, tokens, k, width, out, cuda::current_stream());
}

void CudaOps::row_dots(const float* a, const int64_t* index, const float* b, int64_t rows, int64_t width,
                       float* out) {
  kc::row_dots(a, index, b, rows, width, out, cuda::current_stream());
}

void CudaOps::broadcast_rows(const float* bias, int64_t rows, int64_t width, float* y) {
  kc::broadcast_rows(bias, rows, width, y, cuda::current_stream());
}

void CudaOps::add_column_sums(const float* x, int64_t rows, int64_t width, float* acc) {
  // Stream-ordered scratch: freed in order after the kernel, no device-wide sync.
  Tensor scratch = cuda::empty({std::max<int64_t>(1, kc::column_sum_scratch(rows, width))}, DType::f32, device_);
  kc::add_column_sums(x, rows, width, acc, scratch.data_as<float>(), cuda::current_stream());
}

void CudaOps::activation_forward(kernels::Activation act, const float* x, int64_t rows, int64_t width, float* y) {
  kc::activation_forward(act, x, rows, width, y, cuda::current_stream());
}

void CudaOps::activation_backward(kernels::Activation act, const float* x, const float* dy, int64_t rows,
                                  int64_t width, float* dx) {
  kc::activation_backward(act, x, dy, rows, width, dx, cuda::current_stream());
}

void CudaOps::axpy(float alpha, const float* x, int64_t n, float* y, OpData) {
  kc::axpy(alpha, x, n, y, cuda::current_stream());
}

}  // namespace switchyard
