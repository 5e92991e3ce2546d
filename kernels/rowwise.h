// Row-wise, batch-invariant kernels for inference: every output row is
// computed by the same sequence of floating-point operations whatever the
// number of rows, so a token's result does not depend on how many tokens
// share its batch (prefill, multi-token verification and one-token decode
// agree bit for bit). Host memory, fp32.
#pragma once

#include <cstdint>

namespace switchyard::kernels::cpu {

// y[r, :] = beta * y[r, :] + x[r, :] @ w for r < rows; x [rows, k] (row
// stride ldx), w [k, n] (row stride ldw), y [rows, n] (row stride ldy).
// Each output element accumulates its k products in order 0..k-1, one fused
// multiply-add each, starting from beta * y (beta 0: y is not read).
void matmul_rows(const float* x, int64_t rows, int64_t k, int64_t ldx, const float* w, int64_t n, int64_t ldw,
                 float beta, float* y, int64_t ldy);

}  // namespace switchyard::kernels::cpu
