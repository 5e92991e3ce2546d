// Where a job's MoE layer runs (bench moe --device, the moe-train job's
// moe.device): the host, or this rank's GPU through CudaOps (moe/cuda), the
// expert group moved to that GPU's memory: nccl when every rank is its own
// process and the build has NCCL, else staged over the world's host backend
// (thread-ranks then share the GPUs).
#pragma once

#include <memory>
#include <string>

#include "comm/communicator.h"
#include "moe/ops.h"

namespace switchyard {

struct MoEDevice {
  std::shared_ptr<MoEOps> ops;          // null: the layer's default (host) ops
  std::shared_ptr<Communicator> group;  // the expert group those ops need
  std::shared_ptr<Communicator> host_group;  // the same ranks over host memory (MoELayer's host values)
  std::string description;              // "cpu", "cuda:0 (NVIDIA H200, ...) over nccl"
  bool on_device() const { return ops != nullptr; }
};

// device: "cpu" or "cuda". field names the option in errors ("--device",
// "moe.device"). local_rank / local_size: this rank's place on its node (GPU
// local_rank mod the GPUs; more processes per node than GPUs share them over
// staged, since NCCL takes one rank per GPU). Throws NotSupported "built
// without CUDA" or "no CUDA device" when the GPU cannot be used. Collective
// over `world` for cuda; the groups take world's timeout.
MoEDevice make_moe_device(const std::string& device, const std::shared_ptr<Communicator>& world,
                          const std::string& field, int local_rank, int local_size);

}  // namespace switchyard
