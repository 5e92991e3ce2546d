// CudaOps: the MoE layer's operations (moe/ops.h) on one GPU, through the
// CUDA twins of the host kernels (kernels/cuda) and cuBLAS, on the calling
// thread's current stream (cuda::current_stream) and current device, which
// must be `device` (allocate() places memory there). Pointers are device
// pointers of `device` (copy_2d also takes host ones). CUDA builds only.
//
// The GPU check (tests/gpu/gpu_check.cpp) compares every operation with
// CpuOps on the same inputs, and MoELayer on CudaOps with MoELayer on CpuOps
// for every plan. MoELayer keeps its bulk tensors in memory() and needs a
// communicator of this device (nccl, or staged over a host backend).
#pragma once

#include "moe/ops.h"

namespace switchyard {

class CudaOps final : public MoEOps {
 public:
  explicit CudaOps(int device);
  std::string name() const override;
  Device device() const override { return Device::cuda(device_); }
  std::shared_ptr<DeviceMemory> memory() const override { return memory_; }
  void synchronize() override;
  Tensor allocate(Shape shape, DType dtype, bool zeroed) override;
  void zero(void* dst, int64_t bytes) override;
  void copy_2d(void* dst, int64_t dst_pitch, const void* src, int64_t src_pitch, int64_t width_bytes, int64_t rows,
               OpData data) override;
  void gemm(const kernels::GemmArgs& args, OpData data, bool weights_read) override;
  void gemm_bf16(const kernels::GemmBf16Args& args, bool weights_read) override;
  void to_bf16(const float* src, int64_t n, uint16_t* dst) override;
  void from_bf16(const uint16_t* src, int64_t n, float* dst) override;
  void to_fp8_rows(const float* src, int64_t rows, int64_t width, uint8_t* dst) override;
  void from_fp8_rows(const uint8_t* src, int64_t rows, int64_t width, float* dst) override;
  void gather_rows(const float* src, const int64_t* index, int64_t rows, int64_t width, float* dst) override;
  void scatter_rows(const float* src, const int64_t* index, int64_t rows, int64_t width, float* dst) override;
  void gather_scaled_rows(const float* src, const int64_t* index, const float* scale, int64_t rows, int64_t width,
                          float* dst) override;
  void combine_rows(const float* src, const int64_t* row, const float* scale, int64_t tokens, int k, int64_t width,
                    float* out) override;
  void row_dots(const float* a, const int64_t* index, const float* b, int64_t rows, int64_t width,
                float* out) override;
  void broadcast_rows(const float* bias, int64_t rows, int64_t width, float* y) override;
  void add_column_sums(const float* x, int64_t rows, int64_t width, float* acc) override;
  void activation_forward(kernels::Activation act, const float* x, int64_t rows, int64_t width, float* y) override;
  void activation_backward(kernels::Activation act, const float* x, const float* dy, int64_t rows, int64_t width,
                           float* dx) override;
  void axpy(float alpha, const float* x, int64_t n, float* y, OpData data) override;

 private:
  int device_;
  std::shared_ptr<DeviceMemory> memory_;
};

}  // namespace switchyard
