// Tensor (owning, 64-byte aligned CPU storage) and TensorView (non-owning).
// Shapes and strides count elements; strides may be any non-negative values.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "core/allocator.h"
#include "core/dtype.h"
#include "core/error.h"

namespace switchyard {

// isolated: host memory at addresses the host cannot dereference
// (core/device_memory.h), a device for checking device code paths without one.
enum class DeviceType : uint8_t { cpu, cuda, isolated };

struct Device {
  DeviceType type = DeviceType::cpu;
  int index = 0;
  static Device cpu() { return {}; }
  static Device cuda(int index) { return {DeviceType::cuda, index}; }
  static Device isolated() { return {DeviceType::isolated, 0}; }
  bool is_cpu() const { return type == DeviceType::cpu; }
  friend bool operator==(const Device&, const Device&) = default;
};
std::string to_string(Device d);

using Shape = std::vector<int64_t>;

int64_t shape_numel(const Shape& shape);
Shape contiguous_strides(const Shape& shape);
std::string shape_string(const Shape& shape);

class TensorView {
 public:
  TensorView() = default;
  TensorView(void* data, DType dtype, Shape shape, Device device = Device::cpu());
  TensorView(void* data, DType dtype, Shape shape, Shape strides, Device device = Device::cpu());

  void* data() const { return data_; }
  template <typename T>
  T* data_as() const {
    SY_CHECK_EQ(dtype_name(dtype_), dtype_name(dtype_v<T>), "tensor element type");
    return static_cast<T*>(data_);
  }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  const Shape& shape() const { return shape_; }
  const Shape& strides() const { return strides_; }
  int64_t dim() const { return static_cast<int64_t>(shape_.size()); }
  int64_t size(int64_t axis) const;
  int64_t numel() const { return shape_numel(shape_); }
  size_t element_size() const { return dtype_size(dtype_); }
  // Bytes spanned by the elements (numel * element size) when contiguous.
  size_t nbytes() const { return static_cast<size_t>(numel()) * element_size(); }
  bool is_contiguous() const;

  // Rows [begin, end) of axis 0, as a view.
  TensorView slice(int64_t begin, int64_t end) const;
  // Same elements with another shape; needs contiguity.
  TensorView reshape(Shape shape) const;

 private:
  void* data_ = nullptr;
  DType dtype_ = DType::f32;
  Shape shape_;
  Shape strides_;
  Device device_;
};

// Owns its storage. Copying a Tensor shares the storage (like torch.Tensor);
// use clone() for a deep copy. Storage is released when the last owner goes.
class Tensor {
 public:
  Tensor() = default;
  static Tensor empty(Shape shape, DType dtype);
  static Tensor zeros(Shape shape, DType dtype);
  // Adopt foreign memory (e.g. from DLPack); `keep_alive` is released with the tensor.
  static Tensor adopt(TensorView view, std::shared_ptr<void> keep_alive);

  const TensorView& view() const { return view_; }
  operator const TensorView&() const { return view_; }
  void* data() const { return view_.data(); }
  template <typename T>
  T* data_as() const { return view_.data_as<T>(); }
  DType dtype() const { return view_.dtype(); }
  Device device() const { return view_.device(); }
  const Shape& shape() const { return view_.shape(); }
  int64_t numel() const { return view_.numel(); }
  size_t nbytes() const { return view_.nbytes(); }
  bool defined() const { return storage_ != nullptr; }
  const std::shared_ptr<void>& storage() const { return storage_; }
  Tensor clone() const;

 private:
  TensorView view_;
  std::shared_ptr<void> storage_;
};


}  // namespace switchyard
