#include "comm/backends/nccl/nccl_backend.h"

#include <nccl.h>

#include <cstring>
#include <deque>
#include <thread>

#include "core/error.h"
#include "core/logging.h"
#include "kernels/cuda/runtime.h"

namespace switchyard {
namespace {

void check_nccl(ncclResult_t status, const char* call, ncclComm_t comm = nullptr) {
  if (status == ncclSuccess) return;
  const char* last = comm ? ncclGetLastError(comm) : ncclGetLastError(nullptr);
  SY_THROW(IoError, call, " failed: ", ncclGetErrorString(status), (last && *last ? ": " : ""), (last ? last : ""));
}
#define SY_NCCL_CHECK(call) check_nccl((call), #call)

ncclDataType_t nccl_type(DType t) {
  switch (t) {
    case DType::f32: return ncclFloat32;
    case DType::f64: return ncclFloat64;
    case DType::bf16: return ncclBfloat16;
    case DType::f16: return ncclFloat16;
    case DType::i32: return ncclInt32;
    case DType::i64: return ncclInt64;
    case DType::u8: return ncclUint8;
    case DType::fp8_e4m3: return ncclUint8;  // moved, never reduced
  }
  return ncclUint8;
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum: return ncclSum;
    case ReduceOp::max: return ncclMax;
    case ReduceOp::min: return ncclMin;
  }
  return ncclSum;
}

// Selects `device` for the scope (NCCL and CUDA calls act on the current device).
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    SY_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) SY_CUDA_CHECK(cudaSetDevice(device));
    changed_ = previous_ != device;
  }
  ~DeviceScope() {
    if (changed_) (void)cudaSetDevice(previous_);
  }

 private:
  int previous_ = 0;
  bool changed_ = false;
};

// The NCCL handle, shared by the communicator and its Works so that a Work's
// timeout can abort it; destroyed once, after the last user.
struct CommHandle {
  ncclComm_t comm = nullptr;
  int device = 0;
  std::atomic<bool> aborted{false};
  void abort() {
    if (!aborted.exchange(true)) (void)ncclCommAbort(comm);
  }
  ~CommHandle() {
    if (!aborted.load() && comm) {
      DeviceScope d(device);
      (void)ncclCommDestroy(comm);
    }
  }
};

struct Event {
  cudaEvent_t event = nullptr;
  explicit Event(int device) {
    DeviceScope d(device);
    SY_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  }
  ~Event() {
    if (event) (void)cudaEventDestroy(event);
  }
};

class NcclWork final : public WorkState {
 public:
  NcclWork(WorkLabel label, std::shared_ptr<Event> done, std::shared_ptr<CommHandle> handle)
      : WorkState(std::move(label)), done_(std::move(done)), handle_(std::move(handle)) {}

