#include "kernels/moe.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/dtype.h"

namespace switchyard::kernels {

std::optional<Activation> parse_activation(std::string_view name) {
  if (name == "relu") return Activation::relu;
  if (name == "gelu") return Activation::gelu;
  if (name == "swiglu") return Activation::swiglu;
  return std::nullopt;
}

}  // namespace switchyard::kernels

namespace switchyard::kernels::cpu {

// Rows are independent: split them over the calling thread's OpenMP threads
// (the rank's GEMM thread budget). Small jobs stay on one thread.
constexpr int64_t kParallelMinElements = 1 << 15;

void gather_rows(const float* src, const int64_t* index, int64_t rows, int64_t width, float* dst) {
  const size_t bytes = static_cast<size_t>(width) * sizeof(float);
#pragma omp parallel for schedule(static) if (rows * width >= kParallelMinElements)
  for (int64_t i = 0; i < rows; ++i) {
    if (index[i] < 0)
      std::memset(dst + i * width, 0, bytes);
    else
      std::memcpy(dst + i * width, src + index[i] * width, bytes);
  }
}

void axpy(float alpha, const float* x, int64_t n, float* y) {
#pragma omp parallel for schedule(static) if (n >= kParallelMinElements)
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

void scatter_rows(const float* src, const int64_t* index, int64_t rows, int64_t width, float* dst) {
  const size_t bytes = static_cast<size_t>(width) * sizeof(float);
#pragma omp parallel for schedule(static) if (rows * width >= kParallelMinElements)
  for (int64_t i = 0; i < rows; ++i) std::memcpy(dst + index[i] * width, src + i * width, bytes);
}

void combine_rows(const float* src, const int64_t* row, const float* scale, int64_t tokens, int k, int64_t width,
                  float* out) {
#pragma omp parallel for schedule(static) if (tokens * width >= kParallelMinElements)
  for (int64_t t = 0; t < tokens; ++t) {
    float* __restrict o = out + t * width;
    for (int64_t j = 0; j < width; ++j) o[j] = 0.f;
    for (int c = 0; c < k; ++c) {
      const int64_t r = row[t * k + c];
      if (r < 0) continue;
      const float s = scale ? scale[t * k + c] : 1.f;
      const float* __restrict x = src + r * width;
      for (int64_t j = 0; j < width; ++j) o[j] += s * x[j];
    }
  }
}

void gather_scaled_rows(const float* src, const int64_t* index, const float* scale, int64_t rows, int64_t width,
                        float* dst) {
#pragma omp parallel for schedule(static) if (rows * width >= kParallelMinElements)
  for (int64_t i = 0; i < rows; ++i) {
    float* __restrict d = dst + i * width;
    if (index[i] < 0) {
      for (int64_t j = 0; j < width; ++j) d[j] = 0.f;
      continue;
    }
    const float* __restrict x = src + index[i] * width;
    const float s = scale[i];
    for (int64_t j = 0; j < width; ++j) d[j] = s * x[j];
  }
}

void add_column_sums(const float* x, int64_t rows, int64_t width, float* acc) {
  constexpr int64_t kBlock = 64;  // columns per task: one cache line of floats x 4
  const int64_t blocks = (width + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (rows * width >= kParallelMinElements)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t lo = b * kBlock, hi = std::min(width, lo + kBlock);
    float sums[kBlock] = {};
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = lo; j < hi; ++j) sums[j - lo] += x[i * width + j];
    for (int64_t j = lo; j < hi; ++j) acc[j] += sums[j - lo];
  }
}

void broadcast_rows(const float* bias, int64_t rows, int64_t width, float* y) {
#pragma omp parallel for schedule(static) if (rows * width >= kParallelMinElements)
  for (int64_t i = 0; i < rows; ++i) std::memcpy(y + i * width, bias, static_cast<size_t>(width) * sizeof(float));
}

void row_dots(const float* a, const int64_t* index, const float* b, int64_t rows, int64_t width, float* out) {
#pragma omp parallel for schedule(static) if (rows * width >= kParallelMinElements)
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

// gelu's erf and exp, 8 lanes at a time through glibc's vector math library
// (libmvec, AVX2) where the CPU has it: the scalar calls were a sixth of a
// training step. Every element goes through the same function, the last
// partial block padded, so a row's result never depends on where it sits in
// the batch (the inference kernels are batch-invariant).
// (A target attribute, not a pragma: clang honours only the attribute.)
extern "C" __attribute__((target("avx2"))) __m256 _ZGVdN8v_erff(__m256);
extern "C" __attribute__((target("avx2"))) __m256 _ZGVdN8v_expf(__m256);
enum class VectorMath : uint8_t { erf, exp };
__attribute__((target("avx2"))) void apply8(VectorMath f, const float* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; i += 8) {
    alignas(32) float block[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const int64_t m = std::min<int64_t>(8, n - i);
    std::memcpy(block, in + i, static_cast<size_t>(m) * sizeof(float));
    const __m256 v = _mm256_load_ps(block);
    _mm256_store_ps(block, f == VectorMath::erf ? _ZGVdN8v_erff(v) : _ZGVdN8v_expf(v));
    std::memcpy(out + i, block, static_cast<size_t>(m) * sizeof(float));
  }
}

// out[i] = f(in[i]) for n elements (in == out allowed).
void vector_math(VectorMath f, const float* in, float* out, int64_t n) {
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) return apply8(f, in, out, n);
  for (int64_t i = 0; i < n; ++i) out[i] = f == VectorMath::erf ? std::erf(in[i]) : std::exp(in[i]);
}

// Elements per piece a thread transforms with scratch on its stack.
constexpr int64_t kPiece = 512;
}  // namespace

