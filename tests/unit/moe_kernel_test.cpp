// MoE row kernels and activations against float64 loops, at sizes below and
// above the threshold where they split work over OpenMP threads.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>

#include "core/rng.h"
#include "kernels/gemm.h"
#include "kernels/moe.h"
#include "kernels/rowwise.h"

namespace switchyard {
namespace {

using namespace kernels::cpu;
using kernels::Activation;

std::vector<float> random_floats(Rng& rng, int64_t n) {
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = static_cast<float>(rng.uniform(-2, 2));
  return v;
}

TEST(MoEKernels, RowKernelsMatchFloat64Loops) {
  Rng rng(fresh_seed());
  SCOPED_TRACE("seed " + std::to_string(rng.seed()));
  for (int64_t width : {1, 37, 512})
    for (int64_t tokens : {0, 3, 301}) {
      const int k = 3;
      const int64_t rows = tokens * k + 5;
      auto src = random_floats(rng, rows * width), scale = random_floats(rng, tokens * k);
      std::vector<int64_t> row(static_cast<size_t>(tokens * k));
      for (auto& r : row) r = rng.uniform_int(-1, rows - 1);
      std::vector<float> out(static_cast<size_t>(tokens * width), NAN);
      combine_rows(src.data(), row.data(), scale.data(), tokens, k, width, out.data());
      for (int64_t t = 0; t < tokens; ++t)
        for (int64_t j = 0; j < width; ++j) {
          double want = 0;
          for (int c = 0; c < k; ++c)
            if (row[t * k + c] >= 0) want += double(scale[t * k + c]) * src[row[t * k + c] * width + j];
          ASSERT_NEAR(out[t * width + j], want, 1e-5 * (1 + std::fabs(want))) << tokens << "x" << width;
        }
      std::vector<float> gathered(static_cast<size_t>(tokens * k * width), NAN);
      gather_scaled_rows(src.data(), row.data(), scale.data(), tokens * k, width, gathered.data());
      for (int64_t i = 0; i < tokens * k; ++i)
        for (int64_t j = 0; j < width; ++j)
          ASSERT_EQ(gathered[i * width + j], row[i] < 0 ? 0.f : scale[i] * src[row[i] * width + j]);
      std::vector<float> sums(static_cast<size_t>(width), 1.f);
      add_column_sums(src.data(), rows, width, sums.data());
      for (int64_t j = 0; j < width; ++j) {
        double want = 1;
        for (int64_t i = 0; i < rows; ++i) want += src[i * width + j];
        ASSERT_NEAR(sums[j], want, 1e-4 * (1 + std::fabs(want)));
      }
      std::vector<float> filled(static_cast<size_t>(rows * width), NAN);
      broadcast_rows(src.data(), rows, width, filled.data());
      for (int64_t i = 0; i < rows * width; ++i) ASSERT_EQ(filled[i], src[i % width]);
    }
}

TEST(MoEKernels, ActivationsAndTheirGradientsMatchFloat64) {
  Rng rng(fresh_seed());
  SCOPED_TRACE("seed " + std::to_string(rng.seed()));
  for (Activation act : {Activation::relu, Activation::gelu, Activation::swiglu})
    for (int64_t rows : {1, 700}) {
      const int64_t width = 97, in_width = act == Activation::swiglu ? 2 * width : width;
      auto x = random_floats(rng, rows * in_width), dy = random_floats(rng, rows * width);
      std::vector<float> y(static_cast<size_t>(rows * width), NAN), dx(static_cast<size_t>(rows * in_width), NAN);
      activation_forward(act, x.data(), rows, width, y.data());
      activation_backward(act, x.data(), dy.data(), rows, width, dx.data());
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < width; ++j) {
          const double g = act == Activation::swiglu ? x[r * in_width + j] : x[r * width + j];
          const double u = act == Activation::swiglu ? x[r * in_width + width + j] : 0;
          const double s = 1 / (1 + std::exp(-g)), cdf = 0.5 * (1 + std::erf(g / std::sqrt(2.0)));
          const double pdf = std::exp(-0.5 * g * g) / std::sqrt(2 * M_PI), d = dy[r * width + j];
          double want_y = 0, want_dg = 0, want_du = 0;
          switch (act) {
            case Activation::relu: want_y = g > 0 ? g : 0, want_dg = g > 0 ? d : 0; break;
            case Activation::gelu: want_y = g * cdf, want_dg = d * (cdf + g * pdf); break;
            case Activation::swiglu:
              want_y = g * s * u, want_dg = d * u * s * (1 + g * (1 - s)), want_du = d * g * s;
              break;
          }
          ASSERT_NEAR(y[r * width + j], want_y, 1e-5 * (1 + std::fabs(want_y)));
          if (act == Activation::swiglu) {
            ASSERT_NEAR(dx[r * in_width + j], want_dg, 1e-5 * (1 + std::fabs(want_dg)));
            ASSERT_NEAR(dx[r * in_width + width + j], want_du, 1e-5 * (1 + std::fabs(want_du)));
          } else {
            ASSERT_NEAR(dx[r * width + j], want_dg, 1e-5 * (1 + std::fabs(want_dg)));
          }
        }
    }
}

TEST(MoEKernels, GemmMatchesFloat64WithTransposesAndEmptySizes) {
  Rng rng(fresh_seed());
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      const int64_t m = 7, n = 5, k = 9;
      auto a = random_floats(rng, m * k), b = random_floats(rng, k * n), c = random_floats(rng, m * n);
      auto c0 = c;
      gemm_f32({.transpose_a = ta, .transpose_b = tb, .m = m, .n = n, .k = k, .alpha = 0.5f, .a = a.data(),
                .lda = ta ? m : k, .b = b.data(), .ldb = tb ? k : n, .beta = 2.f, .c = c.data(), .ldc = n});
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j) {
          double want = 2.0 * c0[i * n + j];
          for (int64_t p = 0; p < k; ++p)
            want += 0.5 * double(ta ? a[p * m + i] : a[i * k + p]) * (tb ? b[j * k + p] : b[p * n + j]);
          ASSERT_NEAR(c[i * n + j], want, 1e-5 * (1 + std::fabs(want)));
        }
    }
  std::vector<float> c = {3.f, 4.f};
  gemm_f32({.m = 1, .n = 2, .k = 0, .a = nullptr, .lda = 1, .b = nullptr, .ldb = 2, .beta = 0.f, .c = c.data(), .ldc = 2});
  EXPECT_EQ(c[0], 0.f);  // k = 0: C = beta * C
}

