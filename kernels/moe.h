// Row kernels of the MoE dispatch and combine, and the expert activations.
// Raw pointers, row-major fp32 rows of `width` elements.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

namespace switchyard::kernels {

enum class Activation : uint8_t { relu, gelu, swiglu };
// "relu", "gelu", "swiglu"; nullopt otherwise.
std::optional<Activation> parse_activation(std::string_view name);

// fp8 dispatch payloads (DeepEP's and Step-3's form): a row of `width` values
// as fp8 e4m3 with one f32 scale per block of 128 columns (the block's
// largest magnitude / 448, 1 for an all-zero block), packed per row as the
// scales, then the values.
inline constexpr int64_t kFp8Block = 128;
inline int64_t fp8_row_bytes(int64_t width) { return 4 * ((width + kFp8Block - 1) / kFp8Block) + width; }

}  // namespace switchyard::kernels

namespace switchyard::kernels::cpu {

// dst[i] = src[index[i]] for i < rows; index -1 writes a zero row (padding).
void gather_rows(const float* src, const int64_t* index, int64_t rows, int64_t width, float* dst);
// y += alpha * x over n elements (gradient sums, SGD).
void axpy(float alpha, const float* x, int64_t n, float* y);
// dst[index[i]] = src[i] for i < rows; indices distinct (results back to their rows).
void scatter_rows(const float* src, const int64_t* index, int64_t rows, int64_t width, float* dst);
// out[t] = sum_j scale[t*k+j] * src[row[t*k+j]] for t < tokens (row -1 skipped;
// scale may be null: 1). The combine step as a gather: each token is summed by one
// thread in choice order, so results do not depend on the thread count.
void combine_rows(const float* src, const int64_t* row, const float* scale, int64_t tokens, int k, int64_t width,
                  float* out);
// dst[i] = scale[i] * src[index[i]] (index -1: zero row).
void gather_scaled_rows(const float* src, const int64_t* index, const float* scale, int64_t rows, int64_t width,
                        float* dst);
// acc[j] += sum_i x[i, j] over rows (bias gradients), column blocks in parallel.
void add_column_sums(const float* x, int64_t rows, int64_t width, float* acc);
// y[i, :] = bias for every row (so a GEMM with beta = 1 adds on top).
void broadcast_rows(const float* bias, int64_t rows, int64_t width, float* y);

// out[i] = dot(a[index[i]], b[i]) for i < rows; index -1 gives 0.
void row_dots(const float* a, const int64_t* index, const float* b, int64_t rows, int64_t width, float* out);

// relu, gelu (exact, erf): y = f(x) on [rows, width]. swiglu: x is [rows, 2*width]
// holding (gate, up) halves per row, y[rows, width] = silu(gate) * up.
void activation_forward(Activation act, const float* x, int64_t rows, int64_t width, float* y);
// dx from dy and the forward input x (same layouts as forward).
void activation_backward(Activation act, const float* x, const float* dy, int64_t rows, int64_t width, float* dx);
// [rows, width] f32 to packed fp8 rows (fp8_row_bytes(width) bytes each) and back.
void to_fp8_rows(const float* src, int64_t rows, int64_t width, uint8_t* dst);
void from_fp8_rows(const uint8_t* src, int64_t rows, int64_t width, float* dst);

}  // namespace switchyard::kernels::cpu
