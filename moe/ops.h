// The MoE layer's device operations. MoELayer's phases (moe_layer.h) are one
// orchestration: routing metadata, dispatch plans and collectives are
// decided there, and every operation on bulk data (the tokens' rows,
// activations, expert weights and their gradients) goes through one MoEOps.
// CpuOps runs them on the host; EmulatedOps decorates another MoEOps,
// charging each operation to the calling thread's virtual clock with a
// device model (FLOPs over the GEMM rate, bytes over the memory bandwidth)
// and, in timing-only mode, skipping the bulk work, so clusters far larger
// than this machine can be timed. Pointers are of the ops' device, in the
// layouts of kernels/moe.h and kernels/gemm.h.
#pragma once

#include <memory>
#include <string>

#include "core/device_memory.h"
#include "core/tensor.h"
#include "kernels/gemm.h"
#include "kernels/moe.h"
#include "parallel/cost_model.h"

namespace switchyard {

// What data an operation works on. Timing only skips bulk work and never the
// gate's (routing needs real logits; the gate is replicated and small).
enum class OpData : uint8_t { bulk, gate };

class MoEOps {
 public:
  virtual ~MoEOps() = default;
  virtual std::string name() const = 0;  // "cpu", "emulated H100 (timing only) over cpu"
  virtual Device device() const = 0;
  // False in timing-only mode: bulk outputs hold no meaningful values, so
  // work done only for them (initial weights, moving stored experts) is left out.
  virtual bool computes() const { return true; }
  // The emulated device its operations charge to the virtual clock; null: none (real time).
  virtual const DeviceModel* device_model() const { return nullptr; }
  // The ops' memory as the host reaches it; null: host memory, which the layer
  // reads and writes directly. Else the layer keeps its bulk tensors there,
  // moves routing metadata in and small results out with to_host/from_host,
  // and needs communicators of that memory (Communicator::memory_device).
  virtual std::shared_ptr<DeviceMemory> memory() const { return nullptr; }
  bool host_memory() const { return memory() == nullptr; }
  // Returns when the work queued so far is done (device ops queue it on a stream; host ops: at once).
  virtual void synchronize() {}
  // Synchronous copies between the ops' memory and the host (plain copies on host memory).
  void to_host(void* host, const void* src, int64_t bytes);
  void from_host(void* dst, const void* host, int64_t bytes);
  // A host tensor in the ops' memory, and an ops tensor on the host: the
  // tensor itself where it already is (host ops: always), else a copy.
  Tensor copy_in(const Tensor& host);
  Tensor copy_out(const Tensor& t);

  // ---- memory ----
  // Storage outside the layer's pool (parameters, gradients). zeroed: filled
  // with zeros, except in timing-only mode, where memory stays untouched.
  virtual Tensor allocate(Shape shape, DType dtype, bool zeroed) = 0;
  virtual void zero(void* dst, int64_t bytes) = 0;
  // `rows` rows of `width_bytes` from src (row pitch src_pitch bytes) to dst (dst_pitch).
  virtual void copy_2d(void* dst, int64_t dst_pitch, const void* src, int64_t src_pitch, int64_t width_bytes,
                       int64_t rows, OpData data = OpData::bulk) = 0;
  void copy(void* dst, const void* src, int64_t bytes, OpData data = OpData::bulk) {
    copy_2d(dst, bytes, src, bytes, bytes, 1, data);
  }

  // ---- GEMMs ----
  // weights_read: an earlier call of the same grouped GEMM (one expert's
  // blocks of a chunk) already paid for the expert-sized operand: b, its
  // weight, or with transpose_a c, its weight gradient (a device running one
  // grouped GEMM reads the weight and writes the gradient once).
  virtual void gemm(const kernels::GemmArgs& args, OpData data = OpData::bulk, bool weights_read = false) = 0;
  virtual void gemm_bf16(const kernels::GemmBf16Args& args, bool weights_read = false) = 0;
  virtual void to_bf16(const float* src, int64_t n, uint16_t* dst) = 0;
  virtual void from_bf16(const uint16_t* src, int64_t n, float* dst) = 0;  // exact widening
  // [rows, width] to packed fp8 rows with 1x128 block scales and back (kernels/moe.h fp8_row_bytes).
  virtual void to_fp8_rows(const float* src, int64_t rows, int64_t width, uint8_t* dst) = 0;
  virtual void from_fp8_rows(const uint8_t* src, int64_t rows, int64_t width, float* dst) = 0;

