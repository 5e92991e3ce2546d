#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>

#include "core/error.h"
#include "core/rng.h"
#include "core/safetensors.h"
#include "launch/trace_stats.h"

namespace switchyard {
namespace {

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / (name + std::to_string(fresh_seed() % 1000000))).string();
}

// A trace whose layer 0 routes each token id to fixed experts (fully
// predictable from the id) and whose layer 1 routes at random.
TEST(TraceStats, PredictableLayerHitsAndRandomLayerDoesNot) {
  const int64_t N = 5000;
  const int E = 8, k = 2;
  Rng rng(fresh_seed());
  Tensor tokens = Tensor::empty({N}, DType::i32), positions = Tensor::empty({N}, DType::i32);
  Tensor e0 = Tensor::empty({N, k}, DType::i32), e1 = Tensor::empty({N, k}, DType::i32);
  Tensor w = Tensor::zeros({N, k}, DType::f32), u = Tensor::empty({N, 3}, DType::f32);
  rng.fill_uniform(u, 0.0, 1.0);
  for (int64_t i = 0; i < N; ++i) {
    const int tok = static_cast<int>(u.data_as<float>()[i * 3] * 4);  // ids 0..3
    tokens.data_as<int32_t>()[i] = tok;
    positions.data_as<int32_t>()[i] = static_cast<int32_t>(i % 128);
    e0.data_as<int32_t>()[i * k] = 2 * tok;
    e0.data_as<int32_t>()[i * k + 1] = 2 * tok + 1;
    const int a = static_cast<int>(u.data_as<float>()[i * 3 + 1] * E), b = (a + 1 + static_cast<int>(u.data_as<float>()[i * 3 + 2] * (E - 1))) % E;
    e1.data_as<int32_t>()[i * k] = a;
    e1.data_as<int32_t>()[i * k + 1] = b;
  }
  const std::string path = temp_path("trace");
  save_safetensors(path, {{"tokens", tokens}, {"positions", positions}, {"layer0.experts", e0}, {"layer0.weights", w},
                          {"layer1.experts", e1}, {"layer1.weights", w}},
                   {{"format", "switchyard-routing-trace-v1"}, {"model", "synthetic"}, {"k", "2"}, {"experts", "8"}});
  const TraceStats s = trace_stats(path);
  std::filesystem::remove(path);
  ASSERT_EQ(s.layers, 2);
  EXPECT_EQ(s.tokens, N);
  EXPECT_EQ(s.build_tokens, N / 5);
  EXPECT_DOUBLE_EQ(s.per_layer[0].token_id_hit_rate, 1.0);
  EXPECT_NEAR(s.per_layer[0].global_top_k_hit_rate, 0.25, 0.05);  // the two busiest experts serve one id of four
  EXPECT_NEAR(s.per_layer[1].token_id_hit_rate, 0.25, 0.05);      // random routing: k / E
  EXPECT_DOUBLE_EQ(s.per_layer[1].random_hit_rate, 0.25);
  int64_t total = 0;
  for (int64_t n : s.per_layer[0].load) total += n;
  EXPECT_EQ(total, N * k);
  EXPECT_NE(format_trace_stats(s).find("token-id hit"), std::string::npos);
  // Once per destination rank: layer 0's pair always shares a rank (half its rows
  // saved); layer 1's random pair shares one with probability (E/W - 1) / (E - 1).
  ASSERT_EQ(s.per_layer[0].rows_saved_once_per_rank.size(), 2u);  // W = 2, 4
  EXPECT_EQ(s.per_layer[0].rows_saved_once_per_rank[1].first, 4);
  EXPECT_DOUBLE_EQ(s.per_layer[0].rows_saved_once_per_rank[0].second, 0.5);
  EXPECT_DOUBLE_EQ(s.per_layer[0].rows_saved_once_per_rank[1].second, 0.5);
  EXPECT_NEAR(s.per_layer[1].rows_saved_once_per_rank[0].second, 3.0 / 14, 0.02);
  EXPECT_NEAR(s.per_layer[1].rows_saved_once_per_rank[1].second, 1.0 / 14, 0.02);
  EXPECT_NE(format_trace_stats(s).find("rows saved by sending a token once per destination rank"), std::string::npos);
}

TEST(TraceStats, MalformedTracesNameFileTensorAndExpectation) {
  const std::string path = temp_path("bad_trace");
  Tensor tokens = Tensor::zeros({10}, DType::i32), experts = Tensor::zeros({10, 3}, DType::i32);
  save_safetensors(path, {{"tokens", tokens}, {"layer0.experts", experts}}, {{"k", "2"}});
  try {
    trace_stats(path);
    FAIL() << "no error for a [10, 3] experts tensor with k = 2";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("layer0.experts"), std::string::npos) << e.what();
  }
  Tensor f_tokens = Tensor::zeros({10}, DType::f32);
  save_safetensors(path, {{"tokens", f_tokens}});
  EXPECT_THROW(trace_stats(path), InvalidArgument);
  std::filesystem::remove(path);
}

}  // namespace
}  // namespace switchyard
