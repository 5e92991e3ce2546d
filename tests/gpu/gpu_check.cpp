// The GPU check (tests/gpu/run.sh runs it on a lent GPU): every CUDA kernel
// against its CPU reference on fresh random inputs with poisoned outputs, a
// 1-rank NCCL communicator, the device MoE layer's forward and backward
// against the host MoELayer, MoELayer on CudaOps against MoELayer on CpuOps
// for every plan on 1, 2 and 4 thread-ranks, and a table of kernel times against the HBM
// floor (bytes over the copy bandwidth measured in the same run) and GEMM
// rates. Exit status 0 only when every check passed.
//
// Multi-rank NCCL needs one GPU per rank: on a one-GPU machine it cannot be
// checked, and this program says so.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <mutex>
#include <iostream>
#include <numeric>
#include <string>
#include <vector>

#include "comm/backends/nccl/nccl_backend.h"
#include "comm/backends/staged/staged_backend.h"
#include "comm/backends/threads/threads_backend.h"
#include "core/rng.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/kernels.h"
#include "kernels/cuda/runtime.h"
#include "kernels/gemm.h"
#include "kernels/moe.h"
#include "kernels/router.h"
#include "moe/cuda/cuda_ops.h"
#include "moe/cuda/device_moe_layer.h"
#include "moe/eplb.h"
#include "moe/ops.h"
#include "moe/moe_layer.h"

using namespace switchyard;
namespace kc = kernels::cuda;
namespace kh = kernels::cpu;

namespace {

int failures = 0, checks = 0;
Rng rng(fresh_seed());

void report(bool ok, const std::string& what, const std::string& detail = "") {
  ++checks;
  if (!ok) ++failures;
  std::printf("%s  %s%s%s\n", ok ? "PASS" : "FAIL", what.c_str(), detail.empty() ? "" : "  ", detail.c_str());
  std::fflush(stdout);
}

Tensor host_random(Shape shape, double lo = -1.0, double hi = 1.0) {
  Tensor t = Tensor::empty(std::move(shape), DType::f32);
  rng.fill_uniform(t, lo, hi);
  return t;
}
Tensor dev(const Tensor& host) { return cuda::to_device(host, 0); }
// A device output poisoned with NaN (0xFF bytes) so an unwritten element fails.
Tensor poisoned(Shape shape, DType dtype = DType::f32) {
  Tensor t = cuda::empty(std::move(shape), dtype, 0);
  cuda::fill_bytes(t, 0xFF);
  return t;
}
Tensor host(const Tensor& d) { return cuda::to_host(d); }

// ||a - b|| / max(||b||, tiny) in f64; NaN anywhere fails.
double rel_error(const float* a, const float* b, int64_t n) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(a[i]) || !std::isfinite(b[i])) return INFINITY;
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-30);
}
void compare(const std::string& what, const Tensor& device_result, const float* expected, double tol) {
  const Tensor h = host(device_result);
  const double e = rel_error(h.data_as<float>(), expected, h.numel());
  char buf[96];
  std::snprintf(buf, sizeof buf, "rel err %.2e (tol %.0e, %lld values)", e, tol, static_cast<long long>(h.numel()));
  report(e <= tol, what, buf);
}
template <typename T>
void compare_exact(const std::string& what, const Tensor& device_result, const T* expected) {
  const Tensor h = host(device_result);
  const int64_t n = h.numel();
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad += static_cast<const T*>(h.data())[i] != expected[i];
  report(bad == 0, what, std::to_string(bad) + " of " + std::to_string(n) + " differ");
}

std::vector<int64_t> random_index(int64_t rows, int64_t range, double empty_share) {
  std::vector<int64_t> idx(static_cast<size_t>(rows));
  Tensor u = host_random({rows}, 0.0, 1.0);
  for (int64_t i = 0; i < rows; ++i)
    idx[static_cast<size_t>(i)] = u.data_as<float>()[i] < empty_share ? -1 : static_cast<int64_t>(u.data_as<float>()[i] * 1e6) % range;
  return idx;
}
Tensor dev_i64(const std::vector<int64_t>& v) {
  return cuda::to_device(TensorView(const_cast<int64_t*>(v.data()), DType::i64, {static_cast<int64_t>(v.size())}), 0);
}

// ---- kernels ----

void check_gate() {
  struct Case { int64_t T; int E, k; kernels::GateScore score; bool renorm; int groups, topk_groups; };
  for (const Case& c : {Case{1000, 64, 2, kernels::GateScore::softmax, false, 1, 1}, Case{777, 7, 3, kernels::GateScore::softmax, true, 1, 1},
                        Case{513, 64, 6, kernels::GateScore::sigmoid_bias, true, 8, 3}, Case{300, 256, 8, kernels::GateScore::softmax, false, 1, 1},
                        Case{0, 16, 2, kernels::GateScore::softmax, false, 1, 1}}) {
    Tensor logits = host_random({c.T, c.E}, -4, 4), bias = host_random({c.E}, -0.1, 0.1);
    Tensor ei = Tensor::empty({c.T, c.k}, DType::i32), w = Tensor::empty({c.T, c.k}, DType::f32), s = Tensor::empty({c.T, c.E}, DType::f32);
    kernels::TopKGateArgs a{.logits = logits.data_as<float>(), .bias = bias.data_as<float>(), .tokens = c.T, .experts = c.E, .k = c.k,
                       .score = c.score, .renormalize = c.renorm, .groups = c.groups, .topk_groups = c.topk_groups,
                       .experts_out = ei.data_as<int32_t>(), .weights_out = w.data_as<float>(), .scores_out = s.data_as<float>()};
    kh::topk_gate(a);
    Tensor dl = dev(logits), db = dev(bias), dei = poisoned({c.T, c.k}, DType::i32), dw = poisoned({c.T, c.k}), ds = poisoned({c.T, c.E});
    kernels::TopKGateArgs d = a;
    d.logits = dl.data_as<float>(), d.bias = db.data_as<float>(), d.experts_out = dei.data_as<int32_t>();
    d.weights_out = dw.data_as<float>(), d.scores_out = ds.data_as<float>();
    kc::topk_gate(d, nullptr);
    const std::string name = "topk_gate T=" + std::to_string(c.T) + " E=" + std::to_string(c.E) + " k=" + std::to_string(c.k) +
                             (c.score == kernels::GateScore::softmax ? " softmax" : " sigmoid+bias") + (c.groups > 1 ? " grouped" : "");
    compare_exact(name + ": experts", dei, ei.data_as<int32_t>());
    compare(name + ": weights", dw, w.data_as<float>(), 1e-5);
    compare(name + ": scores", ds, s.data_as<float>(), 1e-5);
  }
}