  bool wait(std::optional<Milliseconds> timeout) override {
    DeviceScope d(handle_->device);
    if (!timeout) {  // stream-ordered: the caller's stream waits, the host goes on
      SY_CUDA_CHECK(cudaStreamWaitEvent(cuda::current_stream(), done_->event, 0));
      return true;
    }
    const auto deadline = Clock::now() + *timeout;
    for (;;) {
      const cudaError_t status = cudaEventQuery(done_->event);
      if (status == cudaSuccess) return true;
      if (status != cudaErrorNotReady) SY_CUDA_CHECK(status);
      if (handle_->aborted.load())
        SY_THROW(IoError, description(), ": the NCCL communicator was aborted after an earlier failure");
      ncclResult_t async = ncclSuccess;
      SY_NCCL_CHECK(ncclCommGetAsyncError(handle_->comm, &async));
      if (async != ncclSuccess && async != ncclInProgress) {
        const std::string last = ncclGetLastError(handle_->comm);
        handle_->abort();
        SY_THROW(IoError, description(), ": NCCL reported ", ncclGetErrorString(async), last.empty() ? "" : ": ", last);
      }
      if (Clock::now() >= deadline) {
        handle_->abort();  // a peer that never joins would otherwise hold the stream forever
        return false;      // Work::wait throws TimeoutError naming the op
      }
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

  bool test() override {
    if (handle_->aborted.load())
      SY_THROW(IoError, description(), ": the NCCL communicator was aborted after an earlier failure");
    const cudaError_t status = cudaEventQuery(done_->event);
    if (status == cudaErrorNotReady) return false;
    SY_CUDA_CHECK(status);
    return true;
  }

 private:
  std::shared_ptr<Event> done_;
  std::shared_ptr<CommHandle> handle_;
};

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(ncclComm_t comm, int rank, int size, int device, std::string name)
      : Communicator(rank, size, std::move(name)), handle_(std::make_shared<CommHandle>()), ready_(device) {
    handle_->comm = comm;
    handle_->device = device;
    DeviceScope d(device);
    // Non-blocking: the legacy default stream does not serialise with it.
    SY_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  }

  ~NcclCommunicator() override {
    shutdown_executor();
    DeviceScope d(handle_->device);
    if (!handle_->aborted.load()) (void)cudaStreamSynchronize(stream_);
    in_flight_.clear();  // buffers released once the stream has finished with them
    (void)cudaStreamDestroy(stream_);
  }

  std::string_view backend_name() const override { return "nccl"; }

  std::shared_ptr<Communicator> split(int color, int key, const OpOptions& opts) override {
    DeviceScope d(handle_->device);
    ncclComm_t child = nullptr;
    SY_NCCL_CHECK(ncclCommSplit(handle_->comm, color < 0 ? NCCL_SPLIT_NOCOLOR : color, key, &child, nullptr));
    if (color < 0) return nullptr;
    int rank = 0, size = 0;
    SY_NCCL_CHECK(ncclCommUserRank(child, &rank));
    SY_NCCL_CHECK(ncclCommCount(child, &size));
    return std::make_shared<NcclCommunicator>(child, rank, size, handle_->device,
                                              name() + "/split" + std::to_string(color));
  }

 protected:
  Device memory_device() const override { return Device::cuda(handle_->device); }
  bool stream_ordered() const override { return true; }

  std::shared_ptr<WorkState> stream_work(WorkLabel label, std::vector<std::shared_ptr<void>> owners) override {
    auto done = std::make_shared<Event>(handle_->device);
    SY_CUDA_CHECK(cudaEventRecord(done->event, stream_));
    reap();
    if (!owners.empty()) in_flight_.push_back({done, std::move(owners)});
    return std::make_shared<NcclWork>(std::move(label), std::move(done), handle_);
  }

  Transport& transport() override {
    SY_THROW(NotSupported, "backend nccl has no host transport (its ops are native NCCL calls)");
  }

  std::shared_ptr<Communicator> do_create_group(const std::vector<int>& members, uint64_t, const std::string& name,
                                                const OpContext&) override {
    // The first member makes a unique id and sends it to the others over this communicator.
    const int me = static_cast<int>(std::find(members.begin(), members.end(), rank()) - members.begin());
    Tensor id_host = Tensor::empty({static_cast<int64_t>(sizeof(ncclUniqueId))}, DType::u8);
    if (me == 0) {
      ncclUniqueId id;
      SY_NCCL_CHECK(ncclGetUniqueId(&id));
      std::memcpy(id_host.data(), &id, sizeof id);
    }
    if (members.size() > 1) {
      DeviceScope d(handle_->device);
      cuda::StreamGuard on(stream_);
      Tensor id_device = cuda::to_device(id_host, handle_->device);
      SY_NCCL_CHECK(ncclGroupStart());
      for (size_t i = 1; i < members.size(); ++i)
        if (me == 0) SY_NCCL_CHECK(ncclSend(id_device.data(), sizeof(ncclUniqueId), ncclUint8, members[i], handle_->comm, stream_));
      if (me != 0) SY_NCCL_CHECK(ncclRecv(id_device.data(), sizeof(ncclUniqueId), ncclUint8, members[0], handle_->comm, stream_));
      SY_NCCL_CHECK(ncclGroupEnd());
      id_host = cuda::to_host(id_device);  // synchronises stream_
    }
    ncclUniqueId id;
    std::memcpy(&id, id_host.data(), sizeof id);
    ncclComm_t child = nullptr;
    {
      DeviceScope d(handle_->device);
      SY_NCCL_CHECK(ncclCommInitRank(&child, static_cast<int>(members.size()), id, me));
    }
    return std::make_shared<NcclCommunicator>(child, me, static_cast<int>(members.size()), handle_->device,
                                              name.empty() ? this->name() + "/group" : name);
  }

  void do_allreduce(const TensorView& in, const TensorView& out, ReduceOp op, const OpContext&) override {
    Ordered o(*this);
    SY_NCCL_CHECK(ncclAllReduce(in.data(), out.data(), static_cast<size_t>(in.numel()), nccl_type(in.dtype()),
                                nccl_op(op), comm(), stream_));
    count_direct_allreduce(in);
  }
  void do_reduce_scatter(const TensorView& in, const TensorView& out, ReduceOp op, const OpContext&) override {
    Ordered o(*this);
    SY_NCCL_CHECK(ncclReduceScatter(in.data(), out.data(), static_cast<size_t>(out.numel()), nccl_type(in.dtype()),
                                    nccl_op(op), comm(), stream_));
    count_direct_reduce_scatter(out);
  }
  void do_allgather(const TensorView& in, const TensorView& out, const OpContext&) override {
    Ordered o(*this);
    SY_NCCL_CHECK(ncclAllGather(in.data(), out.data(), in.nbytes(), ncclUint8, comm(), stream_));
    std::vector<int64_t> counts(static_cast<size_t>(size()), in.numel());
    count_direct_allgatherv(in, counts);
  }
  void do_allgatherv(const TensorView& in, const TensorView& out, std::span<const int64_t> counts,
                     const OpContext&) override {
    Ordered o(*this);
    const size_t es = in.element_size();
    SY_NCCL_CHECK(ncclGroupStart());
    size_t offset = 0;
    for (int p = 0; p < size(); ++p) {
      const size_t bytes = static_cast<size_t>(counts[p]) * es;
      // Every rank's block reaches every rank: my block to all, theirs from each.
      if (in.nbytes()) SY_NCCL_CHECK(ncclSend(in.data(), in.nbytes(), ncclUint8, p, comm(), stream_));
      if (bytes) SY_NCCL_CHECK(ncclRecv(static_cast<char*>(out.data()) + offset, bytes, ncclUint8, p, comm(), stream_));
      offset += bytes;
    }
    SY_NCCL_CHECK(ncclGroupEnd());
    count_direct_allgatherv(in, counts);
  }
  void do_alltoall(const TensorView& in, const TensorView& out, const OpContext& ctx) override {
    const int64_t block = in.numel() / size();
    std::vector<int64_t> counts(static_cast<size_t>(size()), block);
    do_alltoallv(in, counts, out, counts, ctx);
  }
  void do_alltoallv(const TensorView& in, std::span<const int64_t> send_counts, const TensorView& out,
                    std::span<const int64_t> recv_counts, const OpContext&) override {
    Ordered o(*this);
    const size_t es = in.element_size();
    SY_NCCL_CHECK(ncclGroupStart());
    size_t send_offset = 0, recv_offset = 0;
    for (int p = 0; p < size(); ++p) {
      const size_t sb = static_cast<size_t>(send_counts[p]) * es, rb = static_cast<size_t>(recv_counts[p]) * es;
      if (sb) SY_NCCL_CHECK(ncclSend(static_cast<const char*>(in.data()) + send_offset, sb, ncclUint8, p, comm(), stream_));
      if (rb) SY_NCCL_CHECK(ncclRecv(static_cast<char*>(out.data()) + recv_offset, rb, ncclUint8, p, comm(), stream_));
      send_offset += sb;
      recv_offset += rb;
    }
    SY_NCCL_CHECK(ncclGroupEnd());
    count_direct_alltoallv(es, send_counts, recv_counts);
  }
  void do_broadcast(const TensorView& buffer, int root, const OpContext&) override {
    Ordered o(*this);
    SY_NCCL_CHECK(ncclBroadcast(buffer.data(), buffer.data(), buffer.nbytes(), ncclUint8, root, comm(), stream_));
    count_direct_broadcast(buffer, root);
  }
  // NCCL matches point-to-point by order per peer, not by tag: tags are accepted and ignored.
  void do_send(const TensorView& buffer, int peer, uint32_t, const OpContext&) override {
    Ordered o(*this);
    SY_NCCL_CHECK(ncclSend(buffer.data(), buffer.nbytes(), ncclUint8, peer, comm(), stream_));
    count_peer_bytes(peer, buffer.nbytes(), 0);
  }
  void do_recv(const TensorView& buffer, int peer, uint32_t, const OpContext&) override {
    Ordered o(*this);
    SY_NCCL_CHECK(ncclRecv(buffer.data(), buffer.nbytes(), ncclUint8, peer, comm(), stream_));
    count_peer_bytes(peer, 0, buffer.nbytes());
  }
  void do_sendrecv(const TensorView& send_buffer, int to, const TensorView& recv_buffer, int from, uint32_t,
                   const OpContext&) override {
    Ordered o(*this);
    SY_NCCL_CHECK(ncclGroupStart());
    if (send_buffer.nbytes()) SY_NCCL_CHECK(ncclSend(send_buffer.data(), send_buffer.nbytes(), ncclUint8, to, comm(), stream_));
    if (recv_buffer.nbytes())
      SY_NCCL_CHECK(ncclRecv(recv_buffer.data(), recv_buffer.nbytes(), ncclUint8, from, comm(), stream_));
    SY_NCCL_CHECK(ncclGroupEnd());
    count_peer_bytes(to, send_buffer.nbytes(), 0);
    count_peer_bytes(from, 0, recv_buffer.nbytes());
  }
  void do_barrier(const OpContext&) override {
    Ordered o(*this);
    if (!barrier_word_.defined()) {
      cuda::StreamGuard on(stream_);
      barrier_word_ = cuda::zeros({1}, DType::i32, handle_->device);
    }
    SY_NCCL_CHECK(ncclAllReduce(barrier_word_.data(), barrier_word_.data(), 1, ncclInt32, ncclSum, comm(), stream_));
  }

 private:
  ncclComm_t comm() const { return handle_->comm; }

  // Queues an op behind the issuing thread's stream: the op's inputs are
  // whatever that stream has produced when the op is issued.
  struct Ordered {
    explicit Ordered(NcclCommunicator& c) : device(c.handle_->device) {
      if (c.handle_->aborted.load()) SY_THROW(IoError, "the NCCL communicator '", c.name(), "' was aborted");
      SY_CUDA_CHECK(cudaEventRecord(c.ready_.event, cuda::current_stream()));
      SY_CUDA_CHECK(cudaStreamWaitEvent(c.stream_, c.ready_.event, 0));
    }
    DeviceScope device;
  };

  // Releases the buffers of ops the device has finished.
  void reap() {
    while (!in_flight_.empty() && cudaEventQuery(in_flight_.front().done->event) == cudaSuccess) in_flight_.pop_front();
    (void)cudaGetLastError();  // cudaErrorNotReady is not an error
  }

  std::shared_ptr<CommHandle> handle_;
  Event ready_;
  cudaStream_t stream_ = nullptr;
  struct InFlight {
    std::shared_ptr<Event> done;
    std::vector<std::shared_ptr<void>> owners;
  };
  std::deque<InFlight> in_flight_;
  Tensor barrier_word_;
};

std::shared_ptr<Communicator> init_from_id(const ncclUniqueId& id, int rank, int size, int device, std::string name) {
  if (device < 0 || device >= cuda::device_count())
    SY_THROW(InvalidArgument, "nccl: device = ", device, ", expected 0..", cuda::device_count() - 1,
             " (the CUDA devices of this machine)");
  ncclComm_t comm = nullptr;
  {
    DeviceScope d(device);
    SY_NCCL_CHECK(ncclCommInitRank(&comm, size, id, rank));
  }
  SY_LOG_DEBUG("comm", "nccl communicator '", name, "' rank ", rank, "/", size, " on cuda:", device);
  return std::make_shared<NcclCommunicator>(comm, rank, size, device, std::move(name));
}

}  // namespace

