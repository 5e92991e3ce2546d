// MoE row kernels on the GPU: dispatch layout, encode (gather), decode
// (weighted combine), their backward, activations, column sums and the gate's
// backward. Memory-bound: rows move as float4 where the width allows, one
// block per row so a row's reads are coalesced.
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cub/block/block_scan.cuh>

#include "core/error.h"
#include "kernels/cuda/kernels.h"
#include "kernels/cuda/runtime.h"

namespace switchyard::kernels::cuda {
namespace {

constexpr int kTile = 32;  // choices per layout tile: one warp
constexpr unsigned kFull = 0xffffffffu;

unsigned grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(blocks < (1 << 30) ? blocks : (1 << 30));
}

// ---- dispatch layout ----

__global__ void tile_counts_kernel(const int32_t* experts, const int32_t* position_of_expert, int64_t tokens, int k,
                                   int64_t tiles, int32_t* tile_rank, int32_t* tile_base) {
  const int64_t tile = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (tile >= tiles) return;
  const int64_t q = tile * kTile + lane;  // choice-major: q = j * T + t
  const bool valid = q < tokens * k;
  const int64_t t = valid ? q % tokens : 0;
  const int j = valid ? static_cast<int>(q / tokens) : 0;
  int pos = -1;
  if (valid) {
    const int e = experts[t * k + j];
    pos = position_of_expert ? position_of_expert[e] : e;
  }
  const unsigned peers = __match_any_sync(kFull, pos);
  if (!valid) return;
  const unsigned below = peers & ((1u << lane) - 1u);
  tile_rank[t * k + j] = __popc(below);
  if (below == 0) tile_base[static_cast<int64_t>(pos) * tiles + tile] = __popc(peers);
}

// One block per position: exclusive scan of its per-tile counts, in place.
constexpr int kScanThreads = 512;
__global__ void tile_scan_kernel(int64_t tiles, int32_t* tile_base, int32_t* load) {
  using Scan = cub::BlockScan<int32_t, kScanThreads>;
  __shared__ typename Scan::TempStorage temp;
  __shared__ int32_t carry;
  int32_t* row = tile_base + static_cast<int64_t>(blockIdx.x) * tiles;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int64_t begin = 0; begin < tiles; begin += kScanThreads) {
    const int64_t i = begin + threadIdx.x;
    const int32_t v = i < tiles ? row[i] : 0;
    int32_t prefix, total;
    Scan(temp).ExclusiveSum(v, prefix, total);
    if (i < tiles) row[i] = carry + prefix;
    __syncthreads();
    if (threadIdx.x == 0) carry += total;
    __syncthreads();
  }
  if (threadIdx.x == 0) load[blockIdx.x] = carry;
}

__global__ void slots_kernel(const int32_t* experts, const int32_t* position_of_expert, const float* weights,
                             int64_t tokens, int k, int64_t tiles, const int32_t* tile_rank, const int32_t* tile_base,
                             const int64_t* row_base, int64_t capacity, int64_t* row_of_choice, int64_t* token_of_row,
                             float* weight_of_row) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= tokens * k) return;
  const int64_t t = c / k;
  const int j = static_cast<int>(c % k);
  const int e = experts[c];
  const int pos = position_of_expert ? position_of_expert[e] : e;
  const int64_t tile = (j * tokens + t) / kTile;
  const int64_t rank = static_cast<int64_t>(tile_base[static_cast<int64_t>(pos) * tiles + tile]) + tile_rank[c];
  if (rank >= capacity) {
    row_of_choice[c] = -1;
    return;
  }
  const int64_t row = row_base[pos] + rank;
  row_of_choice[c] = row;
  token_of_row[row] = t;
  weight_of_row[row] = weights[c];
}

// ---- rows ----

// float4 rows need widths divisible by 4 and 16-byte aligned bases (decided on the host).
bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

