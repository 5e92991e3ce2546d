#include "kernels/reduce.h"

#include <algorithm>
#include <cstdint>

#include "core/error.h"

namespace switchyard {

std::string_view reduce_op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum: return "sum";
    case ReduceOp::max: return "max";
    case ReduceOp::min: return "min";
  }
  return "unknown";
}

bool is_reducible(DType t) {
  return t == DType::f32 || t == DType::f64 || t == DType::bf16 || t == DType::f16 || t == DType::i32 ||
         t == DType::i64;
}

namespace kernels::cpu {
namespace {

template <typename T, typename Op>
void apply(T* __restrict acc, const T* __restrict in, size_t n, Op op) {
  for (size_t i = 0; i < n; ++i) acc[i] = op(acc[i], in[i]);
}

template <typename T>
void reduce_native(void* acc, const void* in, size_t n, ReduceOp op) {
  T* a = static_cast<T*>(acc);
  const T* b = static_cast<const T*>(in);
  switch (op) {
    case ReduceOp::sum: apply(a, b, n, [](T x, T y) { return static_cast<T>(x + y); }); break;
    case ReduceOp::max: apply(a, b, n, [](T x, T y) { return std::max(x, y); }); break;
    case ReduceOp::min: apply(a, b, n, [](T x, T y) { return std::min(x, y); }); break;
  }
}

// bf16/f16: widen a block to float, reduce, narrow back. Blocks keep it in L1.
template <typename H>
void reduce_half(void* acc, const void* in, size_t n, ReduceOp op) {
  H* a = static_cast<H*>(acc);
  const H* b = static_cast<const H*>(in);
  constexpr size_t kBlock = 1024;
  float fa[kBlock], fb[kBlock];
  for (size_t base = 0; base < n; base += kBlock) {
    const size_t m = std::min(kBlock, n - base);
    for (size_t i = 0; i < m; ++i) {
      fa[i] = a[base + i].to_float();
      fb[i] = b[base + i].to_float();
    }
    reduce_native<float>(fa, fb, m, op);
    for (size_t i = 0; i < m; ++i) a[base + i] = H::from_float(fa[i]);
  }
}

}  // namespace

void reduce_into(void* acc, const void* in, size_t count, DType dtype, ReduceOp op) {
  if (count == 0) return;
  switch (dtype) {
    case DType::f32: return reduce_native<float>(acc, in, count, op);
    case DType::f64: return reduce_native<double>(acc, in, count, op);
    case DType::i32: return reduce_native<int32_t>(acc, in, count, op);
    case DType::i64: return reduce_native<int64_t>(acc, in, count, op);
    case DType::bf16: return reduce_half<bf16>(acc, in, count, op);
    case DType::f16: return reduce_half<f16>(acc, in, count, op);
    default: break;
  }
  SY_THROW(NotSupported, "reduction ", reduce_op_name(op), " does not support dtype ", dtype_name(dtype),
           " (supported: f32, f64, bf16, f16, i32, i64)");
}

}  // namespace kernels::cpu
}  // namespace switchyard