// The layout's definition (MoELayer::plan at r = 1): slots in GShard order.
void check_layout() {
  for (auto [T, E, k, cap] : {std::tuple<int64_t, int, int, int64_t>{1000, 16, 2, 100}, {4099, 64, 2, 1 << 30}, {37, 5, 3, 4}, {0, 8, 2, 3}}) {
    Tensor logits = host_random({T, E}, -2, 2);
    Tensor ei = Tensor::empty({T, k}, DType::i32), w = Tensor::empty({T, k}, DType::f32);
    kh::topk_gate({.logits = logits.data_as<float>(), .tokens = T, .experts = E, .k = k, .experts_out = ei.data_as<int32_t>(),
                   .weights_out = w.data_as<float>()});
    std::vector<int32_t> position(static_cast<size_t>(E));
    std::iota(position.begin(), position.end(), 0);
    std::reverse(position.begin(), position.end());  // a non-identity placement
    std::vector<int64_t> load(static_cast<size_t>(E), 0);
    for (int64_t c = 0; c < T * k; ++c) ++load[static_cast<size_t>(position[ei.data_as<int32_t>()[c]])];
    const bool padded = cap < (1 << 30);
    const int64_t C = padded ? cap : (T ? *std::max_element(load.begin(), load.end()) : 0);
    std::vector<int64_t> base(static_cast<size_t>(E)), rows_of(static_cast<size_t>(E));
    int64_t rows = 0;
    for (int p = 0; p < E; ++p) rows_of[p] = padded ? C : std::min(load[p], C), base[p] = rows, rows += rows_of[p];
    std::vector<int64_t> row_of_choice(static_cast<size_t>(T * k), -1), token_of_row(static_cast<size_t>(rows), -1);
    std::vector<float> weight_of_row(static_cast<size_t>(rows), 0.f);
    std::vector<int64_t> used(static_cast<size_t>(E), 0);
    for (int j = 0; j < k; ++j)
      for (int64_t t = 0; t < T; ++t) {
        const int p = position[ei.data_as<int32_t>()[t * k + j]];
        if (used[p] >= C) continue;
        const int64_t row = base[p] + used[p]++;
        row_of_choice[t * k + j] = row, token_of_row[row] = t, weight_of_row[row] = w.data_as<float>()[t * k + j];
      }
    Tensor dei = dev(ei), dw = dev(w), dpos = cuda::to_device(TensorView(position.data(), DType::i32, {E}), 0);
    const int64_t tiles = kc::dispatch_tiles(T, k);
    Tensor rank = poisoned({T * k}, DType::i32), tile_base = poisoned({tiles * E}, DType::i32), dload = poisoned({E}, DType::i32);
    kc::dispatch_counts(dei.data_as<int32_t>(), dpos.data_as<int32_t>(), T, k, E, rank.data_as<int32_t>(), tile_base.data_as<int32_t>(),
                        dload.data_as<int32_t>(), nullptr);
    std::vector<int32_t> load32(load.begin(), load.end());
    const std::string name = "dispatch layout T=" + std::to_string(T) + " E=" + std::to_string(E) + " k=" + std::to_string(k) +
                             (padded ? " C=" + std::to_string(C) : " dropless");
    compare_exact(name + ": load", dload, load32.data());
    Tensor dbase = dev_i64(base), roc = poisoned({T * k}, DType::i64), tor = cuda::empty({rows}, DType::i64, 0), wor = cuda::zeros({rows}, DType::f32, 0);
    cuda::fill_bytes(tor, 0xFF);
    kc::dispatch_slots(dei.data_as<int32_t>(), dpos.data_as<int32_t>(), dw.data_as<float>(), T, k, E, rank.data_as<int32_t>(),
                       tile_base.data_as<int32_t>(), dbase.data_as<int64_t>(), C, roc.data_as<int64_t>(), tor.data_as<int64_t>(),
                       wor.data_as<float>(), nullptr);
    compare_exact(name + ": row_of_choice", roc, row_of_choice.data());
    compare_exact(name + ": token_of_row", tor, token_of_row.data());
    compare_exact(name + ": weight_of_row", wor, weight_of_row.data());
  }
}

void check_rows() {
  for (int64_t width : {int64_t{1024}, int64_t{77}}) {
    const int64_t rows = 1537, tokens = 700, k = 2;
    const std::string w = " width=" + std::to_string(width);
    Tensor src = host_random({tokens, width}), scale = host_random({rows});
    std::vector<int64_t> idx = random_index(rows, tokens, 0.1);
    Tensor ref = Tensor::empty({rows, width}, DType::f32);
    Tensor dsrc = dev(src), dscale = dev(scale), didx = dev_i64(idx), out = poisoned({rows, width});
    kh::gather_rows(src.data_as<float>(), idx.data(), rows, width, ref.data_as<float>());
    kc::gather_rows(dsrc.data_as<float>(), didx.data_as<int64_t>(), rows, width, out.data_as<float>(), nullptr);
    compare("encode (gather_rows)" + w, out, ref.data_as<float>(), 0);
    kh::gather_scaled_rows(src.data_as<float>(), idx.data(), scale.data_as<float>(), rows, width, ref.data_as<float>());
    out = poisoned({rows, width});
    kc::gather_scaled_rows(dsrc.data_as<float>(), didx.data_as<int64_t>(), dscale.data_as<float>(), rows, width, out.data_as<float>(), nullptr);
    compare("decode backward (gather_scaled_rows)" + w, out, ref.data_as<float>(), 0);

    Tensor returned = host_random({rows, width});
    std::vector<int64_t> row = random_index(tokens * k, rows, 0.2);
    Tensor weights = host_random({tokens * k}), combined = Tensor::empty({tokens, width}, DType::f32);
    kh::combine_rows(returned.data_as<float>(), row.data(), weights.data_as<float>(), tokens, k, width, combined.data_as<float>());
    Tensor dret = dev(returned), drow = dev_i64(row), dwt = dev(weights), dout = poisoned({tokens, width});
    kc::combine_rows(dret.data_as<float>(), drow.data_as<int64_t>(), dwt.data_as<float>(), tokens, k, width, dout.data_as<float>(), nullptr);
    compare("decode (combine_rows)" + w, dout, combined.data_as<float>(), 1e-6);
    kh::combine_rows(returned.data_as<float>(), row.data(), nullptr, tokens, k, width, combined.data_as<float>());
    dout = poisoned({tokens, width});
    kc::combine_rows(dret.data_as<float>(), drow.data_as<int64_t>(), nullptr, tokens, k, width, dout.data_as<float>(), nullptr);
    compare("encode backward (combine_rows, no scale)" + w, dout, combined.data_as<float>(), 1e-6);

    std::vector<float> dots(static_cast<size_t>(rows));
    Tensor b = host_random({rows, width});
    kh::row_dots(src.data_as<float>(), idx.data(), b.data_as<float>(), rows, width, dots.data());
    Tensor dbb = dev(b), ddots = poisoned({rows});
    kc::row_dots(dsrc.data_as<float>(), didx.data_as<int64_t>(), dbb.data_as<float>(), rows, width, ddots.data_as<float>(), nullptr);
    compare("decode weight backward (row_dots)" + w, ddots, dots.data(), 1e-5);

    Tensor acc = host_random({width}), dacc = dev(acc);
    Tensor scratch = cuda::empty({kc::column_sum_scratch(rows, width)}, DType::f32, 0);
    kh::add_column_sums(b.data_as<float>(), rows, width, acc.data_as<float>());
    kc::add_column_sums(dbb.data_as<float>(), rows, width, dacc.data_as<float>(), scratch.data_as<float>(), nullptr);
    compare("bias gradient (add_column_sums)" + w, dacc, acc.data_as<float>(), 1e-5);

    Tensor bias = host_random({width}), y = Tensor::empty({rows, width}, DType::f32), dy = poisoned({rows, width});
    kh::broadcast_rows(bias.data_as<float>(), rows, width, y.data_as<float>());
    Tensor dbias = dev(bias);
    kc::broadcast_rows(dbias.data_as<float>(), rows, width, dy.data_as<float>(), nullptr);
    compare("bias (broadcast_rows)" + w, dy, y.data_as<float>(), 0);

    for (auto act : {kernels::Activation::relu, kernels::Activation::gelu, kernels::Activation::swiglu}) {
      const int64_t in_w = act == kernels::Activation::swiglu ? 2 * width : width;
      const std::string an = act == kernels::Activation::relu ? "relu" : act == kernels::Activation::gelu ? "gelu" : "swiglu";
      Tensor x = host_random({rows, in_w}, -3, 3), g = host_random({rows, width});
      Tensor fy = Tensor::empty({rows, width}, DType::f32), dx = Tensor::empty({rows, in_w}, DType::f32);
      kh::activation_forward(act, x.data_as<float>(), rows, width, fy.data_as<float>());
      kh::activation_backward(act, x.data_as<float>(), g.data_as<float>(), rows, width, dx.data_as<float>());
      Tensor dxx = dev(x), dg = dev(g), dfy = poisoned({rows, width}), ddx = poisoned({rows, in_w});
      kc::activation_forward(act, dxx.data_as<float>(), rows, width, dfy.data_as<float>(), nullptr);
      kc::activation_backward(act, dxx.data_as<float>(), dg.data_as<float>(), rows, width, ddx.data_as<float>(), nullptr);
      compare(an + " forward" + w, dfy, fy.data_as<float>(), 1e-6);
      compare(an + " backward" + w, ddx, dx.data_as<float>(), 1e-6);
    }
  }
  const int64_t n = 100003;
  Tensor x = host_random({n}, -100, 100);
  std::vector<uint16_t> ref(static_cast<size_t>(n));
  kh::to_bf16(x.data_as<float>(), n, ref.data());
  Tensor dx = dev(x), d16 = poisoned({n}, DType::bf16);
  kc::to_bf16(dx.data_as<float>(), n, static_cast<uint16_t*>(d16.data()), nullptr);
  compare_exact("to_bf16 (round to nearest even)", d16, ref.data());
}

