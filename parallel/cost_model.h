// Device and cluster models for the emulated backend and the planner: what a
// compute phase costs on a given accelerator (GEMM FLOPs over a rate,
// memory-bound kernels bytes over a bandwidth), and the links between ranks
// (comm/backends/emulated). Presets come from YAML (configs/clusters/).
#pragma once

#include <string>

#include "comm/backends/emulated/emulated_backend.h"

namespace switchyard {

struct DeviceModel {
  double gemm_flops_f32 = 1e11;   // FLOP/s achieved by fp32-input GEMMs (TF32 on tensor-core GPUs)
  double gemm_flops_bf16 = 2e11;  // FLOP/s achieved by bf16 GEMMs with fp32 accumulation
  double memory_bandwidth = 1e10; // bytes/s achieved by streaming kernels (copies, gathers, activations)
  double gemm_seconds(double flops, bool bf16) const { return flops / (bf16 ? gemm_flops_bf16 : gemm_flops_f32); }
  double memory_seconds(double bytes) const { return bytes / memory_bandwidth; }
};

struct ClusterModel {
  std::string name;
  std::string description;  // hardware and where the figures come from
  DeviceModel device;
  LinkModel link;           // link.ranks_per_node: GPUs per node of the preset
};

}  // namespace switchyard
