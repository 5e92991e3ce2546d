// A device's memory as the host reaches it: allocation and synchronous copies
// to and from host memory. The staged communicators (comm/staged.h) carry
// device buffers over a host communicator, and host buffers over a device
// one, with it; MoEOps implementations (moe/ops.h) have one.
#pragma once

#include <cstdint>
#include <memory>

#include "core/tensor.h"

namespace switchyard {

class DeviceMemory {
 public:
  virtual ~DeviceMemory() = default;
  virtual Device device() const = 0;
  virtual Tensor allocate(Shape shape, DType dtype) = 0;  // contents undefined
  // to_host is synchronous: on return the bytes are in `host` (after the
  // device work the calling thread queued before). from_host is ordered
  // before the device work queued after it and `host` may be reused on
  // return, but the host does not wait for the device.
  virtual void to_host(void* host, const void* device, int64_t bytes) = 0;
  virtual void from_host(void* device, const void* host, int64_t bytes) = 0;
};

// Isolated memory: host memory handed out at addresses the host cannot
// dereference (a tag bit the hardware faults on: a read or write faults at
// once; x86-64 without linear-address masking, AArch64 Linux). Code
// that must reach a device's memory only through its ops and copies runs on
// it without a GPU, and any direct host access shows as a crash at the line
// that made it. Ops translate with isolated_address.
std::shared_ptr<DeviceMemory> isolated_memory();
// The real address of isolated memory (null stays null); throws naming `what`
// when `p` is not isolated memory, such as a host pointer given to device code.
void* isolated_address(const void* p, const char* what);
bool is_isolated_address(const void* p);

}  // namespace switchyard
