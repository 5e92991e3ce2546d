#include "launch/moe_device.h"

#include <dlfcn.h>

#include <filesystem>

#include "core/config.h"
#include "core/error.h"

namespace switchyard {

#if SWITCHYARD_DEVICE_CUDA_LINKED
extern "C" void switchyard_make_cuda_moe_device(const std::shared_ptr<Communicator>*, const std::string*, int, int,
                                                MoEDevice*);
#endif

MoEDevice make_moe_device(const std::string& device, const std::shared_ptr<Communicator>& world,
                          const std::string& field, int local_rank, int local_size) {
  if (device == "cpu") return {nullptr, world, world, "cpu"};
  if (device != "cuda") SY_THROW(ConfigError, field, " = '", device, "', expected cpu or cuda");
  if (!SWITCHYARD_HAS_CUDA)
    SY_THROW(NotSupported, field, " = cuda: this switchyard was built without CUDA (configure with "
             "-DSWITCHYARD_WITH_CUDA=ON and the CUDA toolkit)");
  using Make = void (*)(const std::shared_ptr<Communicator>*, const std::string*, int, int, MoEDevice*);
#if SWITCHYARD_DEVICE_CUDA_LINKED
  static Make make = &switchyard_make_cuda_moe_device;
#else
  // The CUDA half lives beside this library (launch/moe_device_cuda.cpp), loaded on first use.
  static Make make = [] {
    Dl_info self{};
    if (dladdr(reinterpret_cast<void*>(&make_moe_device), &self) == 0 || self.dli_fname == nullptr)
      SY_THROW(IoError, "cannot find the directory of the switchyard libraries (dladdr failed)");
    const std::string path =
        (std::filesystem::path(self.dli_fname).parent_path() / "libswitchyard_device_cuda.so").string();
    void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!handle) SY_THROW(NotSupported, "cannot load the CUDA half of switchyard (", path, "): ", dlerror());
    auto* fn = reinterpret_cast<Make>(dlsym(handle, "switchyard_make_cuda_moe_device"));
    if (!fn) SY_THROW(NotSupported, path, " has no switchyard_make_cuda_moe_device: ", dlerror());
    return fn;
  }();
#endif
  MoEDevice d;
  make(&world, &field, local_rank, local_size, &d);
  return d;
}

}  // namespace switchyard
