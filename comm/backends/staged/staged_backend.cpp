#include "comm/backends/staged/staged_backend.h"

#include "core/error.h"
#include "kernels/cuda/runtime.h"

namespace switchyard {
namespace {

class StagedCommunicator final : public Communicator {
 public:
  StagedCommunicator(std::shared_ptr<Communicator> host, int device)
      : Communicator(host->rank(), host->size(), host->name() + "/staged"), host_(std::move(host)), device_(device) {}
  ~StagedCommunicator() override { shutdown_executor(); }

  std::string_view backend_name() const override { return "staged"; }

  std::shared_ptr<Communicator> split(int color, int key, const OpOptions& opts) override {
    auto child = host_->split(color, key, opts);
    return child ? std::make_shared<StagedCommunicator>(child, device_) : nullptr;
  }

 protected:
  Device memory_device() const override { return Device::cuda(device_); }
  bool stream_ordered() const override { return true; }
  // The op has finished on the host and its results are queued on the caller's stream.
  std::shared_ptr<WorkState> stream_work(WorkLabel label, std::vector<std::shared_ptr<void>>) override {
    auto state = std::make_shared<WorkState>(std::move(label));
    state->complete();
    return state;
  }
  Transport& transport() override { SY_THROW(NotSupported, "backend staged has no transport of its own"); }
  std::shared_ptr<Communicator> do_create_group(const std::vector<int>& members, uint64_t, const std::string& name,
                                                const OpContext&) override {
    return std::make_shared<StagedCommunicator>(host_->create_group(members, name), device_);
  }

  void do_allreduce(const TensorView& in, const TensorView& out, ReduceOp op, const OpContext&) override {
    Tensor h = down(in);
    host_->allreduce(h, h, {.op = op}).wait();
    up(out, h);
  }
  void do_reduce_scatter(const TensorView& in, const TensorView& out, ReduceOp op, const OpContext&) override {
    Tensor h = down(in), r = Tensor::empty(out.shape(), out.dtype());
    host_->reduce_scatter(h, r, {.op = op}).wait();
    up(out, r);
  }
  void do_allgatherv(const TensorView& in, const TensorView& out, std::span<const int64_t> counts,
                     const OpContext&) override {
    Tensor h = down(in), r = Tensor::empty(out.shape(), out.dtype());
    host_->allgatherv(h, r, std::vector<int64_t>(counts.begin(), counts.end())).wait();
    up(out, r);
  }
  void do_allgather(const TensorView& in, const TensorView& out, const OpContext&) override {
    Tensor h = down(in), r = Tensor::empty(out.shape(), out.dtype());
    host_->allgather(h, r).wait();
    up(out, r);
  }
  void do_alltoallv(const TensorView& in, std::span<const int64_t> send_counts, const TensorView& out,
                    std::span<const int64_t> recv_counts, const OpContext&) override {
    Tensor h = down(in), r = Tensor::empty(out.shape(), out.dtype());
    host_->alltoallv(h, std::vector<int64_t>(send_counts.begin(), send_counts.end()), r,
                     std::vector<int64_t>(recv_counts.begin(), recv_counts.end()))
        .wait();
    up(out, r);
  }
  void do_alltoall(const TensorView& in, const TensorView& out, const OpContext&) override {
    Tensor h = down(in), r = Tensor::empty(out.shape(), out.dtype());
    host_->alltoall(h, r).wait();
    up(out, r);
  }
  void do_broadcast(const TensorView& buffer, int root, const OpContext&) override {
    Tensor h = down(buffer);
    host_->broadcast(h, root).wait();
    up(buffer, h);
  }
  void do_send(const TensorView& buffer, int peer, uint32_t tag, const OpContext&) override {
    host_->send(down(buffer), peer, {.tag = tag}).wait();
  }
  void do_recv(const TensorView& buffer, int peer, uint32_t tag, const OpContext&) override {
    Tensor r = Tensor::empty(buffer.shape(), buffer.dtype());
    host_->recv(r, peer, {.tag = tag}).wait();
    up(buffer, r);
  }
  void do_sendrecv(const TensorView& send_buffer, int to, const TensorView& recv_buffer, int from, uint32_t tag,
                   const OpContext&) override {
    Tensor r = Tensor::empty(recv_buffer.shape(), recv_buffer.dtype());
    host_->sendrecv(down(send_buffer), to, r, from, {.tag = tag}).wait();
    up(recv_buffer, r);
  }
  void do_barrier(const OpContext&) override {
    SY_CUDA_CHECK(cudaStreamSynchronize(cuda::current_stream()));
    host_->barrier().wait();
  }

 private:
  // The caller's device data as of now, on the host (waits for the stream).
  Tensor down(const TensorView& t) const {
    Tensor h = Tensor::empty(t.shape(), t.dtype());
    SY_CUDA_CHECK(cudaSetDevice(device_));
    cuda::copy(h, t);
    SY_CUDA_CHECK(cudaStreamSynchronize(cuda::current_stream()));
    return h;
  }
  // Host results back; synchronous, so the staging tensor may go after it.
  void up(const TensorView& t, const Tensor& h) const {
    cuda::copy(t, h);
    SY_CUDA_CHECK(cudaStreamSynchronize(cuda::current_stream()));
  }

  std::shared_ptr<Communicator> host_;
  int device_;
};

}  // namespace

std::shared_ptr<Communicator> make_staged_device_communicator(std::shared_ptr<Communicator> host, int device) {
  SY_CHECK(host != nullptr, "make_staged_device_communicator needs a host communicator");
  return std::make_shared<StagedCommunicator>(std::move(host), device);
}

}  // namespace switchyard
