#include "core/tensor.h"

#include <cstdlib>
#include <cstring>
#include <sstream>

namespace switchyard {

std::string to_string(Device d) {
  switch (d.type) {
    case DeviceType::cpu: return "cpu";
    case DeviceType::cuda: return "cuda:" + std::to_string(d.index);
    case DeviceType::isolated: return "isolated";
  }
  return "?";
}

int64_t shape_numel(const Shape& shape) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

Shape contiguous_strides(const Shape& shape) {
  Shape strides(shape.size());
  int64_t stride = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    strides[i] = stride;
    stride *= shape[i];
  }
  return strides;
}

std::string shape_string(const Shape& shape) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << "]";
  return os.str();
}

TensorView::TensorView(void* data, DType dtype, Shape shape, Device device)
    : TensorView(data, dtype, shape, contiguous_strides(shape), device) {}

TensorView::TensorView(void* data, DType dtype, Shape shape, Shape strides, Device device)
    : data_(data), dtype_(dtype), shape_(std::move(shape)), strides_(std::move(strides)), device_(device) {
  SY_CHECK_EQ(shape_.size(), strides_.size(), "shape ", shape_string(shape_), " and strides ",
              shape_string(strides_), " must have the same rank");
  for (size_t i = 0; i < shape_.size(); ++i) {
    SY_CHECK_GE(shape_[i], 0, "in shape ", shape_string(shape_));
    SY_CHECK_GE(strides_[i], 0, "in strides ", shape_string(strides_));
  }
  SY_CHECK(data_ != nullptr || numel() == 0, "a non-empty tensor ", shape_string(shape_), " needs data");
}

int64_t TensorView::size(int64_t axis) const {
  if (axis < 0) axis += dim();
  SY_CHECK(axis >= 0 && axis < dim(), "axis ", axis, " out of range for shape ", shape_string(shape_));
  return shape_[static_cast<size_t>(axis)];
}

bool TensorView::is_contiguous() const {
  if (numel() == 0) return true;  // no element to be out of place (DLPack producers give such tensors any strides)
  int64_t expected = 1;
  for (size_t i = shape_.size(); i-- > 0;) {
    if (shape_[i] != 1 && strides_[i] != expected) return false;
    expected *= shape_[i];
  }
  return true;
}

TensorView TensorView::slice(int64_t begin, int64_t end) const {
  SY_CHECK_GE(dim(), 1, "slice needs at least one dimension");
  SY_CHECK(0 <= begin && begin <= end && end <= shape_[0], "slice [", begin, ", ", end,
           ") out of range for shape ", shape_string(shape_));
  Shape shape = shape_;
  shape[0] = end - begin;
  char* base = static_cast<char*>(data_);
  void* start = base ? base + begin * strides_[0] * static_cast<int64_t>(element_size()) : nullptr;
  return TensorView(shape[0] == 0 && !base ? nullptr : start, dtype_, shape, strides_, device_);
}

TensorView TensorView::reshape(Shape shape) const {
  SY_CHECK(is_contiguous(), "reshape needs a contiguous tensor, got strides ", shape_string(strides_));
  SY_CHECK_EQ(shape_numel(shape), numel(), "reshape ", shape_string(shape_), " to ", shape_string(shape));
  return TensorView(data_, dtype_, std::move(shape), device_);
}

Tensor Tensor::empty(Shape shape, DType dtype) {
  for (int64_t s : shape) SY_CHECK_GE(s, 0, "in shape ", shape_string(shape));
  Tensor t;
  t.storage_ = allocate_host(static_cast<size_t>(shape_numel(shape)) * dtype_size(dtype));
  t.view_ = TensorView(t.storage_.get(), dtype, std::move(shape));
  return t;
}

Tensor Tensor::zeros(Shape shape, DType dtype) {
  Tensor t = empty(std::move(shape), dtype);
  std::memset(t.data(), 0, t.nbytes());
  return t;
}

Tensor Tensor::adopt(TensorView view, std::shared_ptr<void> keep_alive) {
  SY_CHECK(keep_alive != nullptr, "adopt needs an owner to keep the memory alive");
  Tensor t;
  t.view_ = std::move(view);
  t.storage_ = std::move(keep_alive);
  return t;
}

Tensor Tensor::clone() const {
  SY_CHECK(device().is_cpu(), "clone of a ", to_string(device()), " tensor is not supported on the host");
  SY_CHECK(view_.is_contiguous(), "clone needs a contiguous tensor");
  Tensor t = empty(shape(), dtype());
  if (nbytes()) std::memcpy(t.data(), data(), nbytes());
  return t;
}

}  // namespace switchyard
