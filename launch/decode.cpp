#include "launch/decode.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>

#include "core/error.h"
#include "kernels/rowwise.h"
#include "launch/bench_moe.h"
#include "parallel/runtime.h"

namespace switchyard {
namespace {

std::vector<int> bytes_of(const std::string& text) {
  std::vector<int> t;
  for (unsigned char c : text) t.push_back(c);
  return t;
}

// Host memory bandwidth, counting bytes read and written (a 256 MiB copy).
double measured_bandwidth() {
  const int64_t bytes = int64_t{256} << 20;
  return 2.0 * static_cast<double>(bytes) / time_memcpy(bytes);
}

// The row-wise GEMM rate (FLOP/s) at the model's projection shape: every
// decode product runs on it (best of five 64-row products).
double measured_matmul_rate(int64_t d) {
  std::vector<float> x(static_cast<size_t>(64 * d), 0.5f), w(static_cast<size_t>(d * d), 0.01f), y(x.size());
  double best = 0;
  for (int i = 0; i < 5; ++i) {
    const auto t = std::chrono::steady_clock::now();
    kernels::cpu::matmul_rows(x.data(), 64, d, d, w.data(), d, d, 0.f, y.data(), d);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
    best = std::max(best, 2.0 * 64 * d * d / s);
  }
  return best;
}

}  // namespace

int run_generate(const GenerateOptions& o) {
  if (o.prompt.empty()) SY_THROW(InvalidArgument, "generate: --prompt is empty; expected some text to continue");
  RuntimeOptions ro;
  ro.backend = o.backend;
  ro.ranks = o.ranks;
  run_ranks(ro, [&](Runtime& rt) {
    Model model(o.model, rt.world_ptr());
    const bool speak = rt.world().rank() == 0;
    if (speak) {
      std::fputs(o.prompt.c_str(), stdout);
      std::fflush(stdout);
    }
    GenerationStats st;
    generate(model, {bytes_of(o.prompt)}, o.max_new_tokens, o.sampling, &st, [&](size_t, int token) {
      if (!speak) return;
      std::fputc(token, stdout);
      std::fflush(stdout);
    });
    if (speak)
      std::printf("\n[%s on %d rank(s)] prefill %lld tokens in %.1f ms (%.0f tokens/s); decode %lld tokens in %.1f ms "
                  "(%.1f tokens/s)\n",
                  model.config().name.c_str(), rt.world().size(), static_cast<long long>(st.prefill_tokens),
                  st.prefill_seconds * 1e3, st.prefill_tokens / std::max(st.prefill_seconds, 1e-12),
                  static_cast<long long>(st.decode_tokens + 1), st.decode_seconds * 1e3,
                  st.decode_tokens / std::max(st.decode_seconds, 1e-12));
  });
  return 0;
}

int run_bench_decode(const BenchDecodeOptions& o) {
  RuntimeOptions ro;
  ro.backend = o.backend;
  ro.ranks = o.ranks;
  run_ranks(ro, [&](Runtime& rt) {
    Model model(o.model, rt.world_ptr());
    const ModelConfig& c = model.config();
    const bool speak = rt.world().rank() == 0;
    const double bandwidth = speak ? measured_bandwidth() : 0;
    const double rate = speak ? measured_matmul_rate(c.d_model) : 0;
    std::FILE* csv = speak && !o.csv.empty() ? std::fopen(o.csv.c_str(), "w") : nullptr;
    if (csv) std::fprintf(csv, "batch,tokens_per_s,ms_per_step,attention_ms,moe_ms,head_ms,floor_ms,ratio\n");
    if (speak) {
      std::printf("bench decode: model %s (%d layers, d_model %d, %d experts top-%d) on %d rank(s); prompt %d tokens, "
                  "%d decode steps\nfloor = max(bytes read / %.1f GB/s (memcpy, read + write), FLOPs / %.1f GFLOP/s "
                  "(row-wise GEMM, 64 x %d x %d)); the whole rank's cores\n",
                  c.name.c_str(), c.layers, c.d_model, c.experts, c.k, rt.world().size(), o.prompt_tokens, o.steps,
                  bandwidth / 1e9, rate / 1e9, c.d_model, c.d_model);
      std::printf("%6s %12s %12s %10s %10s %10s %10s %7s\n", "batch", "tokens/s", "ms/step", "attn ms", "moe ms",
                  "head ms", "floor ms", "ratio");
    }
    if (o.prompt_tokens < 1 || o.steps < 1 || o.prompt_tokens + o.steps + 1 > c.max_seq)
      SY_THROW(InvalidArgument, "bench decode: prompt_tokens = ", o.prompt_tokens, ", steps = ", o.steps,
               "; expected both >= 1 and prompt_tokens + steps + 1 <= max_seq (", c.max_seq, ")");
    const std::string text = "The quick brown fox jumps over the lazy dog; a stitch in time saves nine. ";
    for (int B : o.batches) {
      if (B < 1) SY_THROW(InvalidArgument, "bench decode: batch ", B, ", expected >= 1");
      std::vector<KVCache> caches;
      std::vector<Chunk> chunks;
      caches.reserve(static_cast<size_t>(B));
      for (int s = 0; s < B; ++s) {
        caches.push_back(model.new_cache(o.prompt_tokens + o.steps + 1));
        std::vector<int> prompt;
        for (int i = 0; i < o.prompt_tokens; ++i) prompt.push_back(static_cast<unsigned char>(text[(s * 7 + i) % text.size()]));
        chunks.push_back({&caches.back(), prompt});
      }
      Tensor logits = model.forward(chunks);
      model.reset_times();
      const auto start = std::chrono::steady_clock::now();
      for (int step = 0; step < o.steps; ++step) {
        for (int s = 0; s < B; ++s) {
          const float* row = logits.data_as<float>() + (step == 0 ? (s + 1) * o.prompt_tokens - 1 : s) * c.vocab_size;
          chunks[static_cast<size_t>(s)].tokens = {static_cast<int>(std::max_element(row, row + c.vocab_size) - row)};
        }
        logits = model.forward(chunks);
      }
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      // Floor: the bytes one decode step must read (attention and head weights, the
      // experts its tokens choose, the KV cache so far) over the measured bandwidth.
      const double d = c.d_model, layers = c.layers;
      const double experts_touched = std::min<double>(c.experts, static_cast<double>(B) * c.k);
      const double mean_len = o.prompt_tokens + (o.steps + 1) / 2.0;
      const double bytes = (layers * (4 * d * d + 2 * d + d * c.experts + experts_touched * model.expert_bytes() / 4) +
                            d * c.vocab_size + d + B * d) * 4.0 +
                           B * mean_len * layers * 2 * d * 4.0;
      // FLOPs of one step: projections, attention over the cache, gate, the k experts, head.
      const double flops = B * (layers * (8 * d * d + 4 * d * mean_len + 2 * d * c.experts +
                                          c.k * 2.0 * (model.expert_bytes() / 4)) +
                                2 * d * c.vocab_size);
      const double step_ms = seconds / o.steps * 1e3,
                   floor_ms = bandwidth > 0 ? std::max(bytes / bandwidth, flops / rate) * 1e3 : 0;
      const ModelPhaseTimes& t = model.times();
      if (speak) {
        std::printf("%6d %12.1f %12.3f %10.3f %10.3f %10.3f %10.3f %7.1f\n", B, B * o.steps / seconds, step_ms,
                    t.attention / o.steps * 1e3, t.moe / o.steps * 1e3, t.head / o.steps * 1e3, floor_ms,
                    floor_ms > 0 ? step_ms / floor_ms : 0.0);
        std::fflush(stdout);
        if (csv)
          std::fprintf(csv, "%d,%.2f,%.4f,%.4f,%.4f,%.4f,%.4f,%.2f\n", B, B * o.steps / seconds, step_ms,
                       t.attention / o.steps * 1e3, t.moe / o.steps * 1e3, t.head / o.steps * 1e3, floor_ms,
                       floor_ms > 0 ? step_ms / floor_ms : 0.0);
      }
    }
    if (csv) std::fclose(csv);
  });
  return 0;
}

}  // namespace switchyard
