// Element-wise reduction kernels used by the collective algorithms.
// Raw pointers and sizes; host memory (the CUDA versions come with kernels/cuda).
#pragma once

#include <cstddef>
#include <string_view>

#include "core/dtype.h"

namespace switchyard {

enum class ReduceOp { sum, max, min };
std::string_view reduce_op_name(ReduceOp op);

// Dtypes the reductions accept: f32, f64, bf16, f16, i32, i64.
bool is_reducible(DType t);

namespace kernels::cpu {
// acc[i] = op(acc[i], in[i]) for i < count. bf16 and f16 accumulate in float and
// round once per call. acc and in may not overlap partially.
void reduce_into(void* acc, const void* in, size_t count, DType dtype, ReduceOp op);
}  // namespace kernels::cpu

}  // namespace switchyard