void check_gemm() {
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      const int64_t m = 301, n = 257, k = 129;
      Tensor a = host_random(ta ? Shape{k, m} : Shape{m, k}), b = host_random(tb ? Shape{n, k} : Shape{k, n}), c = host_random({m, n});
      Tensor dA = dev(a), dB = dev(b), dC = dev(c);
      kernels::GemmArgs args{.transpose_a = ta, .transpose_b = tb, .m = m, .n = n, .k = k, .alpha = 0.5f, .a = a.data_as<float>(),
                        .lda = ta ? m : k, .b = b.data_as<float>(), .ldb = tb ? k : n, .beta = 1.f, .c = c.data_as<float>(), .ldc = n};
      kh::gemm_f32(args);
      args.a = dA.data_as<float>(), args.b = dB.data_as<float>(), args.c = dC.data_as<float>();
      kc::gemm_f32(args, nullptr);
      const std::string t = std::string(" ") + (ta ? "T" : "N") + (tb ? "T" : "N");
      compare("gemm_f32 (cuBLAS)" + t, dC, c.data_as<float>(), 1e-5);
      std::vector<uint16_t> a16(static_cast<size_t>(a.numel())), b16(static_cast<size_t>(b.numel()));
      kh::to_bf16(a.data_as<float>(), a.numel(), a16.data());
      kh::to_bf16(b.data_as<float>(), b.numel(), b16.data());
      Tensor c2 = Tensor::zeros({m, n}, DType::f32);
      kh::gemm_bf16({.transpose_a = ta, .transpose_b = tb, .m = m, .n = n, .k = k, .a = a16.data(), .lda = ta ? m : k, .b = b16.data(),
                     .ldb = tb ? k : n, .c = c2.data_as<float>(), .ldc = n});
      Tensor da16 = cuda::to_device(TensorView(a16.data(), DType::bf16, a.shape()), 0), db16 = cuda::to_device(TensorView(b16.data(), DType::bf16, b.shape()), 0);
      Tensor dc2 = poisoned({m, n});
      kc::gemm_bf16({.transpose_a = ta, .transpose_b = tb, .m = m, .n = n, .k = k, .a = static_cast<const uint16_t*>(da16.data()),
                     .lda = ta ? m : k, .b = static_cast<const uint16_t*>(db16.data()), .ldb = tb ? k : n, .c = dc2.data_as<float>(), .ldc = n},
                    nullptr);
      compare("gemm_bf16 (cuBLAS, fp32 accumulate)" + t, dc2, c2.data_as<float>(), 1e-5);
    }
  // Batched: 5 blocks of [67, 96] x [96, 33].
  const int batch = 5;
  const int64_t m = 67, n = 33, k = 96;
  Tensor a = host_random({batch, m, k}), b = host_random({batch, k, n}), c = Tensor::empty({batch, m, n}, DType::f32);
  for (int i = 0; i < batch; ++i)
    kh::gemm_f32({.m = m, .n = n, .k = k, .a = a.data_as<float>() + i * m * k, .lda = k, .b = b.data_as<float>() + i * k * n, .ldb = n,
                  .c = c.data_as<float>() + i * m * n, .ldc = n});
  Tensor dA = dev(a), dB = dev(b), dC = poisoned({batch, m, n});
  kc::gemm_f32_batched({.m = m, .n = n, .k = k, .a = dA.data_as<float>(), .lda = k, .b = dB.data_as<float>(), .ldb = n,
                        .c = dC.data_as<float>(), .ldc = n},
                       batch, m * k, k * n, m * n, nullptr);
  compare("gemm_f32 strided batched (5 experts)", dC, c.data_as<float>(), 1e-5);
}

// ---- the MoE layer's ops seam: CudaOps against CpuOps, operation by operation ----