void activation_forward(Activation act, const float* x, int64_t rows, int64_t width, float* y) {
  const int64_t n = rows * width;
  const bool parallel = n >= kParallelMinElements;
  switch (act) {
    case Activation::relu:
#pragma omp parallel for schedule(static) if (parallel)
      for (int64_t i = 0; i < n; ++i) y[i] = x[i] > 0.f ? x[i] : 0.f;
      return;
    case Activation::gelu:
#pragma omp parallel for schedule(static) if (parallel)
      for (int64_t p = 0; p < (n + kPiece - 1) / kPiece; ++p) {
        const int64_t at = p * kPiece, m = std::min(kPiece, n - at);
        float e[kPiece];
        for (int64_t i = 0; i < m; ++i) e[i] = x[at + i] * kInvSqrt2;
        vector_math(VectorMath::erf, e, e, m);
        for (int64_t i = 0; i < m; ++i) y[at + i] = 0.5f * x[at + i] * (1.f + e[i]);
      }
      return;
    case Activation::swiglu:
#pragma omp parallel for schedule(static) if (parallel)
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
  const bool parallel = n >= kParallelMinElements;
  switch (act) {
    case Activation::relu:
#pragma omp parallel for schedule(static) if (parallel)
      for (int64_t i = 0; i < n; ++i) dx[i] = x[i] > 0.f ? dy[i] : 0.f;
      return;
    case Activation::gelu:
#pragma omp parallel for schedule(static) if (parallel)
      for (int64_t p = 0; p < (n + kPiece - 1) / kPiece; ++p) {
        const int64_t at = p * kPiece, m = std::min(kPiece, n - at);
        float e[kPiece], g[kPiece];
        for (int64_t i = 0; i < m; ++i) e[i] = x[at + i] * kInvSqrt2, g[i] = -0.5f * x[at + i] * x[at + i];
        vector_math(VectorMath::erf, e, e, m);
        vector_math(VectorMath::exp, g, g, m);
        for (int64_t i = 0; i < m; ++i) {
          const float cdf = 0.5f * (1.f + e[i]);
          const float pdf = kInvSqrt2Pi * g[i];
          dx[at + i] = dy[at + i] * (cdf + x[at + i] * pdf);
        }
      }
      return;
    case Activation::swiglu:
#pragma omp parallel for schedule(static) if (parallel)
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

void to_fp8_rows(const float* src, int64_t rows, int64_t width, uint8_t* dst) {
  const int64_t blocks = (width + kFp8Block - 1) / kFp8Block, bytes = fp8_row_bytes(width);
#pragma omp parallel for schedule(static) if (rows * width >= (1 << 15))
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = src + r * width;
    uint8_t* out = dst + r * bytes;
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t lo = b * kFp8Block, hi = std::min(width, lo + kFp8Block);
      float amax = 0;
      for (int64_t j = lo; j < hi; ++j) amax = std::max(amax, std::fabs(x[j]));
      const float scale = amax > 0 ? amax / 448.0f : 1.0f;
      std::memcpy(out + 4 * b, &scale, 4);
      for (int64_t j = lo; j < hi; ++j) out[4 * blocks + j] = fp8_e4m3::from_float(x[j] / scale).bits;
    }
  }
}

void from_fp8_rows(const uint8_t* src, int64_t rows, int64_t width, float* dst) {
  const int64_t blocks = (width + kFp8Block - 1) / kFp8Block, bytes = fp8_row_bytes(width);
#pragma omp parallel for schedule(static) if (rows * width >= (1 << 15))
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* in = src + r * bytes;
    for (int64_t b = 0; b < blocks; ++b) {
      float scale;
      std::memcpy(&scale, in + 4 * b, 4);
      const int64_t lo = b * kFp8Block, hi = std::min(width, lo + kFp8Block);
      for (int64_t j = lo; j < hi; ++j) dst[r * width + j] = fp8_e4m3{in[4 * blocks + j]}.to_float() * scale;
    }
  }
}

}  // namespace switchyard::kernels::cpu