// Rows vary as dropless batches make them (m, or k for a transposed A): with
// rows_vary one primitive for every count, without it one per count; both
// against float64.
TEST(MoEKernels, Bf16GemmAccumulatesInFloatAgainstFloat64) {
  Rng rng(fresh_seed());
  SCOPED_TRACE("seed " + std::to_string(rng.seed()));
  for (bool ta : {false, true})
    for (bool tb : {false, true})
      for (bool accumulate : {false, true})
        for (int64_t rows : {37, 5, 37, 1, 5, -37, -5, -1}) {  // negative: the same count with rows_vary
          const bool rows_vary = rows < 0;
          const int64_t count = std::abs(rows);
          const int64_t m = ta ? 37 : count, n = 19, k = ta ? count : 301;
          const int64_t lda = (ta ? m : k) + 3, ldb = (tb ? k : n) + 1, ldc = n + 2;
          auto af = random_floats(rng, (ta ? k : m) * lda), bf = random_floats(rng, (tb ? n : k) * ldb);
          std::vector<uint16_t> a(af.size()), b(bf.size());
          to_bf16(af.data(), static_cast<int64_t>(af.size()), a.data());
          to_bf16(bf.data(), static_cast<int64_t>(bf.size()), b.data());
          auto c = random_floats(rng, m * ldc);
          const auto c0 = c;
          gemm_bf16({.transpose_a = ta, .transpose_b = tb, .m = m, .n = n, .k = k, .a = a.data(), .lda = lda,
                     .b = b.data(), .ldb = ldb, .accumulate = accumulate, .c = c.data(), .ldc = ldc, .rows_vary = rows_vary});
          auto val = [](uint16_t bits) { return double(bf16{bits}.to_float()); };
          for (int64_t i = 0; i < m; ++i)
            for (int64_t j = 0; j < n; ++j) {
              double want = accumulate ? c0[i * ldc + j] : 0.0;
              for (int64_t p = 0; p < k; ++p)
                want += val(ta ? a[p * lda + i] : a[i * lda + p]) * val(tb ? b[j * ldb + p] : b[p * ldb + j]);
              ASSERT_NEAR(c[i * ldc + j], want, 1e-4 * (1 + std::fabs(want))) << ta << tb << accumulate;
            }
          EXPECT_EQ(c[ldc - 1], c0[ldc - 1]);  // padding beyond n untouched
        }
}