void check_cuda_ops() {
  CudaOps gpu_ops(0);
  CpuOps cpu_ops;
  MoEOps &gpu = gpu_ops, &cpu = cpu_ops;  // through the seam, as the layer calls them
  const int64_t rows = 203, width = 76, tokens = 90;
  const int k = 2;
  Tensor src = host_random({rows, width}), dsrc = dev(src);
  // gather / scatter / scaled gather
  std::vector<int64_t> idx = random_index(rows, rows, 0.1);
  Tensor ref = Tensor::empty({rows, width}, DType::f32), out = poisoned({rows, width});
  Tensor didx = dev_i64(idx);
  cpu.gather_rows(src.data_as<float>(), idx.data(), rows, width, ref.data_as<float>());
  gpu.gather_rows(dsrc.data_as<float>(), didx.data_as<int64_t>(), rows, width, out.data_as<float>());
  compare("ops gather_rows", out, ref.data_as<float>(), 0);
  std::vector<int64_t> perm(static_cast<size_t>(rows));
  std::iota(perm.begin(), perm.end(), int64_t{0});
  std::reverse(perm.begin(), perm.end());
  Tensor dperm = dev_i64(perm);
  out = poisoned({rows, width});
  cpu.scatter_rows(src.data_as<float>(), perm.data(), rows, width, ref.data_as<float>());
  gpu.scatter_rows(dsrc.data_as<float>(), dperm.data_as<int64_t>(), rows, width, out.data_as<float>());
  compare("ops scatter_rows", out, ref.data_as<float>(), 0);
  {  // a partial scatter at an odd width: rows nobody writes keep their values
    const int64_t w2 = 77, dst_rows = 120, n2 = 50;
    Tensor part = host_random({n2, w2}), dst = host_random({dst_rows, w2});
    std::vector<int64_t> where(static_cast<size_t>(dst_rows));
    std::iota(where.begin(), where.end(), int64_t{0});
    for (int64_t i = dst_rows - 1; i > 0; --i) std::swap(where[static_cast<size_t>(i)], where[static_cast<size_t>(rng.uniform_int(0, i))]);
    where.resize(static_cast<size_t>(n2));
    Tensor dpart = dev(part), ddst = dev(dst), dwhere = dev_i64(where);
    cpu.scatter_rows(part.data_as<float>(), where.data(), n2, w2, dst.data_as<float>());
    gpu.scatter_rows(dpart.data_as<float>(), dwhere.data_as<int64_t>(), n2, w2, ddst.data_as<float>());
    compare("ops scatter_rows (partial, odd width)", ddst, dst.data_as<float>(), 0);
  }
  Tensor scale = host_random({rows}), dscale = dev(scale);
  out = poisoned({rows, width});
  cpu.gather_scaled_rows(src.data_as<float>(), idx.data(), scale.data_as<float>(), rows, width, ref.data_as<float>());
  gpu.gather_scaled_rows(dsrc.data_as<float>(), didx.data_as<int64_t>(), dscale.data_as<float>(), rows, width,
                         out.data_as<float>());
  compare("ops gather_scaled_rows", out, ref.data_as<float>(), 0);
  // combine with drops, row dots
  std::vector<int64_t> choice = random_index(tokens * k, rows, 0.2);
  Tensor w = host_random({tokens * k}), dw = dev(w), dchoice = dev_i64(choice);
  Tensor combined = Tensor::empty({tokens, width}, DType::f32), dcombined = poisoned({tokens, width});
  cpu.combine_rows(src.data_as<float>(), choice.data(), w.data_as<float>(), tokens, k, width, combined.data_as<float>());
  gpu.combine_rows(dsrc.data_as<float>(), dchoice.data_as<int64_t>(), dw.data_as<float>(), tokens, k, width,
                   dcombined.data_as<float>());
  compare("ops combine_rows", dcombined, combined.data_as<float>(), 1e-6);
  Tensor other = host_random({rows, width}), dother = dev(other);
  std::vector<float> dots(static_cast<size_t>(rows));
  Tensor ddots = poisoned({rows});
  cpu.row_dots(src.data_as<float>(), idx.data(), other.data_as<float>(), rows, width, dots.data());
  gpu.row_dots(dsrc.data_as<float>(), didx.data_as<int64_t>(), dother.data_as<float>(), rows, width,
               ddots.data_as<float>());
  compare("ops row_dots", ddots, dots.data(), 1e-5);
  // biases, column sums, activations, axpy, bf16
  Tensor bias = host_random({width}), dbias = dev(bias);
  out = poisoned({rows, width});
  cpu.broadcast_rows(bias.data_as<float>(), rows, width, ref.data_as<float>());
  gpu.broadcast_rows(dbias.data_as<float>(), rows, width, out.data_as<float>());
  compare("ops broadcast_rows", out, ref.data_as<float>(), 0);
  Tensor acc = host_random({width}), dacc = dev(acc);
  cpu.add_column_sums(src.data_as<float>(), rows, width, acc.data_as<float>());
  gpu.add_column_sums(dsrc.data_as<float>(), rows, width, dacc.data_as<float>());
  compare("ops add_column_sums", dacc, acc.data_as<float>(), 1e-5);
  for (auto act : {kernels::Activation::relu, kernels::Activation::gelu, kernels::Activation::swiglu}) {
    const int64_t in_w = act == kernels::Activation::swiglu ? 2 * width : width;
    Tensor x = host_random({rows, in_w}, -3, 3), g = host_random({rows, width}), dx_ = dev(x), dg = dev(g);
    Tensor y = Tensor::empty({rows, width}, DType::f32), dy = poisoned({rows, width});
    Tensor gx = Tensor::empty({rows, in_w}, DType::f32), dgx = poisoned({rows, in_w});
    cpu.activation_forward(act, x.data_as<float>(), rows, width, y.data_as<float>());
    gpu.activation_forward(act, dx_.data_as<float>(), rows, width, dy.data_as<float>());
    cpu.activation_backward(act, x.data_as<float>(), g.data_as<float>(), rows, width, gx.data_as<float>());
    gpu.activation_backward(act, dx_.data_as<float>(), dg.data_as<float>(), rows, width, dgx.data_as<float>());
    compare("ops activation_forward " + std::to_string(static_cast<int>(act)), dy, y.data_as<float>(), 1e-6);
    compare("ops activation_backward " + std::to_string(static_cast<int>(act)), dgx, gx.data_as<float>(), 1e-6);
  }
  Tensor acc2 = host_random({rows, width}), dacc2 = dev(acc2);
  cpu.axpy(-0.25f, src.data_as<float>(), rows * width, acc2.data_as<float>());
  gpu.axpy(-0.25f, dsrc.data_as<float>(), rows * width, dacc2.data_as<float>());
  compare("ops axpy", dacc2, acc2.data_as<float>(), 1e-6);
  std::vector<uint16_t> h16(static_cast<size_t>(rows * width));
  Tensor d16 = poisoned({rows * width}, DType::bf16);
  cpu.to_bf16(src.data_as<float>(), rows * width, h16.data());
  gpu.to_bf16(dsrc.data_as<float>(), rows * width, static_cast<uint16_t*>(d16.data()));
  compare_exact("ops to_bf16", d16, h16.data());
  Tensor wide = poisoned({rows * width});
  Tensor hwide = Tensor::empty({rows * width}, DType::f32);
  cpu.from_bf16(h16.data(), rows * width, hwide.data_as<float>());
  gpu.from_bf16(static_cast<const uint16_t*>(d16.data()), rows * width, wide.data_as<float>());
  compare_exact("ops from_bf16 (exact)", wide, hwide.data_as<float>());
  // fp8 payload rows (odd width: a partial last block), packed bytes and their widening, exactly.
  const int64_t fw = width + 77, frb = kernels::fp8_row_bytes(fw);
  Tensor fsrc = host_random({rows, fw}), dfsrc = dev(fsrc);
  std::vector<uint8_t> h8(static_cast<size_t>(rows * frb));
  Tensor d8 = poisoned({rows * frb}, DType::u8);
  cpu.to_fp8_rows(fsrc.data_as<float>(), rows, fw, h8.data());
  gpu.to_fp8_rows(dfsrc.data_as<float>(), rows, fw, static_cast<uint8_t*>(d8.data()));
  compare_exact("ops to_fp8_rows (scales and e4m3 bits)", d8, h8.data());
  Tensor fwide = poisoned({rows * fw}), hfwide = Tensor::empty({rows * fw}, DType::f32);
  cpu.from_fp8_rows(h8.data(), rows, fw, hfwide.data_as<float>());
  gpu.from_fp8_rows(static_cast<const uint8_t*>(d8.data()), rows, fw, fwide.data_as<float>());
  compare_exact("ops from_fp8_rows (exact)", fwide, hfwide.data_as<float>());
  // memory: zero, 2-D copy (every other row, a column window), allocate zeroed
  Tensor z = poisoned({rows, width});
  gpu.zero(z.data(), static_cast<int64_t>(z.nbytes()));
  std::vector<float> zeros(static_cast<size_t>(rows * width), 0.f);
  compare("ops zero", z, zeros.data(), 0);
  const int64_t f = sizeof(float), half = rows / 2;
  Tensor window = Tensor::empty({half, 10}, DType::f32), dwindow = poisoned({half, 10});
  cpu.copy_2d(window.data(), 10 * f, src.data_as<float>() + 3, 2 * width * f, 10 * f, half);
  gpu.copy_2d(dwindow.data(), 10 * f, dsrc.data_as<float>() + 3, 2 * width * f, 10 * f, half);
  compare("ops copy_2d", dwindow, window.data_as<float>(), 0);
  Tensor za = gpu.allocate({rows, width}, DType::f32, true);
  report(za.device() == Device::cuda(0), "ops allocate on the ops' device", to_string(za.device()));
  compare("ops allocate zeroed", za, zeros.data(), 0);
  // GEMMs, f32 and bf16, as the layer's expert blocks call them (beta 1 / accumulate)
  const int64_t m = 37, n = 130, kk = 76;
  Tensor a = host_random({m, kk}), b = host_random({kk, n}), c = host_random({m, n});
  Tensor da = dev(a), db = dev(b), dc = dev(c);
  cpu.gemm({.m = m, .n = n, .k = kk, .a = a.data_as<float>(), .lda = kk, .b = b.data_as<float>(), .ldb = n,
            .beta = 1.f, .c = c.data_as<float>(), .ldc = n});
  gpu.gemm({.m = m, .n = n, .k = kk, .a = da.data_as<float>(), .lda = kk, .b = db.data_as<float>(), .ldb = n,
            .beta = 1.f, .c = dc.data_as<float>(), .ldc = n});
  compare("ops gemm f32 (beta 1)", dc, c.data_as<float>(), 1e-5);
  std::vector<uint16_t> a16(static_cast<size_t>(m * kk)), b16(static_cast<size_t>(kk * n));
  cpu.to_bf16(a.data_as<float>(), m * kk, a16.data());
  cpu.to_bf16(b.data_as<float>(), kk * n, b16.data());
  Tensor da16 = cuda::to_device(TensorView(a16.data(), DType::bf16, {m, kk}), 0);
  Tensor db16 = cuda::to_device(TensorView(b16.data(), DType::bf16, {kk, n}), 0);
  Tensor c16 = host_random({m, n}), dc16 = dev(c16);
  cpu.gemm_bf16({.m = m, .n = n, .k = kk, .a = a16.data(), .lda = kk, .b = b16.data(), .ldb = n, .accumulate = true,
                 .c = c16.data_as<float>(), .ldc = n});
  gpu.gemm_bf16({.m = m, .n = n, .k = kk, .a = static_cast<const uint16_t*>(da16.data()), .lda = kk,
                 .b = static_cast<const uint16_t*>(db16.data()), .ldb = n, .accumulate = true,
                 .c = dc16.data_as<float>(), .ldc = n});
  compare("ops gemm bf16 (accumulate)", dc16, c16.data_as<float>(), 1e-5);
  // Empty inputs are no-ops.
  gpu.gather_rows(dsrc.data_as<float>(), didx.data_as<int64_t>(), 0, width, out.data_as<float>());
  gpu.combine_rows(dsrc.data_as<float>(), dchoice.data_as<int64_t>(), nullptr, 0, k, width, dcombined.data_as<float>());
  SY_CUDA_CHECK(cudaDeviceSynchronize());
  report(true, "ops with zero rows");
}