__global__ void gather_rows_kernel(const float* src, const int64_t* index, const float* scale, int64_t width,
                                   float* dst, bool vec4) {
  const int64_t i = blockIdx.x;
  const int64_t from = index[i];
  const float s = scale ? scale[i] : 1.f;
  float* d = dst + i * width;
  if (vec4) {
    float4* d4 = reinterpret_cast<float4*>(d);
    const float4* s4 = reinterpret_cast<const float4*>(src + from * width);
    for (int64_t j = threadIdx.x; j < width / 4; j += blockDim.x) {
      float4 v = from < 0 ? make_float4(0.f, 0.f, 0.f, 0.f) : s4[j];
      if (scale) v.x *= s, v.y *= s, v.z *= s, v.w *= s;
      d4[j] = v;
    }
  } else {
    for (int64_t j = threadIdx.x; j < width; j += blockDim.x) d[j] = from < 0 ? 0.f : s * src[from * width + j];
  }
}

__global__ void scatter_rows_kernel(const float* src, const int64_t* index, int64_t width, float* dst, bool vec4) {
  const int64_t i = blockIdx.x;
  float* d = dst + index[i] * width;
  const float* s = src + i * width;
  if (vec4) {
    for (int64_t j = threadIdx.x; j < width / 4; j += blockDim.x)
      reinterpret_cast<float4*>(d)[j] = reinterpret_cast<const float4*>(s)[j];
  } else {
    for (int64_t j = threadIdx.x; j < width; j += blockDim.x) d[j] = s[j];
  }
}

__global__ void combine_rows_kernel(const float* src, const int64_t* row, const float* scale, int k, int64_t width,
                                    float* out, bool vec4) {
  const int64_t t = blockIdx.x;
  const int64_t* r = row + t * k;
  const float* sc = scale ? scale + t * k : nullptr;
  if (vec4) {
    float4* o4 = reinterpret_cast<float4*>(out + t * width);
    for (int64_t j = threadIdx.x; j < width / 4; j += blockDim.x) {
      float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int c = 0; c < k; ++c) {
        if (r[c] < 0) continue;
        const float s = sc ? sc[c] : 1.f;
        const float4 v = reinterpret_cast<const float4*>(src + r[c] * width)[j];
        acc.x += s * v.x, acc.y += s * v.y, acc.z += s * v.z, acc.w += s * v.w;
      }
      o4[j] = acc;
    }
  } else {
    for (int64_t j = threadIdx.x; j < width; j += blockDim.x) {
      float acc = 0.f;
      for (int c = 0; c < k; ++c)
        if (r[c] >= 0) acc += (sc ? sc[c] : 1.f) * src[r[c] * width + j];
      out[t * width + j] = acc;
    }
  }
}

// One warp per row.
__global__ void row_dots_kernel(const float* a, const int64_t* index, const float* b, int64_t rows, int64_t width,
                                float* out, bool vec4) {
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (i >= rows) return;
  const int64_t from = index[i];
  float acc = 0.f;
  if (from >= 0) {
    const float* x = a + from * width;
    const float* y = b + i * width;
    if (vec4) {
      for (int64_t j = lane; j < width / 4; j += 32) {
        const float4 u = reinterpret_cast<const float4*>(x)[j], v = reinterpret_cast<const float4*>(y)[j];
        acc += u.x * v.x + u.y * v.y + u.z * v.z + u.w * v.w;
      }
    } else {
      for (int64_t j = lane; j < width; j += 32) acc += x[j] * y[j];
    }
  }
  for (int o = 16; o; o >>= 1) acc += __shfl_xor_sync(kFull, acc, o);
  if (lane == 0) out[i] = acc;
}

constexpr int kColumnRows = 128;  // rows per partial sum
__global__ void column_partials_kernel(const float* x, int64_t rows, int64_t width, float* partial) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t chunk = blockIdx.y;
  if (col >= width) return;
  const int64_t end = min(rows, (chunk + 1) * kColumnRows);
  float acc = 0.f;
  for (int64_t r = chunk * kColumnRows; r < end; ++r) acc += x[r * width + col];
  partial[chunk * width + col] = acc;
}
__global__ void column_finish_kernel(const float* partial, int64_t chunks, int64_t width, float* acc) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= width) return;
  float s = 0.f;
  for (int64_t c = 0; c < chunks; ++c) s += partial[c * width + col];
  acc[col] += s;
}

__global__ void broadcast_rows_kernel(const float* bias, int64_t n, int64_t width, float* y) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    y[i] = bias[i % width];
}

__device__ inline float sigmoidf(float v) { return 1.f / (1.f + expf(-v)); }
constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

