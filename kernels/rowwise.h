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

// One query row's attention, every head, over keys 0..positions-1:
// out[h*hd + t] = sum_j softmax_j(scale * q_h . k_hj) * v_j[h*hd + t].
// keys_t: keys transposed, dimension c of key j at keys_t[c * ld_keys + j];
// values: value j at values[j * ld_values] (heads * head_dim wide). scratch
// holds heads * positions floats. The same operations in the same order
// whatever the row's batch: each score sums its head_dim products in order
// (one fused multiply-add each), each softmax sums its keys in 16 fixed
// lanes (key j into lane j mod 16, then the lanes in order), and each
// output element accumulates its positions in key order (fused multiply-add).
void attend_heads(const float* q, int heads, int head_dim, const float* keys_t, int64_t ld_keys, const float* values,
                  int64_t ld_values, int positions, float scale, float* scratch, float* out);

}  // namespace switchyard::kernels::cpu