// ---- NCCL, one rank ----

void check_nccl() {
  std::printf("NCCL %s. Multi-rank NCCL needs one GPU per rank: NOT checked on this one-GPU machine.\n", nccl_version().c_str());
  ThreadsWorld world(1);
  auto boot = world.communicator(0);
  auto comm = make_nccl_communicator(*boot, 0, "nccl-world");
  report(comm->backend_name() == "nccl" && comm->size() == 1, "nccl communicator from a threads bootstrap (1 rank)");
  const int64_t n = 4099;
  Tensor x = host_random({n}), dx = dev(x), out = poisoned({n});
  comm->allreduce(dx, out).wait();
  compare("nccl allreduce sum (1 rank: identity)", out, x.data_as<float>(), 0);
  out = poisoned({n});
  comm->allgather(dx, out).wait(std::chrono::milliseconds(20000));
  compare("nccl allgather, host wait with timeout", out, x.data_as<float>(), 0);
  out = poisoned({n});
  comm->alltoallv(dx, {n}, out, {n}).wait();
  compare("nccl alltoallv (grouped send/recv to self)", out, x.data_as<float>(), 0);
  out = poisoned({n});
  comm->sendrecv(dx, 0, out, 0).wait();
  compare("nccl sendrecv with itself", out, x.data_as<float>(), 0);
  Tensor b = dev(x);
  comm->broadcast(b, 0).wait();
  comm->barrier().wait(std::chrono::milliseconds(20000));
  compare("nccl broadcast + barrier", b, x.data_as<float>(), 0);
  auto half = comm->split(0, 0);
  out = poisoned({n});
  half->allreduce(dx, out, {.op = ReduceOp::max}).wait();
  compare("nccl split (ncclCommSplit) + allreduce max", out, x.data_as<float>(), 0);
  auto group = comm->create_group({0}, "self");
  out = poisoned({n});
  group->alltoall(dx, out).wait();
  compare("nccl create_group + alltoall", out, x.data_as<float>(), 0);
  bool refused = false;
  try {
    comm->allreduce(x, x);
  } catch (const NotSupported& e) {
    refused = std::string(e.what()).find("cuda:0") != std::string::npos;
  }
  report(refused, "nccl refuses host buffers naming the device it moves");
  const CommStats stats = comm->stats();
  report(stats.ops.count("alltoallv") && stats.ops.at("alltoallv").calls == 1, "nccl ops are counted in stats()");
}

// ---- the MoE layer ----

void check_layer(kernels::Activation act, DType compute, ExchangeMode mode, double cf, int64_t tokens) {
  MoEConfig cfg;
  cfg.model_dim = 96;
  cfg.hidden_dim = 80;
  cfg.activation = act;
  cfg.compute = compute;
  cfg.router.experts = 8;
  cfg.router.k = 2;
  cfg.router.renormalize = act == kernels::Activation::swiglu;
  ThreadsWorld world(1);
  auto boot = world.communicator(0);
  MoELayer host_layer(cfg, boot);
  host_layer.init_parameters(rng.seed() + 11);
  auto nccl = make_nccl_communicator(*boot, 0);
  DeviceMoELayer device_layer(cfg, nccl, 0);
  device_layer.copy_parameters_from(host_layer);
  const ExecPlan plan{.r = 1, .d = 1, .a2a = A2AAlgorithm::flat, .exchange = mode};
  const RoutingChoice routing{cf, 2};
  Tensor x = host_random({tokens, cfg.model_dim}), g = host_random({tokens, cfg.model_dim});
  const MoEForward hf = host_layer.forward(x, routing, plan);
  const Tensor hdx = host_layer.backward(g, 0.01, 0.001);
  Tensor dx_in = dev(x), dg = dev(g);
  const MoEForward df = device_layer.forward(dx_in, routing, plan);
  const Tensor ddx = device_layer.backward(dg, 0.01, 0.001);
  const double tol = compute == DType::bf16 ? 2e-2 : 2e-5;
  const std::string name = std::string("moe layer ") + (act == kernels::Activation::gelu ? "gelu" : "swiglu") +
                           (compute == DType::bf16 ? " bf16" : " f32") + (mode == ExchangeMode::padded ? " padded" : " dropless") +
                           " cf=" + std::to_string(cf).substr(0, 3) + " T=" + std::to_string(tokens);
  report(hf.dropped == df.dropped, name + ": dropped", std::to_string(df.dropped) + " vs host " + std::to_string(hf.dropped));
  const double lb = std::fabs(df.balance_loss - hf.balance_loss) / std::max(1e-12, std::fabs(hf.balance_loss));
  const double lz = std::fabs(df.z_loss - hf.z_loss) / std::max(1e-12, std::fabs(hf.z_loss));
  report(lb < 1e-4 && lz < 1e-4, name + ": balance and z losses", std::to_string(lb) + ", " + std::to_string(lz));
  compare(name + ": output", df.output, hf.output.data_as<float>(), tol);
  compare(name + ": dx", ddx, hdx.data_as<float>(), tol);
  compare(name + ": gate grad", device_layer.gate_grad(), host_layer.gate_grad().data_as<float>(), tol * 5);
  compare(name + ": dW1", device_layer.expert_grads().w1, host_layer.expert_grads().w1.data_as<float>(), tol);
  compare(name + ": db1", device_layer.expert_grads().b1, host_layer.expert_grads().b1.data_as<float>(), tol);
  compare(name + ": dW2", device_layer.expert_grads().w2, host_layer.expert_grads().w2.data_as<float>(), tol);
  compare(name + ": db2", device_layer.expert_grads().b2, host_layer.expert_grads().b2.data_as<float>(), tol);
}

