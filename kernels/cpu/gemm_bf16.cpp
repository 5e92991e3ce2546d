#include <cstring>
#include <map>
#include <omp.h>

#include <oneapi/dnnl/dnnl.hpp>
#include <tuple>

#include "core/dtype.h"
#include "core/error.h"
#include "kernels/gemm.h"

namespace switchyard::kernels::cpu {
namespace {

using dnnl::memory;

// Row-major [rows, cols] with leading dimension ld, or its transpose view.
memory::desc matrix(int64_t rows, int64_t cols, int64_t ld, bool transposed, memory::data_type type) {
  // op(X) is [rows, cols]; X itself is stored row-major with leading dimension ld.
  const memory::dims strides = transposed ? memory::dims{1, ld} : memory::dims{ld, 1};
  return memory::desc({rows, cols}, type, strides);
}

// The primitive's key. With rows_vary the row dimension is a runtime one
// (DNNL_RUNTIME_DIM_VAL: m, or k when A is transposed, a weight gradient
// X^T dY summing over the rows), so one primitive serves every row count and
// no JIT compile (~0.3-0.6 ms each) runs per new count. Measured here with
// oneDNN 2.6 at n = k = 1024, 2 threads: 100 / 145 / 142 GFLOP/s at m = 32 /
// 128 / 1000 against 113 / 81 / 143 for primitives made for that m. A bf16
// training step on runtime primitives was ~5% slower (its transposed shapes),
// so the MoE layer sets rows_vary for dropless forwards only.
struct Key {
  int64_t m, n, k, lda, ldb, ldc;  // a runtime dimension is -1
  bool ta, tb, accumulate;
  int threads;  // oneDNN splits the work when the primitive is created
  auto operator<=>(const Key&) const = default;
};

// One cache per thread: a primitive's library-managed scratchpad belongs to the
// thread that created it, so thread-ranks must not execute each other's. The
// cache is bounded and starts over when full.
constexpr size_t kMaxCachedPrimitives = 256;

struct Cache {
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  std::map<Key, dnnl::matmul> primitives;
};

Cache& cache() {
  thread_local Cache c;
  return c;
}

}  // namespace

void gemm_bf16(const GemmBf16Args& g) {
  if (g.m == 0 || g.n == 0) return;
  if (g.k == 0) {
    if (!g.accumulate)
      for (int64_t i = 0; i < g.m; ++i)
        for (int64_t j = 0; j < g.n; ++j) g.c[i * g.ldc + j] = 0.f;
    return;
  }
  // With rows_vary the rows are a runtime dimension: k for X^T dY, else m.
  const bool runtime_m = g.rows_vary && !g.transpose_a, runtime_k = g.rows_vary && g.transpose_a;
  const int64_t m = runtime_m ? DNNL_RUNTIME_DIM_VAL : g.m, k = runtime_k ? DNNL_RUNTIME_DIM_VAL : g.k;
  const Key key{runtime_m ? -1 : g.m, g.n, runtime_k ? -1 : g.k, g.lda, g.ldb, g.ldc,
                g.transpose_a, g.transpose_b, g.accumulate, omp_get_max_threads()};
  Cache& cc = cache();
  dnnl::matmul primitive;
  {
    auto it = cc.primitives.find(key);
    if (it == cc.primitives.end() && cc.primitives.size() >= kMaxCachedPrimitives) cc.primitives.clear();
    if (it == cc.primitives.end()) {
      dnnl::primitive_attr attr;
      if (g.accumulate) {
        dnnl::post_ops ops;
        ops.append_sum(1.f);
        attr.set_post_ops(ops);
      }
      try {
        const memory::desc a = matrix(m, k, g.lda, g.transpose_a, memory::data_type::bf16);
        const memory::desc b = matrix(k, g.n, g.ldb, g.transpose_b, memory::data_type::bf16);
        const memory::desc c = matrix(m, g.n, g.ldc, false, memory::data_type::f32);
        dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a, b, c), attr, cc.engine);
        it = cc.primitives.emplace(key, dnnl::matmul(pd)).first;
      } catch (const dnnl::error& e) {
        SY_THROW(NotSupported, "oneDNN has no bf16 matmul for m=", g.m, " n=", g.n, " k=", g.k, ": ", e.what());
      }
    }
    primitive = it->second;
  }
  // One stream per call: the primitive is shared, its arguments are not (they carry this call's sizes).
  dnnl::stream stream(cc.engine);
  memory am(matrix(g.m, g.k, g.lda, g.transpose_a, memory::data_type::bf16), cc.engine, const_cast<uint16_t*>(g.a));
  memory bm(matrix(g.k, g.n, g.ldb, g.transpose_b, memory::data_type::bf16), cc.engine, const_cast<uint16_t*>(g.b));
  memory cm(matrix(g.m, g.n, g.ldc, false, memory::data_type::f32), cc.engine, g.c);
  primitive.execute(stream, {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm}, {DNNL_ARG_DST, cm}});
  stream.wait();
}

void to_bf16(const float* src, int64_t n, uint16_t* dst) {
#pragma omp parallel for schedule(static) if (n >= (1 << 15))
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16::from_float(src[i]).bits;
}

void from_bf16(const uint16_t* src, int64_t n, float* dst) {
#pragma omp parallel for schedule(static) if (n >= (1 << 15))
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = static_cast<uint32_t>(src[i]) << 16;
    std::memcpy(dst + i, &bits, sizeof bits);
  }
}

}  // namespace switchyard::kernels::cpu
