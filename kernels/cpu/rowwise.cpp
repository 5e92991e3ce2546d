#include "kernels/rowwise.h"

#include <bit>
#include <cmath>
#include <cstdint>

namespace switchyard::kernels::cpu {
namespace {

constexpr int64_t kRows = 4;     // rows sharing each loaded slice of w
constexpr int64_t kCols = 64;    // output columns per full tile
constexpr int64_t kVector = 16;  // columns per partial tile (one AVX-512 register)

// One tile of R rows (1..kRows) and C columns, both compile-time so the R x C
// accumulators stay in registers (a run-time column count left them on the
// stack: a load and a store around every FMA). Inlined into each target
// clone below (a separately compiled tile would use the generic ISA, where
// std::fma is a library call: 50 times slower). Every element's arithmetic
// is the same for any R and C: the blocking only shares loads.
template <int64_t R, int64_t C>
__attribute__((always_inline)) inline void tile(const float* x, int64_t k, int64_t ldx, const float* w, int64_t ldw,
                                                float beta, float* y, int64_t ldy) {
  float acc[R][C];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < C; ++j) acc[r][j] = beta == 0.f ? 0.f : beta * y[r * ldy + j];
  for (int64_t kk = 0; kk < k; ++kk) {
    const float* wk = w + kk * ldw;
    for (int64_t r = 0; r < R; ++r) {
      const float a = x[r * ldx + kk];
#pragma omp simd
      for (int64_t j = 0; j < C; ++j) acc[r][j] = std::fma(a, wk[j], acc[r][j]);
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < C; ++j) y[r * ldy + j] = acc[r][j];
}

// R rows over all n columns: full tiles, then one-register tiles, then single columns.
template <int64_t R>
__attribute__((always_inline)) inline void row_block(const float* x, int64_t k, int64_t ldx, const float* w, int64_t n,
                                                     int64_t ldw, float beta, float* y, int64_t ldy) {
  int64_t j0 = 0;
  for (; j0 + kCols <= n; j0 += kCols) tile<R, kCols>(x, k, ldx, w + j0, ldw, beta, y + j0, ldy);
  for (; j0 + kVector <= n; j0 += kVector) tile<R, kVector>(x, k, ldx, w + j0, ldw, beta, y + j0, ldy);
  for (; j0 < n; ++j0) tile<R, 1>(x, k, ldx, w + j0, ldw, beta, y + j0, ldy);
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
    // A block's rows share each loaded slice of w (a decode step gives an
    // expert only a few rows: 2 or 3 of them still share).
    const float* xr = x + r0 * ldx;
    float* yr = y + r0 * ldy;
    switch (nr) {
      case 4: row_block<4>(xr, k, ldx, w, n, ldw, beta, yr, ldy); break;
      case 3: row_block<3>(xr, k, ldx, w, n, ldw, beta, yr, ldy); break;
      case 2: row_block<2>(xr, k, ldx, w, n, ldw, beta, yr, ldy); break;
      default: row_block<1>(xr, k, ldx, w, n, ldw, beta, yr, ldy); break;
    }
  }
}

namespace {
constexpr int kLanes = 16;  // one AVX-512 register of floats

// e^x for the softmax's x <= 0 (the row's maximum subtracted) as one fixed
// sequence of IEEE operations, so it vectorises and every clone and batch
// gives the same bits (libm's expf is a call per element): x = n ln2 + r,
// |r| <= ln2 / 2, e^x = 2^n p(r) with p the degree-6 Taylor polynomial
// (about 2 ulp: 2.3e-7 relative at worst over [-88, 0]). Inputs below -87 give e^-87 (~1.6e-38)
// instead of a denormal or 0: nothing a softmax sum can see.
__attribute__((always_inline)) inline float exp_nonpositive(float x) {
  x = x < -87.f ? -87.f : x;
  const float n = std::fma(x, 1.44269504f, 12582912.f) - 12582912.f;  // round(x / ln2): 1.5 * 2^23 trick
  float r = std::fma(n, -0.693145752f, x);                              // ln2 in two parts, the first exact in n
  r = std::fma(n, -1.42860677e-6f, r);
  float p = 1.f / 720.f;
  p = std::fma(p, r, 1.f / 120.f);
  p = std::fma(p, r, 1.f / 24.f);
  p = std::fma(p, r, 1.f / 6.f);
  p = std::fma(p, r, 0.5f);
  p = std::fma(p, r, 1.f);
  p = std::fma(p, r, 1.f);
  return p * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
}
constexpr int kChains = 8;  // independent accumulators in flight (the FMA latency hides behind them)

// Scores of keys [j0, j0 + W) for heads [h0, h0 + H): each sums its
// head_dim products in order, one fused multiply-add each.
template <int H, int W>
__attribute__((always_inline)) inline void score_block(const float* q, int head_dim, const float* keys_t, int64_t ld_keys,
                                                       int h0, int j0, float* s, int64_t ld_s) {
  float acc[H][W];
  for (int h = 0; h < H; ++h)
    for (int j = 0; j < W; ++j) acc[h][j] = 0.f;
  for (int t = 0; t < head_dim; ++t)
    for (int h = 0; h < H; ++h) {
      const int dim = (h0 + h) * head_dim + t;
      const float qt = q[dim];
      const float* kt = keys_t + dim * ld_keys + j0;
#pragma omp simd
      for (int j = 0; j < W; ++j) acc[h][j] = std::fma(qt, kt[j], acc[h][j]);
    }
  for (int h = 0; h < H; ++h)
    for (int j = 0; j < W; ++j) s[(h0 + h) * ld_s + j0 + j] = acc[h][j];
}

// Output elements [e0, e0 + B * W) of the row (B blocks of W inside heads):
// each accumulates its n weighted values in key order.
template <int B, int W>
__attribute__((always_inline)) inline void mix_block(const float* p, int64_t ld_p, int n, int head_dim,
                                                     const float* values, int64_t ld_values, int e0, float* out) {
  float acc[B][W];
  const float* weight[B];
  for (int b = 0; b < B; ++b) {
    weight[b] = p + (e0 + b * W) / head_dim * ld_p;  // the block's head
    for (int t = 0; t < W; ++t) acc[b][t] = 0.f;
  }
  for (int j = 0; j < n; ++j) {
    const float* v = values + j * ld_values + e0;
    for (int b = 0; b < B; ++b) {
      const float pj = weight[b][j];
#pragma omp simd
      for (int t = 0; t < W; ++t) acc[b][t] = std::fma(pj, v[b * W + t], acc[b][t]);
    }
  }
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < W; ++t) out[e0 + b * W + t] = acc[b][t];
}
}  // namespace

