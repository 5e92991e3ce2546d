#include "moe/ops.h"

#include <cstring>

#include "comm/virtual_time.h"
#include "core/env.h"
#include "kernels/rowwise.h"

namespace switchyard {

namespace {
constexpr double kF32 = sizeof(float);

// Columns an activation reads per output column (swiglu: the gate and up halves).
int64_t activation_input_width(kernels::Activation act, int64_t width) {
  return act == kernels::Activation::swiglu ? 2 * width : width;
}
}  // namespace

void MoEOps::to_host(void* host, const void* src, int64_t bytes) {
  if (bytes <= 0) return;
  if (auto m = memory()) m->to_host(host, src, bytes);
  else std::memcpy(host, src, static_cast<size_t>(bytes));
}

void MoEOps::from_host(void* dst, const void* host, int64_t bytes) {
  if (bytes <= 0) return;
  if (auto m = memory()) m->from_host(dst, host, bytes);
  else std::memcpy(dst, host, static_cast<size_t>(bytes));
}

Tensor MoEOps::copy_in(const Tensor& host) {
  if (host_memory()) return host;
  Tensor t = allocate(host.shape(), host.dtype(), false);
  from_host(t.data(), host.data(), static_cast<int64_t>(host.nbytes()));
  return t;
}

Tensor MoEOps::copy_out(const Tensor& t) {
  if (t.device().is_cpu()) return t;
  Tensor h = Tensor::empty(t.shape(), t.dtype());
  to_host(h.data(), t.data(), static_cast<int64_t>(t.nbytes()));
  return h;
}

// ---- CpuOps ----

Tensor CpuOps::allocate(Shape shape, DType dtype, bool zeroed) {
  return zeroed ? Tensor::zeros(std::move(shape), dtype) : Tensor::empty(std::move(shape), dtype);
}

void CpuOps::zero(void* dst, int64_t bytes) {
  if (bytes > 0) std::memset(dst, 0, static_cast<size_t>(bytes));
}

void CpuOps::copy_2d(void* dst, int64_t dst_pitch, const void* src, int64_t src_pitch, int64_t width_bytes,
                     int64_t rows, OpData) {
  if (width_bytes <= 0) return;
  if (dst_pitch == width_bytes && src_pitch == width_bytes) {
    std::memcpy(dst, src, static_cast<size_t>(width_bytes * rows));
    return;
  }
  for (int64_t i = 0; i < rows; ++i)
    std::memcpy(static_cast<char*>(dst) + i * dst_pitch, static_cast<const char*>(src) + i * src_pitch,
                static_cast<size_t>(width_bytes));
}

void CpuOps::gemm(const kernels::GemmArgs& args, OpData, bool) {
  if (batch_invariant_ && !args.transpose_a && !args.transpose_b && args.alpha == 1.f)
    kernels::cpu::matmul_rows(args.a, args.m, args.k, args.lda, args.b, args.n, args.ldb, args.beta, args.c, args.ldc);
  else
    kernels::cpu::gemm_f32(args);
}

void CpuOps::gemm_bf16(const kernels::GemmBf16Args& args, bool) { kernels::cpu::gemm_bf16(args); }

void CpuOps::to_bf16(const float* src, int64_t n, uint16_t* dst) { kernels::cpu::to_bf16(src, n, dst); }
void CpuOps::from_bf16(const uint16_t* src, int64_t n, float* dst) { kernels::cpu::from_bf16(src, n, dst); }
void CpuOps::to_fp8_rows(const float* src, int64_t rows, int64_t width, uint8_t* dst) {
  kernels::cpu::to_fp8_rows(src, rows, width, dst);
}
void CpuOps::from_fp8_rows(const uint8_t* src, int64_t rows, int64_t width, float* dst) {
  kernels::cpu::from_fp8_rows(src, rows, width, dst);
}

void CpuOps::gather_rows(const float* src, const int64_t* index, int64_t rows, int64_t width, float* dst) {
  kernels::cpu::gather_rows(src, index, rows, width, dst);
}

void CpuOps::scatter_rows(const float* src, const int64_t* index, int64_t rows, int64_t width, float* dst) {
  kernels::cpu::scatter_rows(src, index, rows, width, dst);
}

void CpuOps::gather_scaled_rows(const float* src, const int64_t* index, const float* scale, int64_t rows,
                                int64_t width, float* dst) {
  kernels::cpu::gather_scaled_rows(src, index, scale, rows, width, dst);
}

void CpuOps::combine_rows(const float* src, const int64_t* row, const float* scale, int64_t tokens, int k,
                          int64_t width, float* out) {
  kernels::cpu::combine_rows(src, row, scale, tokens, k, width, out);
}

void CpuOps::row_dots(const float* a, const int64_t* index, const float* b, int64_t rows, int64_t width, float* out) {
  kernels::cpu::row_dots(a, index, b, rows, width, out);
}

void CpuOps::broadcast_rows(const float* bias, int64_t rows, int64_t width, float* y) {
  kernels::cpu::broadcast_rows(bias, rows, width, y);
}

void CpuOps::add_column_sums(const float* x, int64_t rows, int64_t width, float* acc) {
  kernels::cpu::add_column_sums(x, rows, width, acc);
}

void CpuOps::activation_forward(kernels::Activation act, const float* x, int64_t rows, int64_t width, float* y) {
  kernels::cpu::activation_forward(act, x, rows, width, y);
}

void CpuOps::activation_backward(kernels::Activation act, const float* x, const float* dy, int64_t rows,
                                 int64_t width, float* dx) {
  kernels::cpu::activation_backward(act, x, dy, rows, width, dx);
}

void CpuOps::axpy(float alpha, const float* x, int64_t n, float* y, OpData) { kernels::cpu::axpy(alpha, x, n, y); }

// ---- EmulatedOps ----

EmulatedOps::EmulatedOps(std::shared_ptr<MoEOps> inner, std::shared_ptr<const DeviceModel> device, bool timing_only)
    : inner_(std::move(inner)), device_(std::move(device)), timing_only_(timing_only) {
  if (!inner_) SY_THROW(InvalidArgument, "EmulatedOps: no inner ops to decorate");
}

std::string EmulatedOps::name() const {
  return std::string("emulated") + (device_ ? "" : " (no device model)") + (timing_only_ ? " (timing only)" : "") +
         " over " + inner_->name();
}

void EmulatedOps::charge_bytes(double bytes) const {
  if (device_) virtual_time::charge(device_->memory_seconds(bytes));
}

Tensor EmulatedOps::allocate(Shape shape, DType dtype, bool zeroed) {
  // Timing only: allocated, never touched, so the pages of an emulated
  // cluster's experts are never committed.
  if (zeroed) charge_bytes(static_cast<double>(shape_numel(shape)) * static_cast<double>(dtype_size(dtype)));
  return inner_->allocate(std::move(shape), dtype, zeroed && !timing_only_);
}

void EmulatedOps::zero(void* dst, int64_t bytes) {
  charge_bytes(static_cast<double>(bytes));
  if (!timing_only_) inner_->zero(dst, bytes);
}

void EmulatedOps::copy_2d(void* dst, int64_t dst_pitch, const void* src, int64_t src_pitch, int64_t width_bytes,
                          int64_t rows, OpData data) {
  charge_bytes(2.0 * static_cast<double>(width_bytes) * static_cast<double>(rows));
  if (!timing_only_ || data == OpData::gate) inner_->copy_2d(dst, dst_pitch, src, src_pitch, width_bytes, rows, data);
}

void EmulatedOps::charge_gemm(int64_t m, int64_t n, int64_t k, bool transpose_a, bool bf16, bool weights_read) const {
  // transpose_a: the layer's weight-gradient GEMMs (A = rows transposed), whose expert-sized operand is C.
  if (device_)
    virtual_time::charge(device_->gemm_seconds(static_cast<double>(m), static_cast<double>(n), static_cast<double>(k),
                                               bf16, weights_read, transpose_a));
}

void EmulatedOps::gemm(const kernels::GemmArgs& a, OpData data, bool weights_read) {
  charge_gemm(a.m, a.n, a.k, a.transpose_a, false, weights_read);
  if (!timing_only_ || data == OpData::gate) inner_->gemm(a, data, weights_read);
}

void EmulatedOps::gemm_bf16(const kernels::GemmBf16Args& a, bool weights_read) {
  charge_gemm(a.m, a.n, a.k, a.transpose_a, true, weights_read);
  if (!timing_only_) inner_->gemm_bf16(a, weights_read);
}

void EmulatedOps::to_bf16(const float* src, int64_t n, uint16_t* dst) {
  charge_bytes(static_cast<double>(n) * (kF32 + 2));
  if (!timing_only_) inner_->to_bf16(src, n, dst);
}

void EmulatedOps::from_bf16(const uint16_t* src, int64_t n, float* dst) {
  charge_bytes(static_cast<double>(n) * (kF32 + 2));
  if (!timing_only_) inner_->from_bf16(src, n, dst);
}

void EmulatedOps::to_fp8_rows(const float* src, int64_t rows, int64_t width, uint8_t* dst) {
  charge_bytes(static_cast<double>(rows) * (width * kF32 + static_cast<double>(kernels::fp8_row_bytes(width))));
  if (!timing_only_) inner_->to_fp8_rows(src, rows, width, dst);
}

void EmulatedOps::from_fp8_rows(const uint8_t* src, int64_t rows, int64_t width, float* dst) {
  charge_bytes(static_cast<double>(rows) * (width * kF32 + static_cast<double>(kernels::fp8_row_bytes(width))));
  if (!timing_only_) inner_->from_fp8_rows(src, rows, width, dst);
}

void EmulatedOps::gather_rows(const float* src, const int64_t* index, int64_t rows, int64_t width, float* dst) {
  charge_bytes(2.0 * static_cast<double>(rows * width) * kF32);
  if (!timing_only_) inner_->gather_rows(src, index, rows, width, dst);
}

void EmulatedOps::scatter_rows(const float* src, const int64_t* index, int64_t rows, int64_t width, float* dst) {
  charge_bytes(2.0 * static_cast<double>(rows * width) * kF32);
  if (!timing_only_) inner_->scatter_rows(src, index, rows, width, dst);
}

void EmulatedOps::gather_scaled_rows(const float* src, const int64_t* index, const float* scale, int64_t rows,
                                     int64_t width, float* dst) {
  charge_bytes(2.0 * static_cast<double>(rows * width) * kF32);
  if (!timing_only_) inner_->gather_scaled_rows(src, index, scale, rows, width, dst);
}

void EmulatedOps::combine_rows(const float* src, const int64_t* row, const float* scale, int64_t tokens, int k,
                               int64_t width, float* out) {
  // Reads the rows that are there (dropped choices are skipped), writes each token once.
  int64_t rows = tokens * k;
  if (inner_->device().is_cpu()) {
    rows = 0;
    for (int64_t c = 0; c < tokens * k; ++c) rows += row[c] >= 0;
  }
  charge_bytes(static_cast<double>((rows + tokens) * width) * kF32);
  if (timing_only_)
    inner_->zero(out, tokens * width * static_cast<int64_t>(sizeof(float)));
  else
    inner_->combine_rows(src, row, scale, tokens, k, width, out);
}

void EmulatedOps::row_dots(const float* a, const int64_t* index, const float* b, int64_t rows, int64_t width,
                           float* out) {
  charge_bytes(2.0 * static_cast<double>(rows * width) * kF32);
  if (timing_only_)
    inner_->zero(out, rows * static_cast<int64_t>(sizeof(float)));
  else
    inner_->row_dots(a, index, b, rows, width, out);
}

void EmulatedOps::broadcast_rows(const float* bias, int64_t rows, int64_t width, float* y) {
  charge_bytes(static_cast<double>(rows * width) * kF32);
  if (!timing_only_) inner_->broadcast_rows(bias, rows, width, y);
}

void EmulatedOps::add_column_sums(const float* x, int64_t rows, int64_t width, float* acc) {
  charge_bytes(static_cast<double>(rows * width) * kF32);
  if (!timing_only_) inner_->add_column_sums(x, rows, width, acc);
}

void EmulatedOps::activation_forward(kernels::Activation act, const float* x, int64_t rows, int64_t width, float* y) {
  charge_bytes(static_cast<double>(rows * (activation_input_width(act, width) + width)) * kF32);
  if (!timing_only_) inner_->activation_forward(act, x, rows, width, y);
}

void EmulatedOps::activation_backward(kernels::Activation act, const float* x, const float* dy, int64_t rows,
                                      int64_t width, float* dx) {
  charge_bytes(static_cast<double>(rows * (2 * activation_input_width(act, width) + width)) * kF32);
  if (!timing_only_) inner_->activation_backward(act, x, dy, rows, width, dx);
}

void EmulatedOps::axpy(float alpha, const float* x, int64_t n, float* y, OpData data) {
  charge_bytes(3.0 * static_cast<double>(n) * kF32);
  if (!timing_only_ || data == OpData::gate) inner_->axpy(alpha, x, n, y, data);
}

// ---- IsolatedOps: the host's kernels behind the isolated addresses ----

namespace {
// Every pointer is checked, also for calls with nothing to do: a host pointer
// given for an empty batch is still a missed copy for the next one.
template <class T>
T* real(T* p, const char* what) {
  return static_cast<T*>(isolated_address(p, what));
}
}  // namespace

Tensor IsolatedOps::allocate(Shape shape, DType dtype, bool zeroed) {
  Tensor t = isolated_memory()->allocate(std::move(shape), dtype);
  if (zeroed) zero(t.data(), static_cast<int64_t>(t.nbytes()));
  return t;
}

void IsolatedOps::zero(void* dst, int64_t bytes) {
  host_.zero(real(dst, "zero dst"), bytes);
}

void IsolatedOps::copy_2d(void* dst, int64_t dst_pitch, const void* src, int64_t src_pitch, int64_t width_bytes,
                          int64_t rows, OpData data) {
  void* to = real(dst, "copy dst");
  const void* from = real(src, "copy src");
  if (width_bytes > 0 && rows > 0) host_.copy_2d(to, dst_pitch, from, src_pitch, width_bytes, rows, data);
}

void IsolatedOps::gemm(const kernels::GemmArgs& args, OpData data, bool weights_read) {
  kernels::GemmArgs a = args;
  a.a = real(a.a, "gemm a");
  a.b = real(a.b, "gemm b");
  a.c = real(a.c, "gemm c");
  if (a.m > 0 && a.n > 0) host_.gemm(a, data, weights_read);
}

void IsolatedOps::gemm_bf16(const kernels::GemmBf16Args& args, bool weights_read) {
  kernels::GemmBf16Args a = args;
  a.a = real(a.a, "gemm_bf16 a");
  a.b = real(a.b, "gemm_bf16 b");
  a.c = real(a.c, "gemm_bf16 c");
  if (a.m > 0 && a.n > 0) host_.gemm_bf16(a, weights_read);
}

void IsolatedOps::to_bf16(const float* src, int64_t n, uint16_t* dst) {
  host_.to_bf16(real(src, "to_bf16 src"), n, real(dst, "to_bf16 dst"));
}
void IsolatedOps::from_bf16(const uint16_t* src, int64_t n, float* dst) {
  host_.from_bf16(real(src, "from_bf16 src"), n, real(dst, "from_bf16 dst"));
}
void IsolatedOps::to_fp8_rows(const float* src, int64_t rows, int64_t width, uint8_t* dst) {
  host_.to_fp8_rows(real(src, "to_fp8_rows src"), rows, width, real(dst, "to_fp8_rows dst"));
}
void IsolatedOps::from_fp8_rows(const uint8_t* src, int64_t rows, int64_t width, float* dst) {
  host_.from_fp8_rows(real(src, "from_fp8_rows src"), rows, width, real(dst, "from_fp8_rows dst"));
}
void IsolatedOps::gather_rows(const float* src, const int64_t* index, int64_t rows, int64_t width, float* dst) {
  host_.gather_rows(real(src, "gather_rows src"), real(index, "gather_rows index"), rows, width,
                                  real(dst, "gather_rows dst"));
}
void IsolatedOps::scatter_rows(const float* src, const int64_t* index, int64_t rows, int64_t width, float* dst) {
  host_.scatter_rows(real(src, "scatter_rows src"), real(index, "scatter_rows index"), rows, width,
                                   real(dst, "scatter_rows dst"));
}
void IsolatedOps::gather_scaled_rows(const float* src, const int64_t* index, const float* scale, int64_t rows,
                                     int64_t width, float* dst) {
  host_.gather_scaled_rows(real(src, "gather_scaled_rows src"), real(index, "gather_scaled_rows index"),
                             real(scale, "gather_scaled_rows scale"), rows, width, real(dst, "gather_scaled_rows dst"));
}
void IsolatedOps::combine_rows(const float* src, const int64_t* row, const float* scale, int64_t tokens, int k,
                               int64_t width, float* out) {
  host_.combine_rows(real(src, "combine_rows src"), real(row, "combine_rows row"), real(scale, "combine_rows scale"),
                       tokens, k, width, real(out, "combine_rows out"));
}
void IsolatedOps::row_dots(const float* a, const int64_t* index, const float* b, int64_t rows, int64_t width,
                           float* out) {
  host_.row_dots(real(a, "row_dots a"), real(index, "row_dots index"), real(b, "row_dots b"), rows, width,
                   real(out, "row_dots out"));
}
void IsolatedOps::broadcast_rows(const float* bias, int64_t rows, int64_t width, float* y) {
  host_.broadcast_rows(real(bias, "broadcast_rows bias"), rows, width, real(y, "broadcast_rows y"));
}
void IsolatedOps::add_column_sums(const float* x, int64_t rows, int64_t width, float* acc) {
  host_.add_column_sums(real(x, "add_column_sums x"), rows, width, real(acc, "add_column_sums acc"));
}
void IsolatedOps::activation_forward(kernels::Activation act, const float* x, int64_t rows, int64_t width, float* y) {
  host_.activation_forward(act, real(x, "activation x"), rows, width, real(y, "activation y"));
}
void IsolatedOps::activation_backward(kernels::Activation act, const float* x, const float* dy, int64_t rows,
                                      int64_t width, float* dx) {
  host_.activation_backward(act, real(x, "activation_backward x"), real(dy, "activation_backward dy"), rows, width,
                              real(dx, "activation_backward dx"));
}
void IsolatedOps::axpy(float alpha, const float* x, int64_t n, float* y, OpData data) {
  host_.axpy(alpha, real(x, "axpy x"), n, real(y, "axpy y"), data);
}

std::shared_ptr<MoEOps> make_moe_ops(std::shared_ptr<const DeviceModel> device_model, bool timing_only,
                                     bool batch_invariant) {
  auto cpu = std::make_shared<CpuOps>(batch_invariant);
  if (!device_model && !timing_only && env().moe_ops == "cpu") return cpu;
  return std::make_shared<EmulatedOps>(std::move(cpu), std::move(device_model), timing_only);
}

}  // namespace switchyard
