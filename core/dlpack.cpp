#include "core/dlpack.h"

#include <dlpack/dlpack.h>

namespace switchyard {
namespace {

DLDataType to_dl_dtype(DType t) {
  switch (t) {
    case DType::f32: return {kDLFloat, 32, 1};
    case DType::f64: return {kDLFloat, 64, 1};
    case DType::f16: return {kDLFloat, 16, 1};
    case DType::bf16: return {kDLBfloat, 16, 1};
    case DType::i32: return {kDLInt, 32, 1};
    case DType::i64: return {kDLInt, 64, 1};
    case DType::u8: return {kDLUInt, 8, 1};
    case DType::fp8_e4m3: break;
  }
  SY_THROW(NotSupported, "dtype ", dtype_name(t), " has no DLPack 0.6 type code; convert it (e.g. to u8 bits) first");
}

DType from_dl_dtype(DLDataType d) {
  if (d.lanes != 1) SY_THROW(NotSupported, "DLPack tensor with ", d.lanes, " lanes; only scalar elements are supported");
  if (d.code == kDLFloat && d.bits == 32) return DType::f32;
  if (d.code == kDLFloat && d.bits == 64) return DType::f64;
  if (d.code == kDLFloat && d.bits == 16) return DType::f16;
  if (d.code == kDLBfloat && d.bits == 16) return DType::bf16;
  if (d.code == kDLInt && d.bits == 32) return DType::i32;
  if (d.code == kDLInt && d.bits == 64) return DType::i64;
  if (d.code == kDLUInt && d.bits == 8) return DType::u8;
  SY_THROW(NotSupported, "DLPack dtype (code ", int(d.code), ", bits ", int(d.bits),
           ") is not one of f32, f64, f16, bf16, i32, i64, u8");
}

// What the exported DLManagedTensor points into: shape/strides arrays and the owner.
struct ExportContext {
  Tensor tensor;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;
};

}  // namespace

DLManagedTensor* to_dlpack(const Tensor& t) {
  SY_CHECK(t.defined(), "cannot export an undefined tensor");
  if (t.device().type == DeviceType::isolated)
    SY_THROW(InvalidArgument, "cannot export a tensor in isolated memory (a checking device) through DLPack");
  auto* ctx = new ExportContext{t, t.shape(), t.view().strides()};
  auto* m = new DLManagedTensor{};
  m->dl_tensor.data = t.data();
  m->dl_tensor.device = t.device().is_cpu() ? DLDevice{kDLCPU, 0} : DLDevice{kDLCUDA, t.device().index};
  m->dl_tensor.ndim = static_cast<int>(ctx->shape.size());
  m->dl_tensor.dtype = to_dl_dtype(t.dtype());
  m->dl_tensor.shape = ctx->shape.data();
  m->dl_tensor.strides = ctx->strides.data();
  m->dl_tensor.byte_offset = 0;
  m->manager_ctx = ctx;
  m->deleter = [](DLManagedTensor* self) {
    delete static_cast<ExportContext*>(self->manager_ctx);
    delete self;
  };
  return m;
}

Tensor from_dlpack(DLManagedTensor* managed) {
  SY_CHECK(managed != nullptr, "from_dlpack got a null DLManagedTensor");
  // Own it at once, so an error below still runs the producer's deleter.
  std::shared_ptr<void> owner(managed, [](void* p) {
    auto* m = static_cast<DLManagedTensor*>(p);
    if (m->deleter) m->deleter(m);
  });
  const DLTensor& dl = managed->dl_tensor;
  Device device;
  if (dl.device.device_type == kDLCPU || dl.device.device_type == kDLCUDAHost)
    device = Device::cpu();
  else if (dl.device.device_type == kDLCUDA)
    device = Device::cuda(dl.device.device_id);
  else
    SY_THROW(NotSupported, "DLPack device type ", int(dl.device.device_type), " is neither CPU nor CUDA");
  const DType dtype = from_dl_dtype(dl.dtype);
  SY_CHECK_GE(dl.ndim, 0, "DLPack ndim");
  Shape shape(dl.shape, dl.shape + dl.ndim);
  Shape strides = dl.strides ? Shape(dl.strides, dl.strides + dl.ndim) : contiguous_strides(shape);
  void* data = static_cast<char*>(dl.data) + dl.byte_offset;
  return Tensor::adopt(TensorView(shape_numel(shape) == 0 && !dl.data ? nullptr : data, dtype, shape, strides, device),
                       std::move(owner));
}

}  // namespace switchyard
