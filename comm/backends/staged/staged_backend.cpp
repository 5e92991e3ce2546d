#include "comm/backends/staged/staged_backend.h"

#include <algorithm>
#include <chrono>
#include <vector>

#include "core/error.h"

namespace switchyard {
namespace {

// Outer buffers live in `outer_memory`; the inner communicator takes the other side's.
class StagedCommunicator final : public Communicator {
 public:
  // device_outer: the outer buffers are the device's (over a host communicator), else the host's.
  StagedCommunicator(std::shared_ptr<Communicator> inner, std::shared_ptr<DeviceMemory> memory, bool device_outer)
      : Communicator(inner->rank(), inner->size(), inner->name() + (device_outer ? "/staged" : "/host")),
        inner_(std::move(inner)),
        memory_(std::move(memory)),
        device_outer_(device_outer) {}
  ~StagedCommunicator() override { shutdown_executor(); }

  std::string_view backend_name() const override { return device_outer_ ? "staged" : "host-staged"; }
  std::shared_ptr<Communicator> split(int color, int key, const OpOptions& opts) override {
    auto child = inner_->split(color, key, opts);
    return child ? std::make_shared<StagedCommunicator>(child, memory_, device_outer_) : nullptr;
  }

 protected:
  Device memory_device() const override { return device_outer_ ? memory_->device() : Device::cpu(); }
  // Bodies run on the calling thread (whose queued device work they follow) and finish there.
  bool stream_ordered() const override { return true; }
  std::shared_ptr<WorkState> stream_work(WorkLabel label, std::vector<std::shared_ptr<void>>) override {
    auto state = std::make_shared<WorkState>(std::move(label));
    state->complete();
    return state;
  }
  Transport& transport() override { SY_THROW(NotSupported, "backend ", backend_name(), " has no transport of its own"); }
  std::shared_ptr<Communicator> do_create_group(const std::vector<int>& members, uint64_t, const std::string& name,
                                                const OpContext&) override {
    return std::make_shared<StagedCommunicator>(inner_->create_group(members, name), memory_, device_outer_);
  }

  void do_allreduce(const TensorView& in, const TensorView& out, ReduceOp op, const OpContext& ctx) override {
    Tensor t = across(in);
    finish(ctx, inner_->allreduce(t, t, {.op = op}));
    back(out, t);
  }
  void do_reduce_scatter(const TensorView& in, const TensorView& out, ReduceOp op, const OpContext& ctx) override {
    Tensor t = across(in), r = inner_tensor(out);
    finish(ctx, inner_->reduce_scatter(t, r, {.op = op}));
    back(out, r);
  }
  void do_allgatherv(const TensorView& in, const TensorView& out, std::span<const int64_t> counts,
                     const OpContext& ctx) override {
    Tensor t = across(in), r = inner_tensor(out);
    finish(ctx, inner_->allgatherv(t, r, std::vector<int64_t>(counts.begin(), counts.end())));
    back(out, r);
  }
  void do_allgather(const TensorView& in, const TensorView& out, const OpContext& ctx) override {
    Tensor t = across(in), r = inner_tensor(out);
    finish(ctx, inner_->allgather(t, r));
    back(out, r);
  }
  void do_alltoallv(const TensorView& in, std::span<const int64_t> send_counts, const TensorView& out,
                    std::span<const int64_t> recv_counts, const OpContext& ctx) override {
    Tensor t = across(in), r = inner_tensor(out);
    finish(ctx, inner_->alltoallv(t, std::vector<int64_t>(send_counts.begin(), send_counts.end()), r,
                             std::vector<int64_t>(recv_counts.begin(), recv_counts.end())));
    back(out, r);
  }
  void do_alltoall(const TensorView& in, const TensorView& out, const OpContext& ctx) override {
    Tensor t = across(in), r = inner_tensor(out);
    finish(ctx, inner_->alltoall(t, r));
    back(out, r);
  }
  void do_broadcast(const TensorView& buffer, int root, const OpContext& ctx) override {
    Tensor t = across(buffer);
    finish(ctx, inner_->broadcast(t, root));
    back(buffer, t);
  }
  void do_send(const TensorView& buffer, int peer, uint32_t tag, const OpContext& ctx) override {
    finish(ctx, inner_->send(across(buffer), peer, {.tag = tag}));
  }
  void do_recv(const TensorView& buffer, int peer, uint32_t tag, const OpContext& ctx) override {
    Tensor r = inner_tensor(buffer);
    finish(ctx, inner_->recv(r, peer, {.tag = tag}));
    back(buffer, r);
  }
  void do_sendrecv(const TensorView& send_buffer, int to, const TensorView& recv_buffer, int from, uint32_t tag,
                   const OpContext& ctx) override {
    Tensor r = inner_tensor(recv_buffer);
    finish(ctx, inner_->sendrecv(across(send_buffer), to, r, from, {.tag = tag}));
    back(recv_buffer, r);
  }
  void do_barrier(const OpContext& ctx) override { finish(ctx, inner_->barrier()); }

 private:
  // The host blocks until the inner op is done (a device communicator's plain
  // wait only orders streams), by the outer op's deadline.
  static void finish(const OpContext& ctx, Work work) {
    const auto left = std::chrono::duration_cast<Milliseconds>(ctx.deadline - Clock::now());
    work.wait(std::max(left, Milliseconds(1)));
  }
  Tensor inner_tensor(const TensorView& like) const {
    return device_outer_ ? Tensor::empty(like.shape(), like.dtype()) : memory_->allocate(like.shape(), like.dtype());
  }
  // An outer buffer's contents as the inner side holds them.
  Tensor across(const TensorView& t) const {
    Tensor inner = inner_tensor(t);
    if (device_outer_)
      memory_->to_host(inner.data(), t.data(), static_cast<int64_t>(t.nbytes()));
    else
      memory_->from_host(inner.data(), t.data(), static_cast<int64_t>(t.nbytes()));
    return inner;
  }
  void back(const TensorView& t, const Tensor& inner) const {
    if (device_outer_)
      memory_->from_host(t.data(), inner.data(), static_cast<int64_t>(t.nbytes()));
    else
      memory_->to_host(t.data(), inner.data(), static_cast<int64_t>(t.nbytes()));
  }

  std::shared_ptr<Communicator> inner_;
  std::shared_ptr<DeviceMemory> memory_;
  bool device_outer_;
};

}  // namespace

std::shared_ptr<Communicator> make_staged_communicator(std::shared_ptr<Communicator> host,
                                                       std::shared_ptr<DeviceMemory> memory) {
  SY_CHECK(host != nullptr && memory != nullptr, "make_staged_communicator needs a host communicator and a memory");
  return std::make_shared<StagedCommunicator>(std::move(host), std::move(memory), true);
}

std::shared_ptr<Communicator> make_host_buffer_communicator(std::shared_ptr<Communicator> device,
                                                            std::shared_ptr<DeviceMemory> memory) {
  SY_CHECK(device != nullptr && memory != nullptr,
           "make_host_buffer_communicator needs a device communicator and its memory");
  return std::make_shared<StagedCommunicator>(std::move(device), std::move(memory), false);
}

}  // namespace switchyard
