// Expert GEMMs through cuBLAS, row-major like kernels::cpu (the column-major
// library computes C^T = op(B)^T op(A)^T). fp32 runs in full fp32 (no TF32:
// the default math mode), bf16 takes bf16 operands and accumulates in fp32.
// One cuBLAS handle per thread and device. CUDA builds only.
#pragma once

#include <cuda_runtime_api.h>

#include "kernels/gemm.h"

namespace switchyard::kernels::cuda {

void gemm_f32(const GemmArgs& args, cudaStream_t stream);
void gemm_bf16(const GemmBf16Args& args, cudaStream_t stream);
// `batch` GEMMs of one shape whose operands start stride_{a,b,c} elements apart
// (the padded exchange's [experts, capacity, width] blocks).
void gemm_f32_batched(const GemmArgs& args, int batch, int64_t stride_a, int64_t stride_b, int64_t stride_c,
                      cudaStream_t stream);
void gemm_bf16_batched(const GemmBf16Args& args, int batch, int64_t stride_a, int64_t stride_b, int64_t stride_c,
                       cudaStream_t stream);

}  // namespace switchyard::kernels::cuda