__global__ void activation_forward_kernel(Activation act, const float* x, int64_t rows, int64_t width, float* y) {
  const int64_t n = rows * width;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (act == Activation::relu) {
      y[i] = x[i] > 0.f ? x[i] : 0.f;
    } else if (act == Activation::gelu) {
      y[i] = 0.5f * x[i] * (1.f + erff(x[i] * kInvSqrt2));
    } else {
      const int64_t r = i / width, j = i % width;
      const float gate = x[r * 2 * width + j], up = x[r * 2 * width + width + j];
      y[i] = gate * sigmoidf(gate) * up;
    }
  }
}

__global__ void activation_backward_kernel(Activation act, const float* x, const float* dy, int64_t rows,
                                           int64_t width, float* dx) {
  const int64_t n = rows * width;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (act == Activation::relu) {
      dx[i] = x[i] > 0.f ? dy[i] : 0.f;
    } else if (act == Activation::gelu) {
      const float cdf = 0.5f * (1.f + erff(x[i] * kInvSqrt2));
      const float pdf = kInvSqrt2Pi * expf(-0.5f * x[i] * x[i]);
      dx[i] = dy[i] * (cdf + x[i] * pdf);
    } else {
      const int64_t r = i / width, j = i % width;
      const float gate = x[r * 2 * width + j], up = x[r * 2 * width + width + j];
      const float s = sigmoidf(gate), silu = gate * s;
      dx[r * 2 * width + j] = dy[i] * up * s * (1.f + gate * (1.f - s));
      dx[r * 2 * width + width + j] = dy[i] * silu;
    }
  }
}

__global__ void from_bf16_kernel(const uint16_t* src, int64_t n, float* dst) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = __uint_as_float(static_cast<unsigned>(src[i]) << 16);
}

// One thread per (row, 128-column block): the block's largest magnitude, its scale, its values.
__global__ void to_fp8_rows_kernel(const float* src, int64_t rows, int64_t width, uint8_t* dst) {
  const int64_t blocks = (width + kernels::kFp8Block - 1) / kernels::kFp8Block, bytes = 4 * blocks + width;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < rows * blocks;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / blocks, b = i % blocks, lo = b * kernels::kFp8Block;
    const int64_t hi = lo + kernels::kFp8Block < width ? lo + kernels::kFp8Block : width;
    const float* x = src + r * width;
    float amax = 0;
    for (int64_t j = lo; j < hi; ++j) amax = fmaxf(amax, fabsf(x[j]));
    const float scale = amax > 0 ? amax / 448.0f : 1.0f;
    uint8_t* out = dst + r * bytes;
    memcpy(out + 4 * b, &scale, 4);
    for (int64_t j = lo; j < hi; ++j)
      out[4 * blocks + j] = static_cast<uint8_t>(__nv_cvt_float_to_fp8(x[j] / scale, __NV_SATFINITE, __NV_E4M3));
  }
}

__global__ void from_fp8_rows_kernel(const uint8_t* src, int64_t rows, int64_t width, float* dst) {
  const int64_t blocks = (width + kernels::kFp8Block - 1) / kernels::kFp8Block, bytes = 4 * blocks + width;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < rows * width;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / width, j = i % width;
    const uint8_t* in = src + r * bytes;
    float scale;
    memcpy(&scale, in + 4 * (j / kernels::kFp8Block), 4);
    const __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(in[4 * blocks + j]), __NV_E4M3);
    dst[i] = __half2float(__half(h)) * scale;
  }
}

__global__ void to_bf16_kernel(const float* src, int64_t n, uint16_t* dst) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const __nv_bfloat16 b = __float2bfloat16_rn(src[i]);
    dst[i] = *reinterpret_cast<const uint16_t*>(&b);
  }
}

__global__ void axpy_kernel(float alpha, const float* x, int64_t n, float* y) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    y[i] += alpha * x[i];
}

