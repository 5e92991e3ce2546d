// The machine's GEMM rate as the benchmarks' floors use it: oneDNN at
// 1024^3 on every rank at once (each on its share of the cores, as the
// measured run then uses them), 4 GEMMs per timing, FLOPs of all ranks over
// the slowest rank's time, median of 5.
#pragma once

#include "comm/communicator.h"
#include "core/dtype.h"

namespace switchyard {

// FLOP/s of the whole machine; compute f32, or bf16 (bf16 operands, fp32
// accumulation). Collective.
double machine_gemm_rate(Communicator& world, DType compute = DType::f32);

}  // namespace switchyard
