#include "kernels/moe.h"

#include <cmath>
#include <cstring>

namespace switchyard::kernels::cpu {

void gather_rows(const float* src, const int64_t* index, int64_t rows, int64_t width, float* dst) {
  const size_t bytes = static_cast<size_t>(width) * sizeof(float);
  for (int64_t i = 0; i < rows; ++i) {
    if (index[i] < 0)
      std::memset(dst + i * width, 0, bytes);
    else
      std::memcpy(dst + i * width, src + index[i] * width, bytes);
  }
}

void scatter_add_rows(const float* src, const int64_t* index, const float* scale, int64_t rows, int64_t width,
                      float* dst) {
  for (int64_t i = 0; i < rows; ++i) {
    if (index[i] < 0) continue;
    const float s = scale ? scale[i] : 1.f;
    float* __restrict d = dst + index[i] * width;
    const float* __restrict r = src + i * width;
    for (int64_t j = 0; j < width; ++j) d[j] += s * r[j];
  }
}

void row_dots(const float* a, const int64_t* index, const float* b, int64_t rows, int64_t width, float* out) {
  for (int64_t i = 0; i < rows; ++i) {
    if (index[i] < 0) {
      out[i] = 0.f;
      continue;
    }
    const float* x = a + index[i] * width;
    const float* y = b + i * width;
    float acc = 0.f;
    for (int64_t j = 0; j < width; ++j) acc += x[j] * y[j];
    out[i] = acc;
  }
}

namespace {
constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
inline float sigmoid(float v) { return 1.f / (1.f + std::exp(-v)); }
}  // namespace

void activation_forward(Activation act, const float* x, int64_t rows, int64_t width, float* y) {
  const int64_t n = rows * width;
  switch (act) {
    case Activation::relu:
      for (int64_t i = 0; i < n; ++i) y[i] = x[i] > 0.f ? x[i] : 0.f;
      return;
    case Activation::gelu:
      for (int64_t i = 0; i < n; ++i) y[i] = 0.5f * x[i] * (1.f + std::erf(x[i] * kInvSqrt2));
      return;
    case Activation::swiglu:
      for (int64_t r = 0; r < rows; ++r) {
        const float* gate = x + r * 2 * width;
        const float* up = gate + width;
        for (int64_t j = 0; j < width; ++j) y[r * width + j] = gate[j] * sigmoid(gate[j]) * up[j];
      }
      return;
  }
}

void activation_backward(Activation act, const float* x, const float* dy, int64_t rows, int64_t width, float* dx) {
  const int64_t n = rows * width;
  switch (act) {
    case Activation::relu:
      for (int64_t i = 0; i < n; ++i) dx[i] = x[i] > 0.f ? dy[i] : 0.f;
      return;
    case Activation::gelu:
      for (int64_t i = 0; i < n; ++i) {
        const float cdf = 0.5f * (1.f + std::erf(x[i] * kInvSqrt2));
        const float pdf = kInvSqrt2Pi * std::exp(-0.5f * x[i] * x[i]);
        dx[i] = dy[i] * (cdf + x[i] * pdf);
      }
      return;
    case Activation::swiglu:
      for (int64_t r = 0; r < rows; ++r) {
        const float* gate = x + r * 2 * width;
        const float* up = gate + width;
        float* dgate = dx + r * 2 * width;
        float* dup = dgate + width;
        for (int64_t j = 0; j < width; ++j) {
          const float s = sigmoid(gate[j]);
          const float g = dy[r * width + j];
          dup[j] = g * gate[j] * s;
          dgate[j] = g * up[j] * s * (1.f + gate[j] * (1.f - s));
        }
      }
      return;
  }
}

}  // namespace switchyard::kernels::cpu
