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
  double gemm_flops_fp8 = 0;      // FLOP/s achieved by fp8 GEMMs (0: the device has none)
  double memory_bandwidth = 1e10; // bytes/s achieved by streaming kernels (copies, gathers, activations)
  double memory_capacity = 0;     // bytes of device memory (HBM) per rank; 0: unbounded
  double gemm_seconds(double flops, bool bf16) const { return flops / (bf16 ? gemm_flops_bf16 : gemm_flops_f32); }
  double memory_seconds(double bytes) const { return bytes / memory_bandwidth; }
  // A kernel at its roofline: the longer of its FLOPs at the GEMM rate and
  // its bytes at the memory bandwidth.
  double kernel_seconds(double flops, double bytes, bool bf16) const {
    const double compute = gemm_seconds(flops, bf16), memory = memory_seconds(bytes);
    return compute > memory ? compute : memory;
  }
  // [m, k] x [k, n] -> [m, n] f32: both operands read once (bf16: 2 bytes an
  // element), the output written once. A decode step's few rows make this
  // the weight matrix's bytes over the bandwidth, not its FLOPs over the rate.
  // weights_read: an earlier block of the same grouped GEMM paid for the
  // expert-sized operand already: B [k, n] (a weight) or, reused_is_c, the
  // output C [m, n] (a weight gradient it accumulates, written once).
  double gemm_seconds(double m, double n, double k, bool bf16, bool weights_read = false,
                      bool reused_is_c = false) const {
    const double operand = bf16 ? 2.0 : 4.0;
    double b = k * n * operand, c = m * n * 4.0;
    if (weights_read) (reused_is_c ? c : b) = 0;
    return kernel_seconds(2.0 * m * n * k, m * k * operand + b + c, bf16);
  }
};

struct ClusterModel {
  std::string name;
  std::string description;  // hardware and where the figures come from
  DeviceModel device;
  LinkModel link;           // link.ranks_per_node: GPUs per node of the preset
};

}  // namespace switchyard