  // ---- rows (kernels/moe.h) ----
  virtual void gather_rows(const float* src, const int64_t* index, int64_t rows, int64_t width, float* dst) = 0;
  // dst[index[i]] = src[i] for i < rows (every index distinct).
  virtual void scatter_rows(const float* src, const int64_t* index, int64_t rows, int64_t width, float* dst) = 0;
  virtual void gather_scaled_rows(const float* src, const int64_t* index, const float* scale, int64_t rows,
                                  int64_t width, float* dst) = 0;
  // The results leaving the layer: in timing-only mode `out` is zeros, so a
  // stack of layers stays finite.
  virtual void combine_rows(const float* src, const int64_t* row, const float* scale, int64_t tokens, int k,
                            int64_t width, float* out) = 0;
  // Feeds the gate's gradient: zeros in timing-only mode.
  virtual void row_dots(const float* a, const int64_t* index, const float* b, int64_t rows, int64_t width,
                        float* out) = 0;
  virtual void broadcast_rows(const float* bias, int64_t rows, int64_t width, float* y) = 0;
  virtual void add_column_sums(const float* x, int64_t rows, int64_t width, float* acc) = 0;
  virtual void activation_forward(kernels::Activation act, const float* x, int64_t rows, int64_t width, float* y) = 0;
  virtual void activation_backward(kernels::Activation act, const float* x, const float* dy, int64_t rows,
                                   int64_t width, float* dx) = 0;
  // y += alpha * x over n elements (gradient sums, SGD).
  virtual void axpy(float alpha, const float* x, int64_t n, float* y, OpData data = OpData::bulk) = 0;
};

// The host: oneDNN GEMMs and kernels::cpu, on the calling thread's OpenMP
// threads. batch_invariant: f32 GEMMs without transposes run row-wise
// (kernels/rowwise.h), so a row's result does not depend on its batch.
class CpuOps final : public MoEOps {
 public:
  explicit CpuOps(bool batch_invariant = false) : batch_invariant_(batch_invariant) {}
  std::string name() const override { return batch_invariant_ ? "cpu (batch-invariant)" : "cpu"; }
  Device device() const override { return Device::cpu(); }
  Tensor allocate(Shape shape, DType dtype, bool zeroed) override;
  void zero(void* dst, int64_t bytes) override;
  void copy_2d(void* dst, int64_t dst_pitch, const void* src, int64_t src_pitch, int64_t width_bytes,
               int64_t rows, OpData data) override;
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
  bool batch_invariant_;
};

// Another MoEOps on an emulated device: each operation charges the calling
// thread's virtual clock (comm/virtual_time.h) with `device`'s rates, GEMMs
// at their roofline (DeviceModel::gemm_seconds) and row and elementwise
// kernels by the bytes they read and write. timing_only: bulk operations are
// charged and not run (outputs the layer reads back are zeros, see above).
class EmulatedOps final : public MoEOps {
 public:
  EmulatedOps(std::shared_ptr<MoEOps> inner, std::shared_ptr<const DeviceModel> device, bool timing_only);
  std::string name() const override;
  Device device() const override { return inner_->device(); }
  std::shared_ptr<DeviceMemory> memory() const override { return inner_->memory(); }
  void synchronize() override { inner_->synchronize(); }
  bool computes() const override { return !timing_only_; }
  const DeviceModel* device_model() const override { return device_.get(); }
  Tensor allocate(Shape shape, DType dtype, bool zeroed) override;
  void zero(void* dst, int64_t bytes) override;
  void copy_2d(void* dst, int64_t dst_pitch, const void* src, int64_t src_pitch, int64_t width_bytes,
               int64_t rows, OpData data) override;
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
  void charge_bytes(double bytes) const;  // a streaming kernel
  void charge_gemm(int64_t m, int64_t n, int64_t k, bool transpose_a, bool bf16, bool weights_read) const;
  std::shared_ptr<MoEOps> inner_;
  std::shared_ptr<const DeviceModel> device_;  // may be null: nothing is charged
  bool timing_only_;
};

// CpuOps on isolated memory (core/device_memory.h): a device the host can
// reach only through the ops and their copies. The layer runs its device
// path on it (metadata moved in, results out, communicators of device memory)
// with the host's kernels, so every plan's device path is checked against
// CpuOps without a GPU: a missed copy faults or throws naming the operand.
class IsolatedOps final : public MoEOps {
 public:
  std::string name() const override { return "isolated (cpu kernels)"; }
  Device device() const override { return Device::isolated(); }
  std::shared_ptr<DeviceMemory> memory() const override { return isolated_memory(); }
  Tensor allocate(Shape shape, DType dtype, bool zeroed) override;
  void zero(void* dst, int64_t bytes) override;
  void copy_2d(void* dst, int64_t dst_pitch, const void* src, int64_t src_pitch, int64_t width_bytes,
               int64_t rows, OpData data) override;
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
  CpuOps host_;
};

// The ops a layer with these settings runs on: the host, decorated by the
// emulated device when there is a device model or timing only is asked for
// (or SWITCHYARD_MOE_OPS=emulated: decorated, charging nothing).
std::shared_ptr<MoEOps> make_moe_ops(std::shared_ptr<const DeviceModel> device_model, bool timing_only,
                                     bool batch_invariant);

}  // namespace switchyard
