// Gate top-k: one warp per token. Lane i holds experts i, i+32, ... in
// registers (kMaxGateExperts / 32 of them, indexed by unrolled constants), so
// a token's row is read once, coalesced, and the max / sum / argmax are warp
// shuffles. Same arithmetic order as far as it matters for the choice: ties go
// to the lower expert index.
#include <cfloat>

#include "core/error.h"
#include "kernels/cuda/kernels.h"
#include "kernels/cuda/runtime.h"

namespace switchyard::kernels::cuda {
namespace {

constexpr int kPerLane = kMaxGateExperts / 32;
constexpr unsigned kFull = 0xffffffffu;

__device__ float warp_max(float v) {
  for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}
__device__ float warp_sum(float v) {
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}
// (value, index) of the best; ties to the lower index; index -1 loses to any.
__device__ void warp_argmax(float& v, int& i) {
  for (int o = 16; o; o >>= 1) {
    const float ov = __shfl_xor_sync(kFull, v, o);
    const int oi = __shfl_xor_sync(kFull, i, o);
    if (oi >= 0 && (i < 0 || ov > v || (ov == v && oi < i))) v = ov, i = oi;
  }
}

__global__ void topk_gate_kernel(TopKGateArgs a) {
  const int64_t t = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (t >= a.tokens) return;  // whole warps leave together
  const int E = a.experts;
  const float* x = a.logits + t * E;
  float score[kPerLane], select[kPerLane];
  bool allowed[kPerLane];
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int e = lane + 32 * j;
    score[j] = e < E ? x[e] : -FLT_MAX;
    allowed[j] = e < E;
  }
  if (a.score == GateScore::softmax) {
    float m = -FLT_MAX;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) m = fmaxf(m, score[j]);
    m = warp_max(m);
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      score[j] = allowed[j] ? expf(score[j] - m) : 0.f;
      sum += score[j];
    }
    const float inv = 1.f / warp_sum(sum);
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) select[j] = score[j] *= inv;
  } else {
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int e = lane + 32 * j;
      score[j] = allowed[j] ? 1.f / (1.f + expf(-score[j])) : 0.f;
      select[j] = score[j] + (allowed[j] && a.bias ? a.bias[e] : 0.f);
    }
  }
  if (a.scores_out)
#pragma unroll
    for (int j = 0; j < kPerLane; ++j)
      if (allowed[j]) a.scores_out[t * E + lane + 32 * j] = score[j];

  if (a.groups > 1) {
    // Group score: the sum of its two best selection scores; keep the topk_groups best groups.
    const int group_size = E / a.groups;
    unsigned long long chosen_groups = 0;  // groups <= 64 (validated by the caller)
    for (int pick = 0; pick < a.topk_groups; ++pick) {
      float best_v = 0.f;
      int best_g = -1;
      for (int g = 0; g < a.groups; ++g) {
        if (chosen_groups >> g & 1ull) continue;
        float first = -FLT_MAX, second = -FLT_MAX;
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) {
          const int e = lane + 32 * j;
          if (e < E && e / group_size == g) {
            if (select[j] > first) second = first, first = select[j];
            else if (select[j] > second) second = select[j];
          }
        }
        // Top two of the warp: the max, then the max with one copy of it removed.
        const float top = warp_max(first);
        const unsigned holders = __ballot_sync(kFull, first == top);
        const int holder = __ffs(holders) - 1;
        const float rest = warp_max(lane == holder ? second : first);
        const float gs = group_size > 1 ? top + rest : top;
        if (best_g < 0 || gs > best_v) best_v = gs, best_g = g;
      }
      chosen_groups |= 1ull << best_g;
    }
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int e = lane + 32 * j;
      if (e < E) allowed[j] = chosen_groups >> (e / group_size) & 1ull;
    }
  }

  // Lane c keeps the c-th choice in registers; lanes < k write them at the end.
  float total = 0.f, my_w = 0.f;
  int my_idx = -1;
  for (int c = 0; c < a.k; ++c) {
    float v = 0.f;
    int idx = -1;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int e = lane + 32 * j;
      if (allowed[j] && (idx < 0 || select[j] > v)) v = select[j], idx = e;
    }
    warp_argmax(v, idx);
    // The winner's score, from the lane that holds it.
    float w = 0.f;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j)
      if (lane + 32 * j == idx) {
        w = score[j];
        allowed[j] = false;
      }
    w = __shfl_sync(kFull, w, (idx < 0 ? 0 : idx) % 32);
    total += w;
    if (lane == c) my_w = w, my_idx = idx;
  }
  if (lane < a.k) {
    a.experts_out[t * a.k + lane] = my_idx;
    a.weights_out[t * a.k + lane] = a.renormalize && total > 0.f ? my_w / total : my_w;
  }
}

}  // namespace

void topk_gate(const TopKGateArgs& a, cudaStream_t stream) {
  if (a.experts < 1 || a.experts > kMaxGateExperts)
    SY_THROW(NotSupported, "cuda topk_gate: experts = ", a.experts, ", the CUDA gate takes 1..", kMaxGateExperts);
  if (a.k < 1 || a.k > a.experts || a.k > 32)
    SY_THROW(InvalidArgument, "cuda topk_gate: k = ", a.k, ", expected 1..min(32, experts = ", a.experts, ")");
  if (a.groups < 1 || a.groups > 64 || a.experts % a.groups || a.topk_groups < 1 || a.topk_groups > a.groups)
    SY_THROW(InvalidArgument, "cuda topk_gate: groups = ", a.groups, ", topk_groups = ", a.topk_groups,
             ", expected groups in 1..64 dividing experts = ", a.experts, " and topk_groups in 1..groups");
  if (a.k > a.topk_groups * (a.experts / a.groups))
    SY_THROW(InvalidArgument, "cuda topk_gate: k = ", a.k, " exceeds the ", a.topk_groups * (a.experts / a.groups),
             " experts of the topk_groups = ", a.topk_groups, " groups it may choose from");
  if (a.tokens == 0) return;
  constexpr int kThreads = 256;  // 8 tokens per block
  const int64_t blocks = (a.tokens * 32 + kThreads - 1) / kThreads;
  topk_gate_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
  SY_CUDA_CHECK_LAUNCH();
}

}  // namespace switchyard::kernels::cuda
