// Per-op options and the buffers a collective takes.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>

#include "core/tensor.h"
#include "kernels/reduce.h"

namespace switchyard {

using Clock = std::chrono::steady_clock;
using Milliseconds = std::chrono::milliseconds;

// Which implementation runs an op: the backend's own (MPI_Ialltoall ...) or
// the generic algorithm from comm/algorithms over the backend's send/recv.
enum class Algorithm : uint8_t { automatic, native, generic };

struct OpOptions {
  // How long the op may run once it starts on the executor; unset: the
  // communicator's default (SWITCHYARD_COMM_TIMEOUT_MS or its config).
  std::optional<Milliseconds> timeout;
  // User tag for send/recv matching, below kMaxUserTag.
  uint32_t tag = 0;
  Algorithm algorithm = Algorithm::automatic;
};
inline constexpr uint32_t kMaxUserTag = 1u << 24;

struct ReduceOptions : OpOptions {
  ReduceOp op = ReduceOp::sum;
};

// A tensor argument plus, optionally, its owner. Passing a Tensor keeps the
// storage alive until the op's Work completes; a TensorView leaves that to the caller.
struct Buffer {
  TensorView view;
  std::shared_ptr<void> owner;
  Buffer(const TensorView& v) : view(v) {}                          // NOLINT: implicit on purpose
  Buffer(const Tensor& t) : view(t.view()), owner(t.storage()) {}  // NOLINT: implicit on purpose
};

}  // namespace switchyard