// Several ranks on one GPU: thread-ranks whose device layers exchange over the
// staged backend (device buffers over the threads backend), each on its own
// stream, against the host layer on the same ranks. Checks the device layer's
// multi-rank logic (capacity agreement, block counts, exchanges); NCCL itself
// needs one GPU per rank.
void check_layer_multirank(int W, ExchangeMode mode, double cf) {
  std::mutex mutex;
  std::vector<std::tuple<int, std::string, double, double>> results;  // rank, what, error, tolerance
  const uint64_t seed = rng.seed() * 31 + static_cast<uint64_t>(W);
  run_thread_ranks(W, [&](Communicator& world) {
    SY_CUDA_CHECK(cudaSetDevice(0));
    cudaStream_t stream = nullptr;
    SY_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    {
      cuda::StreamGuard on(stream);
      MoEConfig cfg;
      cfg.model_dim = 64;
      cfg.hidden_dim = 48;
      cfg.activation = kernels::Activation::gelu;
      cfg.router.experts = 8;
      cfg.router.k = 2;
      auto host_comm = world.shared_from_this();
      MoELayer host_layer(cfg, host_comm);
      host_layer.init_parameters(seed);
      std::vector<int> all(static_cast<size_t>(W));
      std::iota(all.begin(), all.end(), 0);
      auto staged = make_staged_device_communicator(host_comm->create_group(all, "for-staged"), 0);
      DeviceMoELayer device_layer(cfg, staged, 0);
      device_layer.copy_parameters_from(host_layer);
      const int rank = world.rank();
      const int64_t tokens = rank == W - 1 && W > 2 ? 0 : 150 + 37 * rank;  // uneven, and one empty rank
      Rng r(seed * 7 + static_cast<uint64_t>(rank));
      Tensor x = Tensor::empty({tokens, cfg.model_dim}, DType::f32), g = Tensor::empty({tokens, cfg.model_dim}, DType::f32);
      r.fill_uniform(x, -1, 1);
      r.fill_uniform(g, -1, 1);
      const ExecPlan plan{.r = 1, .d = 1, .a2a = A2AAlgorithm::flat, .exchange = mode};
      const MoEForward hf = host_layer.forward(x, RoutingChoice{cf, 2}, plan);
      const Tensor hdx = host_layer.backward(g, 0.01, 0.001);
      Tensor dxv = cuda::to_device(x, 0), dgv = cuda::to_device(g, 0);
      const MoEForward df = device_layer.forward(dxv, RoutingChoice{cf, 2}, plan);
      const Tensor ddx = device_layer.backward(dgv, 0.01, 0.001);
      auto err = [](const Tensor& d, const Tensor& h) {
        const Tensor dh = cuda::to_host(d);
        return rel_error(dh.data_as<float>(), h.data_as<float>(), h.numel());
      };
      std::vector<std::tuple<int, std::string, double, double>> mine = {
          {rank, "dropped", std::fabs(double(df.dropped - hf.dropped)), 0.0},
          {rank, "output", err(df.output, hf.output), 2e-5},
          {rank, "dx", err(ddx, hdx), 2e-5},
          {rank, "gate grad (summed over ranks)", err(device_layer.gate_grad(), host_layer.gate_grad()), 1e-4},
          {rank, "dW1", err(device_layer.expert_grads().w1, host_layer.expert_grads().w1), 2e-5},
          {rank, "db2", err(device_layer.expert_grads().b2, host_layer.expert_grads().b2), 2e-5},
      };
      std::lock_guard lock(mutex);
      results.insert(results.end(), mine.begin(), mine.end());
    }
    SY_CUDA_CHECK(cudaStreamSynchronize(stream));
    SY_CUDA_CHECK(cudaStreamDestroy(stream));
  });
  std::sort(results.begin(), results.end());
  for (const auto& [rank, what, e, tol] : results) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "rel err %.2e (tol %.0e)", e, tol);
    report(e <= tol, "moe layer on " + std::to_string(W) + " thread-ranks over staged, " +
                         (mode == ExchangeMode::padded ? "padded" : "dropless") + ", rank " + std::to_string(rank) + ": " + what,
           buf);
  }
}

// MoELayer on CudaOps (the one orchestration, its tensors on the GPU) against
// MoELayer on CpuOps, on W thread-ranks sharing the GPU (the device layer's
// exchanges staged over the threads backend): every plan (each valid r, d =
// 1, 2, 4, padded and dropless; 2DH is host-only), f32 and bf16 experts,
// whole and sliced experts, send-once dispatch, bf16/fp8 payloads (forward),
// a combine layout, and replicas with their gradient sum. Output, dx, gate
// and expert gradients compared. Routing follows each layer's own gate logits
// (cuBLAS against oneDNN), so a near-tie in a top-k could flip a choice and
// fail a comparison without a bug; random inputs make that rare.
void check_ops_layer(int W) {
  std::mutex mutex;
  std::vector<std::tuple<std::string, double, double>> results;  // what, error, tolerance
  const uint64_t seed = rng.seed() * 37 + static_cast<uint64_t>(W);
  run_thread_ranks(W, [&](Communicator& world) {
    SY_CUDA_CHECK(cudaSetDevice(0));
    cudaStream_t stream = nullptr;
    SY_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    std::vector<std::tuple<std::string, double, double>> mine;
    try {
      cuda::StreamGuard on(stream);
      const int rank = world.rank();
      auto host_comm = world.shared_from_this();
      std::vector<int> all(static_cast<size_t>(W));
      std::iota(all.begin(), all.end(), 0);
      auto device_comm = make_staged_device_communicator(host_comm->create_group(all, "ops-staged"), 0);
      auto err = [](const Tensor& d, const Tensor& h) {
        const Tensor dh = d.device().is_cpu() ? d : cuda::to_host(d);
        return rel_error(dh.data_as<float>(), h.data_as<float>(), h.numel());
      };
      auto run = [&](const std::string& name, MoEConfig cfg, const ExecPlan& plan, bool backward,
                     const CombineLayout* layout = nullptr) {
        MoEConfig hc = cfg, dc = cfg;
        hc.ops = std::make_shared<CpuOps>();
        dc.ops = std::make_shared<CudaOps>(0);
        MoELayer host_layer(hc, host_comm), device_layer(dc, device_comm);
        host_layer.init_parameters(seed);
        device_layer.init_parameters(seed);
        const int64_t tokens = rank == W - 1 && W > 2 ? 0 : 97 + 31 * rank;
        Rng r(seed * 7 + static_cast<uint64_t>(rank));
        Tensor x = Tensor::empty({tokens, cfg.model_dim}, DType::f32);
        r.fill_uniform(x, -1, 1);
        MoEHandle hb = host_layer.plan(x, host_layer.routing_choice(), plan, layout);
        MoEHandle db = device_layer.plan(cuda::to_device(x, 0), device_layer.routing_choice(), plan, layout);
        const MoEForward& hf = host_layer.forward(*hb);
        const MoEForward& df = device_layer.forward(*db);
        const double tol = cfg.compute == DType::bf16 || cfg.dispatch_payload != DType::f32 ? 2e-2 : 2e-5;
        const std::string at = "moe layer on CudaOps, " + std::to_string(W) + " rank(s), rank " + std::to_string(rank) +
                               ", " + name + " (" + plan.describe() + "): ";
        mine.emplace_back(at + "dropped", std::fabs(double(df.dropped - hf.dropped)), 0.0);
        mine.emplace_back(at + "output", err(df.output, hf.output), tol);
        if (!backward) return;
        Tensor g = Tensor::empty(hf.output.shape(), DType::f32);
        r.fill_uniform(g, -1, 1);
        const Tensor hdx = host_layer.backward(*hb, g, 0.01, 0.001);
        const Tensor ddx = device_layer.backward(*db, cuda::to_device(g, 0), 0.01, 0.001);
        mine.emplace_back(at + "dx", err(ddx, hdx), tol);
        mine.emplace_back(at + "gate grad", err(device_layer.gate_grad(), host_layer.gate_grad()), tol * 5);
        mine.emplace_back(at + "dW1", err(device_layer.expert_grads().w1, host_layer.expert_grads().w1), tol);
        mine.emplace_back(at + "db1", err(device_layer.expert_grads().b1, host_layer.expert_grads().b1), tol);
        mine.emplace_back(at + "dW2", err(device_layer.expert_grads().w2, host_layer.expert_grads().w2), tol);
        mine.emplace_back(at + "db2", err(device_layer.expert_grads().b2, host_layer.expert_grads().b2), tol);
        host_layer.sgd_step(0.1);
        device_layer.sgd_step(0.1);
        mine.emplace_back(at + "W1 after sgd", err(device_layer.params().w1, host_layer.params().w1), tol);
      };
      auto config = [&](int experts, int hidden) {
        MoEConfig c;
        c.model_dim = 64, c.hidden_dim = hidden;
        c.activation = kernels::Activation::swiglu;
        c.router.experts = experts, c.router.k = std::min(2, experts), c.router.capacity_factor = 1.0;
        return c;
      };
      for (int E : {2 * W, W >= 2 ? W / 2 : 1}) {
        const int S = E >= W ? 1 : W / E;
        for (DType compute : {DType::f32, DType::bf16}) {
          MoEConfig c = config(E, 32 * S);
          c.compute = compute;
          ParamLayout layout(E, W);
          for (int rr : valid_sharding_degrees(layout.shards()))
            for (int d : {1, 2, 4})
              for (ExchangeMode mode : {ExchangeMode::padded, ExchangeMode::dropless})
                run("E " + std::to_string(E) + (compute == DType::bf16 ? " bf16" : " f32"), c,
                    {rr, d, A2AAlgorithm::flat, mode}, true);
        }
      }
      const ExecPlan dropless{1, 2, A2AAlgorithm::flat, ExchangeMode::dropless};
      {
        MoEConfig c = config(2 * W, 32);
        c.router.k = std::min(3, 2 * W);
        c.send_once_per_rank = true;
        run("send once", c, dropless, true);
      }
      for (DType payload : {DType::bf16, DType::fp8_e4m3}) {
        MoEConfig c = config(2 * W, 32);
        c.dispatch_payload = payload;
        c.combine_payload = DType::bf16;
        run(payload == DType::bf16 ? "bf16 payloads" : "fp8 dispatch", c, dropless, false);
      }
      {
        CombineLayout to_next;
        const int64_t tokens = rank == W - 1 && W > 2 ? 0 : 97 + 31 * rank;
        const int prev = (rank + W - 1) % W;
        for (int64_t t = 0; t < tokens; ++t) to_next.rank.push_back((rank + 1) % W), to_next.index.push_back(tokens - 1 - t);
        to_next.output_rows = prev == W - 1 && W > 2 ? 0 : 97 + 31 * prev;
        run("combine layout to the next rank", config(2 * W, 32), {1, 1, A2AAlgorithm::flat, ExchangeMode::padded}, true,
            &to_next);
      }
      {
        MoEConfig c = config(2 * W, 32);
        c.router.capacity_factor = 0;
        std::vector<double> load(static_cast<size_t>(2 * W), 1.0);
        load[0] = 4.0;
        c.placement = eplb::place(load, 2 * W + W, W);
        run("replicas (EPLB)", c, {1, 1, A2AAlgorithm::flat, ExchangeMode::dropless}, true);
      }
    } catch (const std::exception& e) {
      mine.emplace_back(std::string("moe layer on CudaOps: exception on rank ") + std::to_string(world.rank()) + ": " +
                            e.what(), INFINITY, 0.0);
    }
    SY_CUDA_CHECK(cudaStreamSynchronize(stream));
    SY_CUDA_CHECK(cudaStreamDestroy(stream));
    std::lock_guard lock(mutex);
    results.insert(results.end(), mine.begin(), mine.end());
  });
  for (const auto& [what, e, tol] : results) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "rel err %.2e (tol %.0e)", e, tol);
    report(e <= tol, what, buf);
  }
}

