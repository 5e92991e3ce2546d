#include "core/device_memory.h"

#include <cstring>

#include "core/allocator.h"
#include "core/error.h"

namespace switchyard {
namespace {

// An address bit no user pointer has and the hardware does not ignore:
// x86-64: bit 62 is non-canonical (unless LAM masks it, which HWASan-style
// tagging turns on); AArch64 Linux ignores the top byte (TBI), so bit 55
// (which selects the kernel's half) is used there instead.
#if defined(__aarch64__)
constexpr uintptr_t kIsolatedTag = uintptr_t{1} << 55;
#else
constexpr uintptr_t kIsolatedTag = uintptr_t{1} << 62;
#endif

void* tag(void* p) { return reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(p) | kIsolatedTag); }

class IsolatedMemory final : public DeviceMemory {
 public:
  Device device() const override { return Device::isolated(); }
  Tensor allocate(Shape shape, DType dtype) override {
    const size_t bytes = static_cast<size_t>(shape_numel(shape)) * dtype_size(dtype);
    std::shared_ptr<void> storage = allocate_host(bytes > 0 ? bytes : 1);
    return Tensor::adopt(TensorView(tag(storage.get()), dtype, std::move(shape), Device::isolated()), storage);
  }
  void to_host(void* host, const void* device, int64_t bytes) override {
    if (bytes > 0) std::memcpy(host, isolated_address(device, "to_host source"), static_cast<size_t>(bytes));
  }
  void from_host(void* device, const void* host, int64_t bytes) override {
    if (bytes > 0) std::memcpy(isolated_address(device, "from_host destination"), host, static_cast<size_t>(bytes));
  }
};

}  // namespace

bool is_isolated_address(const void* p) { return (reinterpret_cast<uintptr_t>(p) & kIsolatedTag) != 0; }

void* isolated_address(const void* p, const char* what) {
  if (p == nullptr) return nullptr;
  if (!is_isolated_address(p))
    SY_THROW(InvalidArgument, "isolated device: ", what, " is the host address ", p,
             ", expected isolated (device) memory; device code was given host data");
  return reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(p) & ~kIsolatedTag);
}

std::shared_ptr<DeviceMemory> isolated_memory() {
  static const std::shared_ptr<DeviceMemory> memory = std::make_shared<IsolatedMemory>();
  return memory;
}

}  // namespace switchyard