// One thread per token; E is small (the gate's limit), k smaller.
__global__ void gate_backward_kernel(GateBackwardArgs a) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= a.tokens) return;
  const int E = a.experts_total, k = a.k;
  const float* s = a.scores + t * E;
  const int32_t* chosen = a.experts + t * k;
  double dw[32];
  double chosen_sum = 0.0, dot = 0.0;
  for (int j = 0; j < k; ++j) {
    const int64_t row = a.row_of_choice[t * k + j];
    dw[j] = row >= 0 ? a.d_weight_of_row[row] : 0.0;
    chosen_sum += s[chosen[j]];
    dot += dw[j] * a.weights[t * k + j];
  }
  double row_sum = 0.0, gs = 0.0;
  if (a.balance_grad) {
    for (int e = 0; e < E; ++e) row_sum += s[e];
    for (int e = 0; e < E; ++e) gs += a.balance_grad[e] * s[e] / row_sum;
  }
  auto ds_of = [&](int e) {
    double d = 0.0;
    for (int j = 0; j < k; ++j)
      if (chosen[j] == e) d = a.renormalize ? (dw[j] - dot) / chosen_sum : dw[j];
    if (a.balance_grad) d += (a.balance_grad[e] - gs) / row_sum;
    return d;
  };
  float* dl = a.d_logits + t * E;
  if (a.score == GateScore::softmax) {
    double sds = 0.0;
    for (int e = 0; e < E; ++e) sds += s[e] * ds_of(e);
    for (int e = 0; e < E; ++e) dl[e] = static_cast<float>(s[e] * (ds_of(e) - sds));
  } else {
    for (int e = 0; e < E; ++e) dl[e] = static_cast<float>(ds_of(e) * s[e] * (1.0 - s[e]));
  }
  if (a.z_coef != 0.0) {
    const float* raw = a.logits + t * E;
    double m = -INFINITY, sum = 0.0;
    for (int e = 0; e < E; ++e) m = fmax(m, static_cast<double>(raw[e]));
    for (int e = 0; e < E; ++e) sum += exp(raw[e] - m);
    const double lse = m + log(sum);
    for (int e = 0; e < E; ++e)
      dl[e] += static_cast<float>(a.z_coef * 2.0 * lse * exp(raw[e] - lse) / static_cast<double>(a.tokens));
  }
}

__global__ void router_stats_kernel(const float* scores, const float* logits, int64_t tokens, int E, float* normalized,
                                    float* lse_squared) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= tokens) return;
  const float* s = scores + t * E;
  const float* x = logits + t * E;
  double row_sum = 0.0, m = -INFINITY;
  for (int e = 0; e < E; ++e) row_sum += s[e], m = fmax(m, static_cast<double>(x[e]));
  for (int e = 0; e < E; ++e) normalized[t * E + e] = static_cast<float>(s[e] / row_sum);
  double sum = 0.0;
  for (int e = 0; e < E; ++e) sum += exp(x[e] - m);
  const double lse = m + log(sum);
  lse_squared[t] = static_cast<float>(lse * lse);
}

constexpr int kThreads = 256;
unsigned row_threads(int64_t width, bool vec4) {
  const int64_t units = vec4 ? width / 4 : width;
  const int64_t warps = (units + 31) / 32;
  return static_cast<unsigned>(warps >= kThreads / 32 ? kThreads : (warps > 0 ? warps * 32 : 32));
}
void check_rows(const char* op, int64_t rows, int64_t width) {
  if (rows < 0 || width < 0 || rows > (int64_t{1} << 31) - 1)
    SY_THROW(InvalidArgument, "cuda ", op, ": rows = ", rows, ", width = ", width,
             "; expected 0 <= rows < 2^31 and width >= 0");
}

}  // namespace

int64_t dispatch_tiles(int64_t tokens, int k) { return (tokens * k + kTile - 1) / kTile; }

void dispatch_counts(const int32_t* experts, const int32_t* position_of_expert, int64_t tokens, int k, int positions,
                     int32_t* tile_rank, int32_t* tile_base, int32_t* load, cudaStream_t stream) {
  const int64_t tiles = dispatch_tiles(tokens, k);
  if (positions < 1) SY_THROW(InvalidArgument, "cuda dispatch_counts: positions = ", positions, ", expected >= 1");
  SY_CUDA_CHECK(cudaMemsetAsync(tile_base, 0, static_cast<size_t>(tiles * positions) * sizeof(int32_t), stream));
  if (tiles > 0) {
    tile_counts_kernel<<<grid_for(tiles * 32, kThreads), kThreads, 0, stream>>>(experts, position_of_expert, tokens, k,
                                                                                 tiles, tile_rank, tile_base);
    SY_CUDA_CHECK_LAUNCH();
  }
  tile_scan_kernel<<<static_cast<unsigned>(positions), kScanThreads, 0, stream>>>(tiles, tile_base, load);
  SY_CUDA_CHECK_LAUNCH();
}