// ---- timing ----

double median_ms(const std::function<void()>& fn, int reps = 20) {
  cudaEvent_t a, b;
  SY_CUDA_CHECK(cudaEventCreate(&a));
  SY_CUDA_CHECK(cudaEventCreate(&b));
  fn();
  std::vector<float> ms;
  for (int i = 0; i < reps; ++i) {
    SY_CUDA_CHECK(cudaEventRecord(a, nullptr));
    fn();
    SY_CUDA_CHECK(cudaEventRecord(b, nullptr));
    SY_CUDA_CHECK(cudaEventSynchronize(b));
    float t = 0;
    SY_CUDA_CHECK(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  SY_CUDA_CHECK(cudaEventDestroy(a));
  SY_CUDA_CHECK(cudaEventDestroy(b));
  return ms[ms.size() / 2];
}

void timing_table() {
  // Shapes of one MoE layer step on one GPU: 16k tokens, d_model 2048, 64 experts, top-2.
  const int64_t T = 16384, M = 2048, E = 64, k = 2, H = 2048, C = T * k / E;
  const int64_t R = T * k;
  const double gib = double(1 << 30);
  Tensor big_a = cuda::empty({int64_t(1) << 28}, DType::f32, 0), big_b = cuda::empty({int64_t(1) << 28}, DType::f32, 0);
  const double copy_ms = median_ms([&] { cuda::copy(big_b, big_a); }, 10);
  const double bw = 2.0 * big_a.nbytes() / (copy_ms * 1e-3);  // read + write
  std::printf("\nTiming (medians of 20; floor = bytes / measured device-to-device copy rate %.0f GB/s)\n", bw / 1e9);
  std::printf("%-44s %10s %12s %10s %8s\n", "kernel", "time us", "bytes MB", "floor us", "ratio");
  auto row = [&](const char* name, double ms, double bytes) {
    const double floor_us = bytes / bw * 1e6;
    std::printf("%-44s %10.1f %12.2f %10.1f %8.2f\n", name, ms * 1e3, bytes / 1e6, floor_us, ms * 1e3 / floor_us);
  };
  Tensor logits = dev(host_random({T, E}, -3, 3)), scores = cuda::empty({T, E}, DType::f32, 0);
  Tensor ei = cuda::empty({T, k}, DType::i32, 0), w = cuda::empty({T, k}, DType::f32, 0);
  kernels::TopKGateArgs ga{.logits = logits.data_as<float>(), .tokens = T, .experts = int(E), .k = int(k), .experts_out = ei.data_as<int32_t>(),
                      .weights_out = w.data_as<float>(), .scores_out = scores.data_as<float>()};
  row("router: softmax top-2 [16384 x 64]", median_ms([&] { kc::topk_gate(ga, nullptr); }), T * E * 8.0 + T * k * 8.0);
  const int64_t tiles = kc::dispatch_tiles(T, k);
  Tensor rank = cuda::empty({T * k}, DType::i32, 0), base = cuda::empty({tiles * E}, DType::i32, 0), load = cuda::empty({E}, DType::i32, 0);
  std::vector<int64_t> rb(static_cast<size_t>(E));
  for (int64_t p = 0; p < E; ++p) rb[p] = p * C;
  Tensor drb = dev_i64(rb), roc = cuda::empty({T * k}, DType::i64, 0), tor = cuda::empty({E * C}, DType::i64, 0), wor = cuda::empty({E * C}, DType::f32, 0);
  row("layout: counts + scan + slots (C = 512)", median_ms([&] {
        kc::dispatch_counts(ei.data_as<int32_t>(), nullptr, T, k, E, rank.data_as<int32_t>(), base.data_as<int32_t>(), load.data_as<int32_t>(), nullptr);
        kc::dispatch_slots(ei.data_as<int32_t>(), nullptr, w.data_as<float>(), T, k, E, rank.data_as<int32_t>(), base.data_as<int32_t>(),
                           drb.data_as<int64_t>(), C, roc.data_as<int64_t>(), tor.data_as<int64_t>(), wor.data_as<float>(), nullptr);
      }),
      T * k * (4.0 * 4 + 8 + 8 + 4 + 4) + tiles * E * 4.0 * 3);
  Tensor x = dev(host_random({T, M})), rows = cuda::empty({R, M}, DType::f32, 0), out = cuda::empty({T, M}, DType::f32, 0);
  std::vector<int64_t> tok(static_cast<size_t>(R));
  for (int64_t i = 0; i < R; ++i) tok[i] = (i * 7919) % T;
  Tensor dtok = dev_i64(tok);
  row("encode: gather 32768 rows x 2048", median_ms([&] { kc::gather_rows(x.data_as<float>(), dtok.data_as<int64_t>(), R, M, rows.data_as<float>(), nullptr); }),
      2.0 * R * M * 4);
  std::vector<int64_t> roc_h(static_cast<size_t>(R));
  for (int64_t i = 0; i < R; ++i) roc_h[i] = (i * 104729) % R;
  Tensor droc = dev_i64(roc_h), wts = dev(host_random({R}));
  row("decode: combine 16384 tokens x top-2 x 2048", median_ms([&] {
        kc::combine_rows(rows.data_as<float>(), droc.data_as<int64_t>(), wts.data_as<float>(), T, k, M, out.data_as<float>(), nullptr);
      }),
      (R + T) * M * 4.0 + T * k * 12.0);
  row("decode backward: scaled gather 32768 rows", median_ms([&] {
        kc::gather_scaled_rows(out.data_as<float>(), dtok.data_as<int64_t>(), wts.data_as<float>(), R, M, rows.data_as<float>(), nullptr);
      }),
      2.0 * R * M * 4);
  Tensor dots = cuda::empty({R}, DType::f32, 0);
  row("decode weight backward: row dots 32768 x 2048", median_ms([&] {
        kc::row_dots(out.data_as<float>(), dtok.data_as<int64_t>(), rows.data_as<float>(), R, M, dots.data_as<float>(), nullptr);
      }),
      2.0 * R * M * 4);
  row("encode backward: combine, no scale", median_ms([&] {
        kc::combine_rows(rows.data_as<float>(), droc.data_as<int64_t>(), nullptr, T, k, M, out.data_as<float>(), nullptr);
      }),
      (R + T) * M * 4.0);
  Tensor pre = cuda::empty({R, H}, DType::f32, 0), act = cuda::empty({R, H}, DType::f32, 0);
  row("gelu forward 32768 x 2048", median_ms([&] { kc::activation_forward(kernels::Activation::gelu, pre.data_as<float>(), R, H, act.data_as<float>(), nullptr); }),
      2.0 * R * H * 4);
  Tensor sums = cuda::zeros({H}, DType::f32, 0), scratch = cuda::empty({kc::column_sum_scratch(R, H)}, DType::f32, 0);
  row("bias gradient: column sums 32768 x 2048", median_ms([&] {
        kc::add_column_sums(pre.data_as<float>(), R, H, sums.data_as<float>(), scratch.data_as<float>(), nullptr);
      }),
      1.0 * R * H * 4);
  // Expert GEMMs: 64 experts x [512 x 2048] x [2048 x 2048], batched.
  std::printf("\n%-44s %10s %12s\n", "expert GEMM (64 experts, C=512, 2048x2048)", "time us", "TFLOP/s");
  Tensor wts1 = dev(host_random({E, M, H}, -0.02, 0.02));
  Tensor pre_b = cuda::empty({E * C, H}, DType::f32, 0);
  const double flops = 2.0 * E * C * M * H;
  const double f32_ms = median_ms([&] {
    kc::gemm_f32_batched({.m = C, .n = H, .k = M, .a = rows.data_as<float>(), .lda = M, .b = wts1.data_as<float>(), .ldb = H,
                          .c = pre_b.data_as<float>(), .ldc = H},
                         int(E), C * M, M * H, C * H, nullptr);
  }, 10);
  std::printf("%-44s %10.1f %12.1f\n", "fp32 (strided batched SGEMM)", f32_ms * 1e3, flops / (f32_ms * 1e-3) / 1e12);
  Tensor rows16 = cuda::empty({E * C, M}, DType::bf16, 0), w16 = cuda::empty({E, M, H}, DType::bf16, 0);
  kc::to_bf16(rows.data_as<float>(), E * C * M, static_cast<uint16_t*>(rows16.data()), nullptr);
  kc::to_bf16(wts1.data_as<float>(), E * M * H, static_cast<uint16_t*>(w16.data()), nullptr);
  const double bf_ms = median_ms([&] {
    kc::gemm_bf16_batched({.m = C, .n = H, .k = M, .a = static_cast<const uint16_t*>(rows16.data()), .lda = M,
                           .b = static_cast<const uint16_t*>(w16.data()), .ldb = H, .c = pre_b.data_as<float>(), .ldc = H},
                          int(E), C * M, M * H, C * H, nullptr);
  }, 10);
  std::printf("%-44s %10.1f %12.1f\n", "bf16 in, fp32 out (GemmStridedBatchedEx)", bf_ms * 1e3, flops / (bf_ms * 1e-3) / 1e12);
  (void)gib;

  // The whole layer, forward + backward, 1 rank, f32 and bf16, against the GEMM floor at the measured rates.
  for (DType compute : {DType::f32, DType::bf16}) {
    MoEConfig cfg;
    cfg.model_dim = M;
    cfg.hidden_dim = H;
    cfg.activation = kernels::Activation::gelu;
    cfg.compute = compute;
    cfg.router.experts = int(E);
    cfg.router.k = int(k);
    ThreadsWorld world(1);
    auto nccl = make_nccl_communicator(*world.communicator(0), 0);
    DeviceMoELayer layer(cfg, nccl, 0);
    Rng init(3);
    for (Tensor* p : {&layer.params().w1, &layer.params().w2, &layer.gate_weight()}) {
      Tensor h = Tensor::empty(p->shape(), DType::f32);
      init.fill_uniform(h, -0.02, 0.02);
      cuda::copy(*p, h);
    }
    const ExecPlan plan{.r = 1, .d = 1, .a2a = A2AAlgorithm::flat, .exchange = ExchangeMode::padded};
    const auto step = [&] {
      MoEForward f = layer.forward(x, RoutingChoice{1.0, int(k)}, plan);
      layer.backward(f.output, 0.01, 0.0);
    };
    const double ms = median_ms(step, 5);
    // Where the step's device time goes (one more step with CUDA events around each phase).
    layer.set_profiling(true);
    step();
    const MoEPhaseTimes p = layer.phase_times();
    layer.set_profiling(false);
    const double step_flops = 3 * 2 * 2.0 * E * C * M * H;  // fc1 + fc2, forward and two backward GEMMs each
    const double rate = compute == DType::bf16 ? flops / (bf_ms * 1e-3) : flops / (f32_ms * 1e-3);
    const double floor_ms = step_flops / rate * 1e3;
    std::printf("%-44s %10.1f us, GEMM floor %.1f us at the batched rate above, ratio %.2f\n",
                compute == DType::bf16 ? "moe layer fwd+bwd bf16 (T=16384, 64 experts)" : "moe layer fwd+bwd f32 (T=16384, 64 experts)",
                ms * 1e3, floor_ms * 1e3, ms / floor_ms);
    std::printf("  phases (us): gate+layout %.0f, encode %.0f, dispatch %.0f, experts %.0f, combine %.0f, decode %.0f, backward %.0f\n",
                p.gate * 1e6, p.encode * 1e6, p.dispatch_a2a * 1e6, p.experts * 1e6, p.combine_a2a * 1e6, p.decode * 1e6,
                p.backward * 1e6);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const bool skip_timing = argc > 1 && std::string(argv[1]) == "--no-timing";
  const int devices = cuda::device_count();
  if (devices == 0) {
    std::printf("gpu_check: no CUDA device here; nothing checked.\n");
    return 2;
  }
  SY_CUDA_CHECK(cudaSetDevice(0));
  std::printf("device 0: %s (%d device(s))\nseed %llu\n\n", cuda::describe_device(0).c_str(), devices,
              static_cast<unsigned long long>(rng.seed()));
  const auto start = std::chrono::steady_clock::now();
  try {
    check_gate();
    check_layout();
    check_rows();
    check_gemm();
    check_cuda_ops();
    check_nccl();
    for (auto act : {kernels::Activation::gelu, kernels::Activation::swiglu})
      for (DType compute : {DType::f32, DType::bf16})
        for (ExchangeMode mode : {ExchangeMode::padded, ExchangeMode::dropless})
          check_layer(act, compute, mode, mode == ExchangeMode::padded ? 1.0 : 0.0, 301);
    check_layer(kernels::Activation::gelu, DType::f32, ExchangeMode::padded, 0.5, 1000);  // drops
    check_layer(kernels::Activation::gelu, DType::f32, ExchangeMode::dropless, 0.0, 0);    // an empty batch
    for (int W : {2, 4})
      for (ExchangeMode mode : {ExchangeMode::padded, ExchangeMode::dropless})
        check_layer_multirank(W, mode, mode == ExchangeMode::padded ? 1.0 : 0.0);
    for (int W : {1, 2, 4}) check_ops_layer(W);
    SY_CUDA_CHECK(cudaDeviceSynchronize());
  } catch (const std::exception& e) {
    report(false, std::string("exception: ") + e.what());
  }
  std::printf("\n%d of %d checks passed (%.1f s)\n", checks - failures, checks,
              std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  if (!skip_timing) {
    try {
      timing_table();
    } catch (const std::exception& e) {
      report(false, std::string("timing: ") + e.what());
    }
  }
  return failures ? 1 : 0;
}
