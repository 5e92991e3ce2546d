// CUDA versions of the router and MoE row kernels (kernels/router.h,
// kernels/moe.h): raw device pointers, sizes and the stream to run on. Same
// semantics as the CPU kernels, which are their reference. CUDA builds only.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/moe.h"
#include "kernels/router.h"

namespace switchyard::kernels::cuda {

// Largest expert count the gate kernel takes (a warp holds a token's scores in registers).
inline constexpr int kMaxGateExperts = 256;
// One warp per token; pointers are device pointers. Throws NotSupported past kMaxGateExperts.
void topk_gate(const TopKGateArgs& args, cudaStream_t stream);

// Dispatch layout, in two kernels with the host in between (it agrees the
// capacity and, dropless, the row offsets). Choices are ranked within their
// expert position in GShard's order: all first choices by token, then all
// second choices..., so the same choices are dropped as on the CPU.
//   counts: tile_rank[T*k] (a choice's rank among its tile's choices of the same
//   position), tile_base[tiles*E] (choices of each position in earlier tiles,
//   exclusive scan over tiles) and load[E] (all choices of each position).
int64_t dispatch_tiles(int64_t tokens, int k);  // tiles for the scratch size: tiles * E
void dispatch_counts(const int32_t* experts, const int32_t* position_of_expert, int64_t tokens, int k, int positions,
                     int32_t* tile_rank, int32_t* tile_base, int32_t* load, cudaStream_t stream);
//   slots: a choice ranked below `capacity` takes row row_base[position] + rank;
//   writes row_of_choice[T*k] (-1 when dropped), and for each kept row
//   token_of_row[row] and weight_of_row[row]. Rows nobody takes (padding) are
//   left as they were: fill token_of_row with -1 and weight_of_row with 0 first.
void dispatch_slots(const int32_t* experts, const int32_t* position_of_expert, const float* weights, int64_t tokens,
                    int k, int positions, const int32_t* tile_rank, const int32_t* tile_base, const int64_t* row_base,
                    int64_t capacity, int64_t* row_of_choice, int64_t* token_of_row, float* weight_of_row,
                    cudaStream_t stream);

// Encode / decode and their backward (kernels::cpu counterparts).
void gather_rows(const float* src, const int64_t* index, int64_t rows, int64_t width, float* dst, cudaStream_t stream);
void scatter_rows(const float* src, const int64_t* index, int64_t rows, int64_t width, float* dst, cudaStream_t stream);
void gather_scaled_rows(const float* src, const int64_t* index, const float* scale, int64_t rows, int64_t width,
                        float* dst, cudaStream_t stream);
void combine_rows(const float* src, const int64_t* row, const float* scale, int64_t tokens, int k, int64_t width,
                  float* out, cudaStream_t stream);
void row_dots(const float* a, const int64_t* index, const float* b, int64_t rows, int64_t width, float* out,
              cudaStream_t stream);
// acc[j] += sum_i x[i, j], in a fixed order (deterministic); `scratch` holds
// column_sum_scratch(rows, width) floats.
int64_t column_sum_scratch(int64_t rows, int64_t width);
void add_column_sums(const float* x, int64_t rows, int64_t width, float* acc, float* scratch, cudaStream_t stream);
void broadcast_rows(const float* bias, int64_t rows, int64_t width, float* y, cudaStream_t stream);
void activation_forward(Activation act, const float* x, int64_t rows, int64_t width, float* y, cudaStream_t stream);
void activation_backward(Activation act, const float* x, const float* dy, int64_t rows, int64_t width, float* dx,
                         cudaStream_t stream);
// y += alpha * x (gradient accumulation, SGD).
void axpy(float alpha, const float* x, int64_t n, float* y, cudaStream_t stream);
// dst = bf16(src), round to nearest even.
void to_bf16(const float* src, int64_t n, uint16_t* dst, cudaStream_t stream);
// dst = float(src), exact.
void from_bf16(const uint16_t* src, int64_t n, float* dst, cudaStream_t stream);
// Packed fp8 rows (kernels/moe.h fp8_row_bytes: per 128 columns an f32 scale, then e4m3 values) and back.
void to_fp8_rows(const float* src, int64_t rows, int64_t width, uint8_t* dst, cudaStream_t stream);
void from_fp8_rows(const uint8_t* src, int64_t rows, int64_t width, float* dst, cudaStream_t stream);

// The gate's backward for one batch (MoELayer::backward's host loop): from
// d_weight_of_row through the routing weights (renormalised or not), plus the
// balancing loss (balance_grad[e] = coef * E * f_e / T, 0 to skip) and the
// z-loss (z_coef), down to d_logits[T, E]. copies = 1 (no hidden split).
struct GateBackwardArgs {
  const float* scores = nullptr;        // [T, E]
  const float* logits = nullptr;        // [T, E] raw
  const int32_t* experts = nullptr;     // [T, k]
  const float* weights = nullptr;       // [T, k]
  const int64_t* row_of_choice = nullptr;   // [T, k]
  const float* d_weight_of_row = nullptr;   // [rows]
  const float* balance_grad = nullptr;      // [E] or null
  int64_t tokens = 0;
  int experts_total = 0;
  int k = 1;
  bool renormalize = false;
  GateScore score = GateScore::softmax;
  double z_coef = 0.0;
  float* d_logits = nullptr;  // [T, E]
};
void gate_backward(const GateBackwardArgs& args, cudaStream_t stream);

// Router statistics for the losses: per token the row sum of scores and
// logsumexp of the logits, so that the host (or column sums) can form
// P_e = mean_t(s_te / sum_e s_te) and z = mean_t lse_t^2.
// normalized[T, E] = s / row sum; lse_squared[T].
void router_stats(const float* scores, const float* logits, int64_t tokens, int experts, float* normalized,
                  float* lse_squared, cudaStream_t stream);

}  // namespace switchyard::kernels::cuda