void dispatch_slots(const int32_t* experts, const int32_t* position_of_expert, const float* weights, int64_t tokens,
                    int k, int positions, const int32_t* tile_rank, const int32_t* tile_base, const int64_t* row_base,
                    int64_t capacity, int64_t* row_of_choice, int64_t* token_of_row, float* weight_of_row,
                    cudaStream_t stream) {
  if (tokens * k == 0) return;
  slots_kernel<<<grid_for(tokens * k, kThreads), kThreads, 0, stream>>>(
      experts, position_of_expert, weights, tokens, k, dispatch_tiles(tokens, k), tile_rank, tile_base, row_base,
      capacity, row_of_choice, token_of_row, weight_of_row);
  SY_CUDA_CHECK_LAUNCH();
}

void gather_rows(const float* src, const int64_t* index, int64_t rows, int64_t width, float* dst, cudaStream_t stream) {
  check_rows("gather_rows", rows, width);
  if (rows == 0 || width == 0) return;
  const bool vec = width % 4 == 0 && aligned16(src) && aligned16(dst);
  gather_rows_kernel<<<static_cast<unsigned>(rows), row_threads(width, vec), 0, stream>>>(src, index, nullptr, width, dst,
                                                                                         vec);
  SY_CUDA_CHECK_LAUNCH();
}

void scatter_rows(const float* src, const int64_t* index, int64_t rows, int64_t width, float* dst, cudaStream_t stream) {
  check_rows("scatter_rows", rows, width);
  if (rows == 0 || width == 0) return;
  const bool vec = width % 4 == 0 && aligned16(src) && aligned16(dst);
  scatter_rows_kernel<<<static_cast<unsigned>(rows), row_threads(width, vec), 0, stream>>>(src, index, width, dst, vec);
  SY_CUDA_CHECK_LAUNCH();
}

void gather_scaled_rows(const float* src, const int64_t* index, const float* scale, int64_t rows, int64_t width,
                        float* dst, cudaStream_t stream) {
  check_rows("gather_scaled_rows", rows, width);
  if (rows == 0 || width == 0) return;
  const bool vec = width % 4 == 0 && aligned16(src) && aligned16(dst);
  gather_rows_kernel<<<static_cast<unsigned>(rows), row_threads(width, vec), 0, stream>>>(src, index, scale, width, dst,
                                                                                         vec);
  SY_CUDA_CHECK_LAUNCH();
}

void combine_rows(const float* src, const int64_t* row, const float* scale, int64_t tokens, int k, int64_t width,
                  float* out, cudaStream_t stream) {
  check_rows("combine_rows", tokens, width);
  if (tokens == 0 || width == 0) return;
  const bool vec = width % 4 == 0 && aligned16(src) && aligned16(out);
  combine_rows_kernel<<<static_cast<unsigned>(tokens), row_threads(width, vec), 0, stream>>>(src, row, scale, k, width,
                                                                                            out, vec);
  SY_CUDA_CHECK_LAUNCH();
}

void row_dots(const float* a, const int64_t* index, const float* b, int64_t rows, int64_t width, float* out,
              cudaStream_t stream) {
  check_rows("row_dots", rows, width);
  if (rows == 0) return;
  const bool vec = width % 4 == 0 && aligned16(a) && aligned16(b);
  row_dots_kernel<<<grid_for(rows * 32, kThreads), kThreads, 0, stream>>>(a, index, b, rows, width, out, vec);
  SY_CUDA_CHECK_LAUNCH();
}

int64_t column_sum_scratch(int64_t rows, int64_t width) {
  return ((rows + kColumnRows - 1) / kColumnRows) * width;
}