// The row-wise GEMM against float64, and batch invariance: every row of a
// batch of 1..9 rows (each remainder of the 4-row blocks) has the bits of the
// same row computed alone, with beta 0 and 1, a partial column tile and an
// odd k.
TEST(MoEKernels, MatmulRowsMatchesFloat64AndEachRowAloneGivesItsBits) {
  Rng rng(20261201);
  const int64_t k = 37, n = 85;  // a 64-column tile, a 16-column tile, 5 single columns
  std::vector<float> w(static_cast<size_t>(k * n));
  for (float& v : w) v = static_cast<float>(rng.uniform(-1, 1));
  for (int64_t rows = 1; rows <= 9; ++rows) {
    std::vector<float> x(static_cast<size_t>(rows * k)), y0(static_cast<size_t>(rows * n));
    for (float& v : x) v = static_cast<float>(rng.uniform(-1, 1));
    for (float& v : y0) v = static_cast<float>(rng.uniform(-1, 1));
    for (const float beta : {0.f, 1.f}) {
      std::vector<float> y = y0;
      if (beta == 0.f) std::fill(y.begin(), y.end(), std::nanf(""));  // poisoned: beta 0 must not read it
      kernels::cpu::matmul_rows(x.data(), rows, k, k, w.data(), n, n, beta, y.data(), n);
      for (int64_t r = 0; r < rows; ++r) {
        std::vector<float> alone(y0.begin() + r * n, y0.begin() + (r + 1) * n);
        kernels::cpu::matmul_rows(x.data() + r * k, 1, k, k, w.data(), n, n, beta, alone.data(), n);
        for (int64_t j = 0; j < n; ++j) {
          double want = beta == 0.f ? 0.0 : static_cast<double>(y0[static_cast<size_t>(r * n + j)]);
          for (int64_t t = 0; t < k; ++t)
            want += static_cast<double>(x[static_cast<size_t>(r * k + t)]) * w[static_cast<size_t>(t * n + j)];
          const float got = y[static_cast<size_t>(r * n + j)];
          ASSERT_NEAR(got, want, 1e-5 * (1 + std::abs(want))) << rows << " rows, row " << r << ", column " << j;
          ASSERT_EQ(std::bit_cast<uint32_t>(got), std::bit_cast<uint32_t>(alone[static_cast<size_t>(j)]))
              << rows << " rows, row " << r << ", column " << j << ", beta " << beta;
        }
      }
    }
  }
}

// Attention over all heads of a row against float64, for head sizes that do
// and do not fill whole registers; and grouping heads never changes a result:
// every head alone gives the same bits as all heads at once.
TEST(MoEKernels, AttendHeadsMatchesFloat64AndGroupingChangesNoBit) {
  Rng rng(fresh_seed());
  SCOPED_TRACE("seed " + std::to_string(rng.seed()));
  for (int heads : {1, 3, 8, 9})
    for (int head_dim : {5, 16, 32})
      for (int positions : {1, 17, 40}) {
        const int width = heads * head_dim, capacity = positions + 3;
        auto q = random_floats(rng, width), keys = random_floats(rng, int64_t{width} * capacity);
        auto values = random_floats(rng, int64_t{capacity} * width);
        const float scale = 1.f / std::sqrt(static_cast<float>(head_dim));
        std::vector<float> scratch(static_cast<size_t>(heads * positions)), out(static_cast<size_t>(width), NAN);
        attend_heads(q.data(), heads, head_dim, keys.data(), capacity, values.data(), width, positions, scale,
                     scratch.data(), out.data());
        for (int h = 0; h < heads; ++h) {
          std::vector<double> p(static_cast<size_t>(positions));
          double top = -INFINITY, sum = 0;
          for (int j = 0; j < positions; ++j) {
            double dot = 0;
            for (int t = 0; t < head_dim; ++t)
              dot += double(q[h * head_dim + t]) * keys[static_cast<size_t>((h * head_dim + t) * capacity + j)];
            p[j] = dot * scale;
            top = std::max(top, p[j]);
          }
          for (auto& v : p) sum += (v = std::exp(v - top));
          for (int t = 0; t < head_dim; ++t) {
            double want = 0;
            for (int j = 0; j < positions; ++j) want += p[j] / sum * values[static_cast<size_t>(j * width + h * head_dim + t)];
            ASSERT_NEAR(out[h * head_dim + t], want, 1e-5 * (1 + std::fabs(want)))
                << heads << " heads of " << head_dim << ", " << positions << " positions";
          }
          // This head alone, through the same entry point.
          std::vector<float> alone(static_cast<size_t>(head_dim), NAN);
          attend_heads(q.data() + h * head_dim, 1, head_dim, keys.data() + h * head_dim * capacity, capacity,
                       values.data() + h * head_dim, width, positions, scale, scratch.data(), alone.data());
          for (int t = 0; t < head_dim; ++t)
            ASSERT_EQ(alone[t], out[h * head_dim + t]) << "head " << h << " of " << heads << " alone differs";
        }
      }
}

}  // namespace
}  // namespace switchyard
