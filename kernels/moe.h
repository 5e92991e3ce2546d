// Row kernels of the MoE dispatch and combine, and the expert activations.
// Raw pointers, row-major fp32 rows of `width` elements.
#pragma once

#include <cstdint>

namespace switchyard::kernels::cpu {

// dst[i] = src[index[i]] for i < rows; index -1 writes a zero row (padding).
void gather_rows(const float* src, const int64_t* index, int64_t rows, int64_t width, float* dst);
// dst[index[i]] += scale[i] * src[i] for i < rows (scale may be null: 1); index -1 is skipped.
// Rows of one dst index are added in order i, so the result does not depend on threads.
void scatter_add_rows(const float* src, const int64_t* index, const float* scale, int64_t rows, int64_t width,
                      float* dst);
// out[i] = dot(a[index[i]], b[i]) for i < rows; index -1 gives 0.
void row_dots(const float* a, const int64_t* index, const float* b, int64_t rows, int64_t width, float* out);

enum class Activation : uint8_t { relu, gelu, swiglu };
// relu, gelu (exact, erf): y = f(x) on [rows, width]. swiglu: x is [rows, 2*width]
// holding (gate, up) halves per row, y[rows, width] = silu(gate) * up.
void activation_forward(Activation act, const float* x, int64_t rows, int64_t width, float* y);
// dx from dy and the forward input x (same layouts as forward).
void activation_backward(Activation act, const float* x, const float* dy, int64_t rows, int64_t width, float* dx);

}  // namespace switchyard::kernels::cpu