void add_column_sums(const float* x, int64_t rows, int64_t width, float* acc, float* scratch, cudaStream_t stream) {
  check_rows("add_column_sums", rows, width);
  if (rows == 0 || width == 0) return;
  const int64_t chunks = (rows + kColumnRows - 1) / kColumnRows;
  const dim3 grid(grid_for(width, kThreads), static_cast<unsigned>(chunks));
  column_partials_kernel<<<grid, kThreads, 0, stream>>>(x, rows, width, scratch);
  SY_CUDA_CHECK_LAUNCH();
  column_finish_kernel<<<grid_for(width, kThreads), kThreads, 0, stream>>>(scratch, chunks, width, acc);
  SY_CUDA_CHECK_LAUNCH();
}

namespace {
unsigned elementwise_grid(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}
}  // namespace

void broadcast_rows(const float* bias, int64_t rows, int64_t width, float* y, cudaStream_t stream) {
  check_rows("broadcast_rows", rows, width);
  if (rows * width == 0) return;
  broadcast_rows_kernel<<<elementwise_grid(rows * width), kThreads, 0, stream>>>(bias, rows * width, width, y);
  SY_CUDA_CHECK_LAUNCH();
}

void activation_forward(Activation act, const float* x, int64_t rows, int64_t width, float* y, cudaStream_t stream) {
  check_rows("activation_forward", rows, width);
  if (rows * width == 0) return;
  activation_forward_kernel<<<elementwise_grid(rows * width), kThreads, 0, stream>>>(act, x, rows, width, y);
  SY_CUDA_CHECK_LAUNCH();
}

void activation_backward(Activation act, const float* x, const float* dy, int64_t rows, int64_t width, float* dx,
                         cudaStream_t stream) {
  check_rows("activation_backward", rows, width);
  if (rows * width == 0) return;
  activation_backward_kernel<<<elementwise_grid(rows * width), kThreads, 0, stream>>>(act, x, dy, rows, width, dx);
  SY_CUDA_CHECK_LAUNCH();
}

void axpy(float alpha, const float* x, int64_t n, float* y, cudaStream_t stream) {
  if (n <= 0) return;
  axpy_kernel<<<elementwise_grid(n), kThreads, 0, stream>>>(alpha, x, n, y);
  SY_CUDA_CHECK_LAUNCH();
}

void to_bf16(const float* src, int64_t n, uint16_t* dst, cudaStream_t stream) {
  if (n <= 0) return;
  to_bf16_kernel<<<elementwise_grid(n), kThreads, 0, stream>>>(src, n, dst);
  SY_CUDA_CHECK_LAUNCH();
}

void from_bf16(const uint16_t* src, int64_t n, float* dst, cudaStream_t stream) {
  if (n <= 0) return;
  from_bf16_kernel<<<elementwise_grid(n), kThreads, 0, stream>>>(src, n, dst);
  SY_CUDA_CHECK_LAUNCH();
}

void to_fp8_rows(const float* src, int64_t rows, int64_t width, uint8_t* dst, cudaStream_t stream) {
  const int64_t n = rows * ((width + kernels::kFp8Block - 1) / kernels::kFp8Block);
  if (n <= 0) return;
  to_fp8_rows_kernel<<<elementwise_grid(n), kThreads, 0, stream>>>(src, rows, width, dst);
  SY_CUDA_CHECK_LAUNCH();
}

void from_fp8_rows(const uint8_t* src, int64_t rows, int64_t width, float* dst, cudaStream_t stream) {
  if (rows * width <= 0) return;
  from_fp8_rows_kernel<<<elementwise_grid(rows * width), kThreads, 0, stream>>>(src, rows, width, dst);
  SY_CUDA_CHECK_LAUNCH();
}

void gate_backward(const GateBackwardArgs& a, cudaStream_t stream) {
  if (a.k < 1 || a.k > 32) SY_THROW(InvalidArgument, "cuda gate_backward: k = ", a.k, ", expected 1..32");
  if (a.tokens == 0) return;
  gate_backward_kernel<<<grid_for(a.tokens, 128), 128, 0, stream>>>(a);
  SY_CUDA_CHECK_LAUNCH();
}

void router_stats(const float* scores, const float* logits, int64_t tokens, int experts, float* normalized,
                  float* lse_squared, cudaStream_t stream) {
  if (tokens == 0) return;
  router_stats_kernel<<<grid_for(tokens, 128), 128, 0, stream>>>(scores, logits, tokens, experts, normalized,
                                                                 lse_squared);
  SY_CUDA_CHECK_LAUNCH();
}

}  // namespace switchyard::kernels::cuda
