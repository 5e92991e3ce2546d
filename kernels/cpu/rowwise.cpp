#include "kernels/rowwise.h"

#include <cmath>

namespace switchyard::kernels::cpu {
namespace {

constexpr int64_t kRows = 4;     // rows sharing each loaded slice of w
constexpr int64_t kCols = 64;    // output columns per tile (accumulators stay in registers)

// One tile of R rows (R = kRows or 1) and up to kCols columns, inlined into
// each target clone below (a separately compiled tile would use the generic
// ISA, where std::fma is a library call: 50 times slower). Every element's
// arithmetic is the same for either R: the row blocking only shares loads.
template <int64_t R>
__attribute__((always_inline)) inline void tile(const float* x, int64_t k, int64_t ldx, const float* w, int64_t ldw, int64_t cols, float beta,
                 float* y, int64_t ldy) {
  float acc[R][kCols];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < cols; ++j) acc[r][j] = beta == 0.f ? 0.f : beta * y[r * ldy + j];
  for (int64_t kk = 0; kk < k; ++kk) {
    const float* wk = w + kk * ldw;
    for (int64_t r = 0; r < R; ++r) {
      const float a = x[r * ldx + kk];
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) acc[r][j] = std::fma(a, wk[j], acc[r][j]);
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < cols; ++j) y[r * ldy + j] = acc[r][j];
}

}  // namespace

// Cloned for AVX-512 and a generic x86-64: std::fma is exactly rounded on
// both (an instruction or libm), so the results are the same, only the speed differs.
__attribute__((target_clones("avx512f", "avx2,fma", "default")))
void matmul_rows(const float* x, int64_t rows, int64_t k, int64_t ldx, const float* w, int64_t n, int64_t ldw,
                 float beta, float* y, int64_t ldy) {
  const int64_t blocks = (rows + kRows - 1) / kRows;
#pragma omp parallel for schedule(static) if (blocks >= 4 && rows * n * k >= (int64_t{1} << 20))
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t r0 = b * kRows, nr = rows - r0 < kRows ? rows - r0 : kRows;
    for (int64_t j0 = 0; j0 < n; j0 += kCols) {
      const int64_t cols = n - j0 < kCols ? n - j0 : kCols;
      if (nr == kRows) {
        tile<kRows>(x + r0 * ldx, k, ldx, w + j0, ldw, cols, beta, y + r0 * ldy + j0, ldy);
      } else {
        for (int64_t r = r0; r < r0 + nr; ++r) tile<1>(x + r * ldx, k, ldx, w + j0, ldw, cols, beta, y + r * ldy + j0, ldy);
      }
    }
  }
}

}  // namespace switchyard::kernels::cpu