// Cloned like matmul_rows: std::fma and IEEE division round the same on every
// ISA, and the softmax's e^x is a fixed sequence of them, so the clones agree bit for bit.
// Blocks of keys (scores) and of output elements (the weighted sum) keep
// several independent accumulators in registers; how elements are grouped
// never changes an element's own sequence of operations.
__attribute__((target_clones("avx512f", "avx2,fma", "default")))
void attend_heads(const float* q, int heads, int head_dim, const float* keys_t, int64_t ld_keys, const float* values,
                  int64_t ld_values, int positions, float scale, float* scratch, float* out) {
  const int n = positions;
  const int64_t ld_s = n;  // scratch: [heads][n]
  float* s = scratch;
  int h0 = 0;
  for (; h0 + kChains <= heads; h0 += kChains) {
    int j0 = 0;
    for (; j0 + kLanes <= n; j0 += kLanes) score_block<kChains, kLanes>(q, head_dim, keys_t, ld_keys, h0, j0, s, ld_s);
    for (; j0 < n; ++j0) score_block<kChains, 1>(q, head_dim, keys_t, ld_keys, h0, j0, s, ld_s);
  }
  for (; h0 < heads; ++h0) {
    int j0 = 0;
    for (; j0 + kLanes <= n; j0 += kLanes) score_block<1, kLanes>(q, head_dim, keys_t, ld_keys, h0, j0, s, ld_s);
    for (; j0 < n; ++j0) score_block<1, 1>(q, head_dim, keys_t, ld_keys, h0, j0, s, ld_s);
  }
  for (int h = 0; h < heads; ++h) {
    float* sh = s + h * ld_s;
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int j = 0; j < n; ++j) {
      sh[j] *= scale;
      m = sh[j] > m ? sh[j] : m;
    }
#pragma omp simd
    for (int j = 0; j < n; ++j) sh[j] = exp_nonpositive(sh[j] - m);
    // Sixteen partial sums (key j into lane j mod 16) added in lane order: a
    // fixed order for a given n, whatever the batch.
    float lane[kLanes] = {};
    int j = 0;
    for (; j + kLanes <= n; j += kLanes)
#pragma omp simd
      for (int t = 0; t < kLanes; ++t) lane[t] += sh[j + t];
    for (int t = 0; j + t < n; ++t) lane[t] += sh[j + t];
    float sum = 0.f;
    for (float v : lane) sum += v;
#pragma omp simd
    for (int i = 0; i < n; ++i) sh[i] /= sum;
  }
  const int width = heads * head_dim;
  if (head_dim % kLanes == 0) {  // blocks never straddle heads
    int e0 = 0;
    for (; e0 + kChains * kLanes <= width; e0 += kChains * kLanes)
      mix_block<kChains, kLanes>(s, ld_s, n, head_dim, values, ld_values, e0, out);
    for (; e0 < width; e0 += kLanes) mix_block<1, kLanes>(s, ld_s, n, head_dim, values, ld_values, e0, out);
    return;
  }
  for (int h = 0; h < heads; ++h) {  // blocks inside each head, then its tail
    int t0 = 0;
    for (; t0 + kLanes <= head_dim; t0 += kLanes)
      mix_block<1, kLanes>(s, ld_s, n, head_dim, values, ld_values, h * head_dim + t0, out);
    for (; t0 < head_dim; ++t0) mix_block<1, 1>(s, ld_s, n, head_dim, values, ld_values, h * head_dim + t0, out);
  }
}

}  // namespace switchyard::kernels::cpu