std::shared_ptr<Communicator> make_nccl_communicator(Communicator& bootstrap, int device, std::string name) {
  Tensor id = Tensor::empty({static_cast<int64_t>(sizeof(ncclUniqueId))}, DType::u8);
  if (bootstrap.rank() == 0) {
    ncclUniqueId made;
    SY_NCCL_CHECK(ncclGetUniqueId(&made));
    std::memcpy(id.data(), &made, sizeof made);
  }
  bootstrap.broadcast(id, 0).wait();
  ncclUniqueId unique;
  std::memcpy(&unique, id.data(), sizeof unique);
  return init_from_id(unique, bootstrap.rank(), bootstrap.size(), device, std::move(name));
}

std::shared_ptr<Communicator> make_nccl_communicator(Store& store, const std::string& key, int rank, int size,
                                                     int device, std::chrono::milliseconds timeout, std::string name) {
  ncclUniqueId unique;
  if (rank == 0) {
    SY_NCCL_CHECK(ncclGetUniqueId(&unique));
    const auto* bytes = reinterpret_cast<const uint8_t*>(&unique);
    store.set(key, Store::Bytes(bytes, bytes + sizeof unique));
  } else {
    const Store::Bytes bytes = store.get(key, timeout);
    if (bytes.size() != sizeof unique)
      SY_THROW(IoError, "nccl: store key '", key, "' holds ", bytes.size(), " bytes, expected an NCCL unique id of ",
               sizeof unique);
    std::memcpy(&unique, bytes.data(), sizeof unique);
  }
  return init_from_id(unique, rank, size, device, std::move(name));
}

std::string nccl_version() {
  int v = 0;
  SY_NCCL_CHECK(ncclGetVersion(&v));
  return std::to_string(v / 10000) + "." + std::to_string(v / 100 % 100) + "." + std::to_string(v % 100);
}

}  // namespace switchyard
