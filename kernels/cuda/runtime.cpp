#include "kernels/cuda/runtime.h"

#include <cstring>
#include <sstream>

#include "core/error.h"

namespace switchyard::cuda {

void check(cudaError_t status, const char* call, const char* file, int line) {
  if (status == cudaSuccess) return;
  SY_THROW(IoError, call, " failed at ", file, ":", line, ": ", cudaGetErrorName(status), ": ",
           cudaGetErrorString(status));
}

int device_count() {
  int n = 0;
  const cudaError_t status = cudaGetDeviceCount(&n);
  if (status == cudaErrorNoDevice || status == cudaErrorInsufficientDriver) {
    (void)cudaGetLastError();  // clear the sticky error so later checks see their own
    return 0;
  }
  SY_CUDA_CHECK(status);
  return n;
}

std::string describe_device(int device) {
  cudaDeviceProp p{};
  SY_CUDA_CHECK(cudaGetDeviceProperties(&p, device));
  int driver = 0, runtime = 0;
  SY_CUDA_CHECK(cudaDriverGetVersion(&driver));
  SY_CUDA_CHECK(cudaRuntimeGetVersion(&runtime));
  std::ostringstream s;
  s << p.name << ", sm_" << p.major << p.minor << ", " << p.multiProcessorCount << " SMs, " << std::fixed;
  s.precision(1);
  s << static_cast<double>(p.totalGlobalMem) / (1u << 30) << " GiB, L2 " << p.l2CacheSize / (1 << 20)
    << " MiB, driver " << driver / 1000 << "." << (driver % 1000) / 10 << ", runtime " << runtime / 1000 << "."
    << (runtime % 1000) / 10;
  return s.str();
}

namespace {
thread_local cudaStream_t tls_stream = nullptr;
}

cudaStream_t current_stream() { return tls_stream; }
StreamGuard::StreamGuard(cudaStream_t stream) : previous_(tls_stream) { tls_stream = stream; }
StreamGuard::~StreamGuard() { tls_stream = previous_; }

Tensor empty(Shape shape, DType dtype, int device) {
  const size_t bytes = static_cast<size_t>(shape_numel(shape)) * dtype_size(dtype);
  int previous = 0;
  SY_CUDA_CHECK(cudaGetDevice(&previous));
  if (previous != device) SY_CUDA_CHECK(cudaSetDevice(device));
  void* ptr = nullptr;
  cudaStream_t stream = current_stream();
  if (bytes) SY_CUDA_CHECK(cudaMallocAsync(&ptr, bytes, stream));
  if (previous != device) SY_CUDA_CHECK(cudaSetDevice(previous));
  // Freed on the stream current at free time: the owner's last user.
  std::shared_ptr<void> owner(ptr, [](void* p) {
    if (p) (void)cudaFreeAsync(p, current_stream());  // no throw from a deleter; errors show at the next check
  });
  return Tensor::adopt(TensorView(ptr, dtype, std::move(shape), Device::cuda(device)),
                       owner ? owner : std::shared_ptr<void>(std::make_shared<char>()));
}

Tensor zeros(Shape shape, DType dtype, int device) {
  Tensor t = empty(std::move(shape), dtype, device);
  if (t.nbytes()) SY_CUDA_CHECK(cudaMemsetAsync(t.data(), 0, t.nbytes(), current_stream()));
  return t;
}

namespace {
void check_contiguous(const TensorView& t, const char* what) {
  if (!t.is_contiguous())
    SY_THROW(InvalidArgument, "cuda copy: ", what, " must be contiguous, got shape ", shape_string(t.shape()));
}
}  // namespace

void copy(const TensorView& dst, const TensorView& src) {
  check_contiguous(dst, "dst");
  check_contiguous(src, "src");
  if (dst.nbytes() != src.nbytes() || dst.dtype() != src.dtype())
    SY_THROW(InvalidArgument, "cuda copy: dst is ", dtype_name(dst.dtype()), " ", shape_string(dst.shape()), ", src ",
             dtype_name(src.dtype()), " ", shape_string(src.shape()), "; expected the same dtype and size");
  if (!src.nbytes()) return;
  SY_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), src.nbytes(), cudaMemcpyDefault, current_stream()));
}

Tensor to_device(const TensorView& host, int device) {
  Tensor t = empty(host.shape(), host.dtype(), device);
  copy(t, host);
  return t;
}

Tensor to_host(const TensorView& t) {
  Tensor h = Tensor::empty(t.shape(), t.dtype());
  copy(h, t);
  SY_CUDA_CHECK(cudaStreamSynchronize(current_stream()));
  return h;
}

void fill_bytes(const TensorView& t, unsigned char value) {
  check_contiguous(t, "tensor");
  if (!t.nbytes()) return;
  if (t.device().is_cpu())
    std::memset(t.data(), value, t.nbytes());
  else
    SY_CUDA_CHECK(cudaMemsetAsync(t.data(), value, t.nbytes(), current_stream()));
}

namespace {
class CudaMemory final : public DeviceMemory {
 public:
  explicit CudaMemory(int device) : device_(device) {}
  Device device() const override { return Device::cuda(device_); }
  Tensor allocate(Shape shape, DType dtype) override { return empty(std::move(shape), dtype, device_); }
  void to_host(void* host, const void* device, int64_t bytes) override {
    if (bytes <= 0) return;
    SY_CUDA_CHECK(cudaMemcpyAsync(host, device, static_cast<size_t>(bytes), cudaMemcpyDefault, current_stream()));
    SY_CUDA_CHECK(cudaStreamSynchronize(current_stream()));
  }
  // No wait: an asynchronous copy from pageable memory has staged the bytes
  // when it returns, so the host buffer is free, and the stream orders the rest.
  void from_host(void* device, const void* host, int64_t bytes) override {
    if (bytes <= 0) return;
    SY_CUDA_CHECK(cudaMemcpyAsync(device, host, static_cast<size_t>(bytes), cudaMemcpyHostToDevice, current_stream()));
  }

 private:
  int device_;
};
}  // namespace

std::shared_ptr<DeviceMemory> device_memory(int device) { return std::make_shared<CudaMemory>(device); }

}  // namespace switchyard::cuda
