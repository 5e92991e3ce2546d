// The C++ decoder against the committed tiny language models: the Python
// reference logits, bit-identical positions across prefill / verify / decode
// and batch companions, KV crop, ranks, and clear errors for bad model files.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <numeric>

#include "comm/backends/emulated/emulated_backend.h"
#include "comm/backends/threads/threads_backend.h"
#include "comm/virtual_time.h"
#include "core/error.h"
#include "core/rng.h"
#include "core/safetensors.h"
#include "launch/cluster_presets.h"
#include "model/afd_plan.h"
#include "model/engine.h"
#include "model/generate.h"
#include "model/layer_schedule.h"
#include "model/model.h"
#include "model/serving.h"
#include "model/speculative.h"

namespace switchyard {
namespace {

const std::string kModels = std::string(SWITCHYARD_SOURCE_DIR) + "/examples/tiny_lm/";

std::shared_ptr<Communicator> one_rank() { return ThreadsWorld(1).communicator(0); }

std::vector<int> bytes_of(const std::string& s) { return std::vector<int>(s.begin(), s.end()); }

// Logits rows [first, first + n) of a tensor, as raw bits.
std::vector<float> rows_of(const Tensor& logits, int64_t first, int64_t n) {
  const int64_t V = logits.shape()[1];
  return std::vector<float>(logits.data_as<float>() + first * V, logits.data_as<float>() + (first + n) * V);
}

TEST(Model, LogitsMatchThePythonReference) {
  for (const std::string name : {"base", "draft", "deep_draft"}) {
    Model model(kModels + name, one_rank());
    const SafetensorsFile ref = SafetensorsFile::open(kModels + name + "/reference_logits.safetensors");
    const Tensor prompt = ref.load("prompt"), expected = ref.load("logits");
    std::vector<int> tokens(prompt.data_as<int32_t>(), prompt.data_as<int32_t>() + prompt.numel());
    KVCache cache = model.new_cache();
    const Tensor logits = model.forward({{&cache, tokens}});
    ASSERT_EQ(logits.shape(), expected.shape());
    double num = 0, den = 0;
    for (int64_t i = 0; i < logits.numel(); ++i) {
      const double a = logits.data_as<float>()[i], b = expected.data_as<float>()[i];
      num += (a - b) * (a - b);
      den += b * b;
    }
    std::printf("%s: logits vs the Python reference: relative error in norm %.2e\n", name.c_str(), std::sqrt(num / den));
    EXPECT_LT(std::sqrt(num / den), 1e-4) << name << ": relative error in norm " << std::sqrt(num / den);
  }
}

TEST(Model, PrefillVerifyAndDecodeAgreeBitForBit) {
  Model model(kModels + "base", one_rank());
  const std::vector<int> prompt = bytes_of("A stitch in time "), more = bytes_of("saves nine.");
  std::vector<int> all = prompt;
  all.insert(all.end(), more.begin(), more.end());
  const int64_t P = static_cast<int64_t>(prompt.size()), N = static_cast<int64_t>(more.size());
  // Prefill of everything at once.
  KVCache a = model.new_cache();
  const auto full = rows_of(model.forward({{&a, all}}), P, N);
  // Prefill of the prompt, then one verification chunk.
  KVCache b = model.new_cache();
  model.forward({{&b, prompt}});
  const auto verified = rows_of(model.forward({{&b, more}}), 0, N);
  // Prefill of the prompt, then one token per step, beside an unrelated sequence.
  KVCache c = model.new_cache(), other = model.new_cache();
  model.forward({{&c, prompt}, {&other, bytes_of("Something else entirely")}});
  std::vector<float> decoded;
  for (int64_t i = 0; i < N; ++i) {
    const Tensor step = model.forward({{&other, {int('x')}}, {&c, {more[static_cast<size_t>(i)]}}});
    const auto row = rows_of(step, 1, 1);
    decoded.insert(decoded.end(), row.begin(), row.end());
  }
  ASSERT_EQ(full.size(), verified.size());
  EXPECT_EQ(0, std::memcmp(full.data(), verified.data(), full.size() * sizeof(float))) << "prefill vs verify";
  EXPECT_EQ(0, std::memcmp(full.data(), decoded.data(), full.size() * sizeof(float))) << "prefill vs decode";
}

TEST(Model, KvCropThenReappendReproducesTheLogits) {
  Model model(kModels + "draft", one_rank());
  const std::vector<int> prompt = bytes_of("Never put off till tomorrow "), guess = bytes_of("what you can do"),
                         wrong = bytes_of("qqqq");
  KVCache cache = model.new_cache();
  model.forward({{&cache, prompt}});
  KVCache snapshot = cache.copy();
  const auto first = rows_of(model.forward({{&cache, guess}}), 0, static_cast<int64_t>(guess.size()));
  cache.crop(static_cast<int>(prompt.size()));
  model.forward({{&cache, wrong}});  // a rejected speculation
  cache.crop(static_cast<int>(prompt.size()));
  const auto again = rows_of(model.forward({{&cache, guess}}), 0, static_cast<int64_t>(guess.size()));
  const auto from_copy = rows_of(model.forward({{&snapshot, guess}}), 0, static_cast<int64_t>(guess.size()));
  EXPECT_EQ(0, std::memcmp(first.data(), again.data(), first.size() * sizeof(float)));
  EXPECT_EQ(0, std::memcmp(first.data(), from_copy.data(), first.size() * sizeof(float)));
  EXPECT_THROW(cache.crop(cache.length() + 1), InvalidArgument);
  Model base(kModels + "base", one_rank());
  EXPECT_THROW(base.forward({{&cache, guess}}), InvalidArgument);  // the draft's cache in the base model
}

TEST(Model, GreedyOutputIsTheSameOnOneTwoAndFourRanks) {
  const std::vector<std::vector<int>> prompts = {bytes_of("The meaning of life is"), bytes_of("Linux")};
  std::vector<std::vector<int>> reference;
  {
    Model model(kModels + "base", one_rank());
    reference = generate(model, prompts, 24, {});
  }
  for (int W : {2, 4}) {
    std::vector<std::vector<std::vector<int>>> per_rank(static_cast<size_t>(W));
    run_thread_ranks(W, [&](Communicator& world) {
      Model model(kModels + "base", world.shared_from_this());
      per_rank[static_cast<size_t>(world.rank())] = generate(model, prompts, 24, {});
    });
    for (int r = 0; r < W; ++r) EXPECT_EQ(per_rank[static_cast<size_t>(r)], reference) << W << " ranks, rank " << r;
  }
}

TEST(Model, SamplingIsSeededAndHonoursTopK) {
  Model model(kModels + "draft", one_rank());
  SamplingOptions s{.temperature = 0.8, .top_k = 5, .top_p = 0.9, .seed = 42};
  const auto a = generate(model, {bytes_of("Hello")}, 20, s), b = generate(model, {bytes_of("Hello")}, 20, s);
  EXPECT_EQ(a, b);
  std::vector<float> logits(256, 0.f);
  for (int i = 0; i < 256; ++i) logits[static_cast<size_t>(i)] = static_cast<float>(i % 17);
  Rng rng(fresh_seed());
  for (int i = 0; i < 200; ++i) {
    const int t = sample_token(logits.data(), 256, {.temperature = 1.0, .top_k = 3}, rng);
    EXPECT_EQ(t % 17, 16) << "top-k 3 of logits whose maximum 16 appears " << 256 / 17 << " times";
  }
  EXPECT_THROW(SamplingOptions{.top_p = 0.0}.validate(), InvalidArgument);
  EXPECT_THROW(SamplingOptions{.temperature = -1}.validate(), InvalidArgument);
}

TEST(Model, SampleReturnsTheFilteredDistributionItDrewFrom) {
  std::vector<float> logits(256);
  Rng fill(fresh_seed());
  for (float& v : logits) v = static_cast<float>(fill.normal(0, 2));
  const SamplingOptions o{.temperature = 0.7, .top_k = 40, .top_p = 0.8, .seed = 5};
  // The distribution from its definition: softmax(logits / T) over the top-k, cut to the smallest top-p set.
  std::vector<int> order(256);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return logits[a] > logits[b]; });
  std::vector<double> p(40);
  double z = 0;
  for (int i = 0; i < 40; ++i) z += p[i] = std::exp((logits[order[i]] - logits[order[0]]) / 0.7);
  int keep = 0;
  for (double mass = 0; keep < 40 && mass < 0.8; ++keep) mass += p[keep] / z;
  double kept = 0;
  for (int i = 0; i < keep; ++i) kept += p[i];
  Rng a(9), b(9);
  for (int draw = 0; draw < 50; ++draw) {
    const Sampled s = sample(logits.data(), 256, o, a);
    EXPECT_EQ(s.token, sample_token(logits.data(), 256, o, b)) << "the same draw as sample_token";
    ASSERT_EQ(s.probs.size(), 256u);
    for (int i = 0; i < 256; ++i) {
      const int rank = static_cast<int>(std::find(order.begin(), order.end(), i) - order.begin());
      const double want = rank < keep ? p[rank] / kept : 0.0;
      EXPECT_NEAR(s.probs[i], want, 1e-6) << "token " << i;
    }
    EXPECT_GT(s.probs[s.token], 0.f) << "a drawn token has probability";
  }
  Rng g(1);
  const Sampled greedy = sample(logits.data(), 256, {}, g);
  EXPECT_EQ(greedy.token, order[0]);
  EXPECT_EQ(greedy.probs[order[0]], 1.f);
  EXPECT_EQ(std::accumulate(greedy.probs.begin(), greedy.probs.end(), 0.0), 1.0);
}

TEST(Model, LayerKvCachesHoldOnlyTheirLayersEachWithItsOwnLength) {
  Model model(kModels + "draft", one_rank());
  KVCache part = model.new_cache(32, {3, 1});
  EXPECT_TRUE(part.owns(1));
  EXPECT_TRUE(part.owns(3));
  EXPECT_FALSE(part.owns(0));
  EXPECT_THROW(part.layer(0), InvalidArgument);
  EXPECT_EQ(part.owned_layers(), (std::vector<int>{1, 3}));
  part.layer(1).advance(5);
  part.layer(3).advance(2);
  EXPECT_EQ(part.length(), 2) << "positions every owned layer holds";
  part.advance(1);
  EXPECT_EQ(part.layer(1).length(), 6);
  EXPECT_EQ(part.layer(3).length(), 3);
  part.crop(1);
  EXPECT_EQ(part.layer(1).length(), 1);
  EXPECT_THROW(part.crop(2), InvalidArgument);
  EXPECT_THROW(model.new_cache(8, {0, 0}), InvalidArgument);
  EXPECT_THROW(model.new_cache(8, {model.config().layers}), InvalidArgument);
  // A forward needs every layer's cache.
  std::vector<int> prompt = bytes_of("abc");
  EXPECT_THROW(model.forward({{&part, prompt}}), InvalidArgument);
}

TEST(Model, AttentionDeltaIsWhatApplyAdds) {
  Model model(kModels + "draft", one_rank());
  const std::vector<int> prompt = bytes_of("Half a loaf is better");
  KVCache a = model.new_cache(), b = model.new_cache();
  Tensor x = model.embed({{&a, prompt}});
  Tensor y = Tensor::empty(x.shape(), DType::f32);
  std::memcpy(y.data(), x.data(), x.nbytes());
  const Tensor delta = model.attention_block(0).delta(x, {{&b, prompt}});
  model.attention(0, x, {{&a, prompt}});
  double worst = 0;
  for (int64_t i = 0; i < x.numel(); ++i)
    worst = std::max(worst, std::abs(static_cast<double>(y.data_as<float>()[i]) + delta.data_as<float>()[i] -
                                     x.data_as<float>()[i]));
  EXPECT_LT(worst, 1e-5);
  // Both wrote the same keys and values.
  EXPECT_EQ(0, std::memcmp(a.layer(0).values(0), b.layer(0).values(0), model.config().d_model * prompt.size() * sizeof(float)));
}

// Emulated decode. A slow-memory device (1 GB/s, 1 TFLOP/s) makes every
// block memory-bound; the attention block's charge for one decode row is
// written here from its definition: RMSNorm reads and writes the row; q, k
// and v are three [1, d] x [d, w] GEMMs reading the row and the weights and
// writing w floats; rotary and the KV write touch 6w floats; attention reads
// the sequence's (L + 1) keys and values once; wo reads [w, d] and writes d.
double decode_attention_closed_form(const DeviceModel& dev, double d, double w, double L) {
  const double F = dev.gemm_flops_f32, B = dev.memory_bandwidth, f = 4;
  auto gemm = [&](double m, double n, double k) { return std::max(2 * m * n * k / F, ((m * k + k * n) * f + m * n * f) / B); };
  return (2 * d * f + d * f) / B + 3 * gemm(1, w, d) + 6 * w * f / B +
         std::max(4 * w * (L + 1) / F, ((L + 1) * 2 * w * f + 2 * w * f) / B) + gemm(1, d, w);
}

TEST(EmulatedDecode, AStepsVirtualTimeIsItsClosedForm) {
  DeviceModel dev;
  dev.gemm_flops_f32 = 1e12, dev.gemm_flops_bf16 = 2e12, dev.memory_bandwidth = 1e9;
  const auto device = std::make_shared<const DeviceModel>(dev);
  const auto group = make_emulated_communicator(one_rank(), LinkModel{{1e-6, 1e9}, {1e-6, 1e9}, 1});
  Model model(kModels + "draft", group, {.device = device});
  const ModelConfig& c = model.config();
  const double d = c.d_model;
  // One layer's block, whole and one half of its heads (a tensor-parallel rank's share).
  const auto half = model.attention_block(0).head_slice(c.heads / 2, c.heads / 2);
  for (const AttentionBlock* block : {&model.attention_block(0), static_cast<const AttentionBlock*>(half.get())}) {
    const int L = 9;
    KVCache cache(c, 16, {0}, block->width());
    Tensor prompt = Tensor::zeros({L, c.d_model}, DType::f32);
    std::vector<Chunk> prefill = {{&cache, std::vector<int>(L, 65)}};
    block->delta(prompt, prefill);
    cache.advance(L);
    Tensor row = Tensor::zeros({1, c.d_model}, DType::f32);
    const std::vector<Chunk> decode = {{&cache, {66}}};
    const double before = virtual_time::now();
    block->delta(row, decode);
    const double got = virtual_time::now() - before;
    const double want = decode_attention_closed_form(dev, d, block->width(), L);
    EXPECT_NEAR(got, want, 1e-12 * want) << block->heads() << " heads";
    EXPECT_DOUBLE_EQ(attention_cost(dev, c.d_model, block->width(), decode, 0).kv_bytes, (L + 1) * 2.0 * block->width() * 4);
  }
  // A whole decode step: a sequence whose cache is 40 positions longer costs
  // exactly those positions' keys and values in every layer more (the
  // embedding, norms, experts and head see one row either way).
  auto decode_step = [&](int prompt_length) {
    KVCache cache = model.new_cache(64);
    model.forward({{&cache, std::vector<int>(static_cast<size_t>(prompt_length), 70)}});
    const double before = virtual_time::now();
    model.forward({{&cache, {71}}});
    return virtual_time::now() - before;
  };
  const double short_step = decode_step(5), long_step = decode_step(45);
  const double kv = c.layers * 40.0 * 2 * d * 4 / dev.memory_bandwidth;
  EXPECT_NEAR(long_step - short_step, kv, 1e-9 * long_step);
  EXPECT_GT(short_step, c.layers * decode_attention_closed_form(dev, d, d, 5));
  // The phases add up to the steps (a prefill and a decode step).
  model.reset_times();
  const double start = virtual_time::now();
  decode_step(5);
  const double total = virtual_time::now() - start;
  const ModelPhaseTimes& v = model.virtual_times();
  EXPECT_NEAR(v.embed + v.attention + v.moe + v.head, total, 1e-12 * total);
  EXPECT_GT(v.attention, 0);
  EXPECT_GT(v.moe, 0);
  EXPECT_GT(v.head, 0);
}

TEST(EmulatedDecode, DeviceMemoryBoundsTheSequencesARankHolds) {
  DeviceModel dev;
  Model plain(kModels + "draft", one_rank());
  // The weights one rank holds are the model file's tensors (every expert on one rank), in f32.
  const SafetensorsFile f = SafetensorsFile::open(kModels + "draft/model.safetensors");
  double file_floats = 0;
  for (const SafetensorsEntry& e : f.entries()) {
    double n = 1;
    for (int64_t s : e.shape) n *= static_cast<double>(s);
    file_floats += n;
  }
  EXPECT_DOUBLE_EQ(plain.rank_weight_bytes(), file_floats * 4);
  const double weights = plain.rank_weight_bytes();
  const ModelConfig& c = plain.config();
  const double per_position = 2.0 * c.layers * c.d_model * 4;
  dev.memory_capacity = weights + 10.5 * 20 * per_position;  // ten sequences of 20 positions and a half
  Model model(kModels + "draft", one_rank(), {.device = std::make_shared<const DeviceModel>(dev)});
  InferenceEngine engine(model, LayerSchedule::replicated(c.layers, 1));
  const DecodeMemory m = engine.memory();
  EXPECT_DOUBLE_EQ(m.weights, weights);
  EXPECT_DOUBLE_EQ(m.kv_per_position, per_position);
  EXPECT_EQ(m.max_sequences(20), 10);
  EXPECT_EQ(m.max_sequences(21), 10);  // 10 x 21 <= 10.5 x 20
  EXPECT_EQ(m.max_sequences(22), 9);
  EXPECT_EQ((DecodeMemory{weights, per_position, weights / 2}).max_sequences(20), 0);  // not even the weights
  EXPECT_EQ((DecodeMemory{weights, per_position, 0}).max_sequences(20), -1);           // unbounded
}

// Speculative decoding against plain decoding on one rank (engine tests run
// the gamma x schedule matrix over ranks).
class Speculative : public ::testing::Test {
 protected:
  // The draft with its LM head negated: it proposes the token the real draft
  // finds least likely, so the base rejects nearly every proposal.
  static std::string wrong_draft() {
    const auto dir = std::filesystem::temp_directory_path() / ("wrong_draft_" + std::to_string(fresh_seed() % 1000000));
    std::filesystem::create_directories(dir);
    std::filesystem::copy_file(kModels + "draft/config.json", dir / "config.json");
    const SafetensorsFile f = SafetensorsFile::open(kModels + "draft/model.safetensors");
    std::vector<Tensor> keep;
    std::vector<std::pair<std::string, TensorView>> out;
    for (const auto& e : f.entries()) {
      Tensor t = f.load(e.name);
      if (e.name == "lm_head.weight") {  // flip every element's sign bit (bf16 or f32)
        auto* bytes = static_cast<uint8_t*>(t.data());
        const size_t width = dtype_size(t.dtype());
        for (int64_t i = 0; i < t.numel(); ++i) bytes[static_cast<size_t>(i) * width + width - 1] ^= 0x80;
      }
      keep.push_back(t);
      out.emplace_back(e.name, keep.back().view());
    }
    save_safetensors((dir / "model.safetensors").string(), out);
    return dir.string();
  }
};

TEST_F(Speculative, AnAlwaysWrongDraftStillGivesTheBasesOutput) {
  const std::string wrong = wrong_draft();
  Model base(kModels + "base", one_rank()), draft(wrong, one_rank());
  InferenceEngine be(base, LayerSchedule::replicated(base.config().layers, 1));
  InferenceEngine de(draft, LayerSchedule::replicated(draft.config().layers, 1));
  const std::vector<std::vector<int>> prompts = {bytes_of("A fool and"), bytes_of("x"), bytes_of("The meaning of life")};
  for (int gamma : {1, 4}) {
    SpeculativeStats st;
    const auto got = speculative_generate(be, de, prompts, 10, {.gamma = gamma}, &st);
    EXPECT_EQ(got, generate(base, prompts, 10, {})) << "gamma " << gamma;
    EXPECT_LT(st.acceptance(), 0.05) << "gamma " << gamma;
  }
  std::filesystem::remove_all(wrong);
}

// Calibration "mismatch" after rounds that accepted everything runs no exact
// pass at all (not even an empty collective one): with the base as its own
// draft every proposal is accepted, so mismatch does the draft forwards
// "never" does; "every" adds one pass per round that has tokens to go.
TEST_F(Speculative, MismatchCalibrationSkipsThePassWhenNoSequenceNeedsIt) {
  Model base(kModels + "base", one_rank()), same(kModels + "base", one_rank());
  InferenceEngine be(base, LayerSchedule::replicated(base.config().layers, 1));
  InferenceEngine de(same, LayerSchedule::replicated(same.config().layers, 1));
  const std::vector<std::vector<int>> prompts = {bytes_of("A fool and"), bytes_of("The meaning of life")};
  std::map<Calibration, SpeculativeStats> st;
  for (Calibration c : {Calibration::never, Calibration::mismatch, Calibration::every}) {
    const auto got = speculative_generate(be, de, prompts, 12, {.gamma = 3, .calibration = c}, &st[c]);
    EXPECT_EQ(got, generate(base, prompts, 12, {})) << calibration_name(c);
  }
  EXPECT_EQ(st[Calibration::mismatch].accepted, st[Calibration::mismatch].proposed);
  EXPECT_EQ(st[Calibration::mismatch].calibrations, 0);
  EXPECT_EQ(st[Calibration::mismatch].draft_forwards, st[Calibration::never].draft_forwards);
  EXPECT_GT(st[Calibration::every].calibrations, 0);
}

// Speculative sampling keeps the base's distribution at every position: 8000
// copies of one prompt (each its own generator) take 4 new tokens with gamma
// 3 and calibration every round (so a calibrated first proposal, later
// proposals, a rejection's residual and the bonus token all occur). For each
// position k, the tokens that follow the most common k-token prefix are tested
// against the base's filtered distribution after that prefix (temperature 1,
// top-k 6): chi-square, categories expected below 5 times lumped, under the
// 0.1% critical value.
TEST_F(Speculative, SamplingKeepsTheBasesDistributionAtEveryPosition) {
  Model base(kModels + "base", one_rank()), draft(kModels + "draft", one_rank());
  InferenceEngine be(base, LayerSchedule::replicated(base.config().layers, 1));
  InferenceEngine de(draft, LayerSchedule::replicated(draft.config().layers, 1));
  const std::vector<int> prompt = bytes_of("Th");
  const SamplingOptions sampling{.temperature = 1.0, .top_k = 6, .seed = 4242};
  const int n = 8000, new_tokens = 4;
  SpeculativeStats st;
  const auto out = speculative_generate(be, de, std::vector<std::vector<int>>(n, prompt), new_tokens,
                                        {.gamma = 3, .sampling = sampling, .calibration = Calibration::every}, &st);
  const double critical[] = {0, 10.83, 13.82, 16.27, 18.47, 20.52};  // 0.1% points, 1..5 degrees of freedom
  for (int k = 0; k < new_tokens; ++k) {
    std::map<std::vector<int>, int> prefixes;
    for (const auto& t : out) ++prefixes[std::vector<int>(t.begin(), t.begin() + k)];
    const auto most = std::max_element(prefixes.begin(), prefixes.end(),
                                       [](const auto& a, const auto& b) { return a.second < b.second; });
    std::vector<double> count(256, 0.0);
    for (const auto& t : out)
      if (std::equal(most->first.begin(), most->first.end(), t.begin())) count[static_cast<size_t>(t[static_cast<size_t>(k)])] += 1;
    std::vector<int> context = prompt;
    context.insert(context.end(), most->first.begin(), most->first.end());
    KVCache cache = base.new_cache(32);
    const Tensor logits = base.forward({{&cache, context}});
    Rng unused(0);
    const std::vector<float> p =
        sample(logits.data_as<float>() + (logits.shape()[0] - 1) * 256, 256, sampling, unused).probs;
    double chi2 = 0, rest_seen = 0, rest_expected = 0;
    int categories = 0;
    for (int v = 0; v < 256; ++v) {
      const double e = most->second * static_cast<double>(p[static_cast<size_t>(v)]), c = count[static_cast<size_t>(v)];
      if (p[static_cast<size_t>(v)] == 0) {
        EXPECT_EQ(c, 0) << "position " << k << ": token " << v << " is outside the base's top-k";
        continue;
      }
      if (e < 5) {
        rest_seen += c, rest_expected += e;
        continue;
      }
      chi2 += (c - e) * (c - e) / e;
      ++categories;
    }
    if (rest_expected > 0) chi2 += (rest_seen - rest_expected) * (rest_seen - rest_expected) / rest_expected, ++categories;
    ASSERT_GE(categories, 2) << "position " << k << ": too few samples after the prefix (" << most->second << ")";
    EXPECT_LT(chi2, critical[std::min(categories - 1, 5)])
        << "position " << k << " after its most common prefix (" << most->second << " samples)";
    std::printf("[speculative sampling] position %d: %d samples, chi-square %.2f, %d degrees of freedom\n", k,
                most->second, chi2, categories - 1);
  }
  EXPECT_GT(st.accepted, 0);
  EXPECT_LT(st.accepted, st.proposed) << "the draft's distribution differs from the base's, so some are resampled";
  EXPECT_GT(st.calibrations, 0);
  EXPECT_THROW(speculative_generate(be, de, {prompt}, 2, {.gamma = 0}), InvalidArgument);
  EXPECT_THROW(speculative_generate(be, de, {{}}, 2, {}), InvalidArgument);
}

TEST(LayerSchedule, InstancesAndBadConfigs) {
  const LayerSchedule dp = LayerSchedule::make({.attention = "dp"}, 8, 4);
  EXPECT_EQ(dp.token_groups(), 4);
  EXPECT_EQ(dp.token_group_of(3), 3);
  EXPECT_EQ(dp.group_leader(2), 2);
  EXPECT_EQ(dp.owned_layers(1).size(), 8u);
  EXPECT_EQ(dp.layer(5).ffn_ranks, (std::vector<int>{0, 1, 2, 3}));
  const LayerSchedule rep = LayerSchedule::make({}, 8, 4);
  EXPECT_EQ(rep.attention(), AttentionMode::replicated);
  EXPECT_EQ(rep.token_groups(), 1);
  EXPECT_EQ(rep.token_group_of(3), 0);
  EXPECT_EQ(rep.group_leader(0), 0);
  auto error_of = [](const ScheduleOptions& o) {
    try {
      LayerSchedule::make(o, 8, 4);
    } catch (const ConfigError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(error_of({.attention = "pipeline"}).find("model.attention = 'pipeline', expected replicated, dp or tp"),
            std::string::npos) << error_of({.attention = "pipeline"});
  EXPECT_NE(error_of({.attention = "dp", .tp = 2}).find("model.tp = 2 with model.attention = dp"), std::string::npos);
  EXPECT_NE(error_of({.attention = "dp", .tp = 0}).find("model.tp = 0, expected >= 1"), std::string::npos);
  EXPECT_NE(error_of({.attention = "tp", .tp = 3}).find("model.tp = 3 does not divide the 4 ranks"), std::string::npos)
      << error_of({.attention = "tp", .tp = 3});
  // Two tensor-parallel groups of two: ranks 0-1 and 2-3 share their sequences.
  const LayerSchedule tp = LayerSchedule::make({.attention = "tp", .tp = 2}, 8, 4);
  EXPECT_EQ(tp.attention(), AttentionMode::tp);
  EXPECT_EQ(tp.tp(), 2);
  EXPECT_EQ(tp.token_groups(), 2);
  EXPECT_EQ(tp.token_group_of(1), 0);
  EXPECT_EQ(tp.token_group_of(2), 1);
  EXPECT_EQ(tp.group_leader(1), 2);
  EXPECT_EQ(tp.tp_rank(3), 1);
  EXPECT_EQ(tp.owned_layers(3).size(), size_t{8});
  EXPECT_THROW(tp.group_leader(2), InvalidArgument);
  // EasySpec's layer groups: first and last layers alone, the middle ones in groups of n.
  const LayerSchedule lp = LayerSchedule::layer_parallel(6, 4, 4);
  EXPECT_EQ(lp.layer_groups(), (std::vector<std::vector<int>>{{0}, {1, 2, 3, 4}, {5}}));
  EXPECT_EQ(LayerSchedule::layer_parallel(8, 4, 3).layer_groups(),
            (std::vector<std::vector<int>>{{0}, {1, 2, 3}, {4, 5, 6}, {7}}));
  EXPECT_EQ(lp.token_groups(), 1);
  EXPECT_EQ(lp.owned_layers(3).size(), size_t{6}) << "every rank keeps every layer's KV (calibration)";
  auto lp_error = [](int n) {
    try {
      LayerSchedule::layer_parallel(6, 2, n);
    } catch (const ConfigError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(lp_error(3).find("--lp = 3: layer-parallel groups of 3 layers need as many ranks; expected 1..2"),
            std::string::npos) << lp_error(3);
  EXPECT_NE(lp_error(0).find("--lp = 0"), std::string::npos);
  EXPECT_NE(error_of({.attention = "x", .attention_field = "--attention"}).find("--attention = 'x'"), std::string::npos);
  EXPECT_THROW(dp.token_group_of(4), InvalidArgument);
}

TEST(Serving, PoissonArrivalsAndBadRequests) {
  const auto t = poisson_arrivals(4000, 50.0, 7);
  EXPECT_EQ(t, poisson_arrivals(4000, 50.0, 7));
  EXPECT_TRUE(std::is_sorted(t.begin(), t.end()));
  EXPECT_NEAR(t.back() / 4000, 1.0 / 50, 0.1 / 50) << "mean gap 1 / rate";
  EXPECT_EQ(poisson_arrivals(3, 0, 1), (std::vector<double>{0, 0, 0}));
  EXPECT_THROW(poisson_arrivals(3, -1, 1), InvalidArgument);
  Model model(kModels + "draft", one_rank());
  InferenceEngine engine(model, LayerSchedule::data_parallel(model.config().layers, 1));
  RoundRobinScheduler rr;
  auto error_of = [&](std::vector<Request> r, ServingOptions o = {}) {
    try {
      serve(engine, r, rr, o);
    } catch (const InvalidArgument& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(error_of({{.id = 1, .prompt = {}}}).find("request 1 has an empty prompt"), std::string::npos);
  EXPECT_NE(error_of({{.id = 2, .prompt = {300}}}).find("token 300"), std::string::npos);
  EXPECT_NE(error_of({{.id = 3, .prompt = {1}, .max_new_tokens = 0}}).find("max_new_tokens = 0"), std::string::npos);
  EXPECT_NE(error_of({{.id = 4, .prompt = {1}, .max_new_tokens = 9}}, {.kv_budget = 5}).find("more than kv_budget = 5"),
            std::string::npos);
  EXPECT_NE(error_of({{.id = 5, .prompt = {1}}, {.id = 5, .prompt = {2}}}).find("id 5 appears twice"), std::string::npos);
  EXPECT_NE(error_of({{.id = 6, .prompt = {1}, .max_new_tokens = 100000}}).find("exceed max_seq"), std::string::npos);
  EXPECT_NE(error_of({{.id = 7, .prompt = {1}}}, {.max_batch = 0}).find("max_batch = 0"), std::string::npos);
  EXPECT_TRUE(serve(engine, {}, rr, {}).empty()) << "no requests: returns at once";
}

// A copy of the base model's folder with one thing broken.
class BadModelFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() / ("bad_model_" + std::to_string(fresh_seed() % 1000000));
    std::filesystem::create_directories(dir_);
    std::filesystem::copy_file(kModels + "draft/config.json", dir_ / "config.json");
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  // The draft's tensors, with `drop` left out and `reshape` given a wrong shape.
  void write_weights(const std::string& drop, const std::string& reshape = "") {
    const SafetensorsFile f = SafetensorsFile::open(kModels + "draft/model.safetensors");
    std::vector<Tensor> keep;
    std::vector<std::pair<std::string, TensorView>> out;
    for (const auto& e : f.entries()) {
      if (e.name == drop) continue;
      Tensor t = f.load(e.name);
      if (e.name == reshape) t = Tensor::adopt(t.view().reshape({t.numel()}), t.storage());
      keep.push_back(t);
      out.emplace_back(e.name, keep.back().view());
    }
    save_safetensors((dir_ / "model.safetensors").string(), out);
  }
  std::string error_of() {
    try {
      Model model(dir_.string(), one_rank());
    } catch (const std::exception& e) {
      return e.what();
    }
    return "";
  }
  std::filesystem::path dir_;
};

TEST_F(BadModelFiles, MissingTensorIsNamedWithTheFile) {
  write_weights("layers.3.attn.wk");
  const std::string e = error_of();
  EXPECT_NE(e.find("layers.3.attn.wk"), std::string::npos) << e;
  EXPECT_NE(e.find("model.safetensors"), std::string::npos) << e;
}

TEST_F(BadModelFiles, WrongShapeNamesTheExpectedShape) {
  write_weights("", "layers.0.ffn.experts.w1");
  const std::string e = error_of();
  EXPECT_NE(e.find("layers.0.ffn.experts.w1"), std::string::npos) << e;
  EXPECT_NE(e.find("expected [8, 128, 64]"), std::string::npos) << e;
}

TEST_F(BadModelFiles, ConfigMismatchAndBadConfigAreNamed) {
  write_weights("");
  std::string text;
  {
    std::ifstream in(dir_ / "config.json");
    text.assign(std::istreambuf_iterator<char>(in), {});
  }
  auto rewrite = [&](const std::string& from, const std::string& to) {
    std::string t = text;
    t.replace(t.find(from), from.size(), to);
    std::ofstream(dir_ / "config.json") << t;
  };
  rewrite("\"d_model\": 128", "\"d_model\": 96");
  EXPECT_NE(error_of().find("expected [256, 96]"), std::string::npos) << error_of();
  rewrite("\"hidden\": 64", "\"hidden\": \"wide\"");
  EXPECT_NE(error_of().find("ffn.hidden"), std::string::npos) << error_of();
  rewrite("\"heads\": 4,", "");
  EXPECT_NE(error_of().find("'heads' is missing"), std::string::npos) << error_of();
}


// ---- attention-FFN disaggregation's cost model (model/afd_plan.h) ----

// Step-3 (arXiv 2507.19427) Table 7: the minimum MoE sparsity per GPU, from
// H = 7168, L = 61, the GPU's FP8 (H800, H20) or BF16 (A800, 910B) FLOPs and
// HBM bandwidth, and 8 NICs of 400 (H800, H20) or 200 Gb/s per server.
TEST(AfdPlan, Step3MinimumSparsityTable) {
  struct Gpu {
    const char* name;
    double flops, hbm, network, published;
  };
  for (const Gpu& g : {Gpu{"H800", 1.98e15, 3.35e12, 8 * 50e9, 0.058}, Gpu{"H20", 2.96e14, 4.0e12, 8 * 50e9, 0.0073},
                       Gpu{"A800", 3.12e14, 2.0e12, 8 * 25e9, 0.031}, Gpu{"910B", 2.80e14, 1.6e12, 8 * 25e9, 0.034}}) {
    const double s = step3_min_sparsity(7168, 61, g.flops, g.hbm, g.network);
    EXPECT_NEAR(s, g.published, g.published * 0.02) << g.name;  // the table's two significant digits
  }
}

// MegaScale-Infer's constraint m >= 2 (1 + Tc / Tf), as its paper tabulates it: 3 micro-batches while
// Tc < Tf / 2, 4 up to Tc = Tf.
TEST(AfdPlan, MicroBatchBound) {
  EXPECT_EQ(min_microbatches(0, 1), 2);
  EXPECT_EQ(min_microbatches(0.3, 1), 3);
  EXPECT_EQ(min_microbatches(0.5, 1), 3);
  EXPECT_EQ(min_microbatches(0.6, 1), 4);
  EXPECT_EQ(min_microbatches(1.0, 1), 4);
  EXPECT_THROW(min_microbatches(1, 0), InvalidArgument);
  // The engine's automatic depth: the bound from Tf = max(Ta, Te), within the sequences and the limit.
  EXPECT_EQ(auto_microbatches(0, 0, 0, 10), 2);         // nothing measured yet
  EXPECT_EQ(auto_microbatches(1.0, 0.5, 0.3, 10), 3);   // 2 (1 + 0.3)
  EXPECT_EQ(auto_microbatches(0.5, 1.0, 0.6, 10), 4);   // Tf is the slower side
  EXPECT_EQ(auto_microbatches(1.0, 1.0, 0.3, 2), 2);    // no more micro-batches than sequences
  EXPECT_EQ(auto_microbatches(1.0, 1.0, 0.3, 0), 1);    // a rank with none still runs one
  EXPECT_EQ(auto_microbatches(1.0, 1.0, 0.9, 100), 4);  // 2 (1 + 0.9)
  EXPECT_EQ(auto_microbatches(1.0, 1.0, 5.0, 100), 2);  // transfer-bound: more would only add latencies
  EXPECT_EQ(auto_microbatches(1.0, 1.0, 0.99, 3), 3);   // within the sequences
}

// One MoE layer with round numbers, computed by hand from the model's
// definition: Ta = Te = 200 us (compute-bound), the A->F transfer 10 us and
// F->A 20 us over a 10 GB/s NIC. m = 1: the round trip, 430 us; m = 3:
// each side busy 600 us per layer, plus the fill term 430 - 200 us.
TEST(AfdPlan, CostOfAHandComputedLayer) {
  DecodeShape s;
  s.name = "round";
  s.layers = s.moe_layers = 1;
  s.hidden = 1000;
  s.attention_params = 1e6;
  s.experts = 2, s.top_k = 1;
  s.expert_params = 1e6;
  AfdHardware hw;
  hw.flops = 1e12, hw.memory_bandwidth = 1e12, hw.nic_bandwidth = 1e10, hw.gpus_per_node = 1;
  hw.intra_bandwidth = 1e11;
  const AfdCost one = afd_cost(s, hw, 0, {false, 1, 1, 1, 100});
  EXPECT_NEAR(one.ta, 200e-6, 1e-9);
  EXPECT_NEAR(one.te, 200e-6, 1e-9);
  EXPECT_NEAR(one.tc, 20e-6, 1e-9);
  EXPECT_NEAR(one.tpot, 430e-6, 1e-9);
  EXPECT_NEAR(one.tokens_per_s_per_gpu, 100 / 430e-6 / 2, 1e-3);
  const AfdCost three = afd_cost(s, hw, 0, {false, 1, 1, 3, 100});
  EXPECT_NEAR(three.layer, 600e-6, 1e-9);
  EXPECT_NEAR(three.tpot, 600e-6 + 230e-6, 1e-9);
  EXPECT_NEAR(three.bubble_attention, 0, 1e-12);
  EXPECT_NEAR(three.bubble_ffn, 0, 1e-12);
  EXPECT_NEAR(three.tokens_per_s_per_gpu, 300 / 830e-6 / 2, 1e-3);
  // Colocated on 2 GPUs of separate nodes: the fullest GPU holds 1 expert with half of all 200 routed rows
  // (200 us), and half of each token's single choice leaves the node: 5 us out, 10 us back. m = 1 runs them
  // in turn (415 us); m = 2 overlaps one micro-batch's all-to-all with the other's 400 us of compute.
  const AfdCost colocated = afd_cost(s, hw, 0, {true, 2, 2, 1, 100});
  EXPECT_NEAR(colocated.te, 200e-6, 1e-9);
  EXPECT_NEAR(colocated.tc, 15e-6, 1e-9);
  EXPECT_NEAR(colocated.tpot, 415e-6, 1e-9);
  EXPECT_NEAR(colocated.tokens_per_s_per_gpu, 100 / 415e-6, 1e-3);
  EXPECT_NEAR(afd_cost(s, hw, 0, {true, 2, 2, 2, 100}).tpot, 800e-6, 1e-9);
  // Two FFN GPUs for 2 experts at top-1: the fullest holds one expert and half the rows (100 us of compute).
  EXPECT_NEAR(afd_cost(s, hw, 0, {false, 1, 2, 1, 100}).te, 100e-6, 1e-9);
  // The same deployment on one node (A + F fit): the transfer takes NVLink, 10x faster, to each FFN GPU a
  // token's experts touch (1 of 2 at top-1).
  hw.gpus_per_node = 8;
  EXPECT_NEAR(afd_cost(s, hw, 0, {false, 1, 1, 1, 100}).tc, 2e-6, 1e-9);
  s.top_k = 2;  // both FFN GPUs touched: 1.5 destinations expected under uniform routing over 2 GPUs
  EXPECT_NEAR(afd_cost(s, hw, 0, {false, 1, 2, 1, 100}).nic, 1.5 * 100 * 1000 * 2 / 1e11, 1e-9);
  EXPECT_THROW(afd_cost(s, hw, 0, {false, 1, 1, 1, 0}), InvalidArgument);
  EXPECT_THROW(afd_cost(s, hw, 0, {false, 1, 2, 1, 100, 3}), InvalidArgument);  // tp 3 does not divide 2 FFN GPUs
}

// The search's answers meet the target and the HBM on the h100 preset, and a
// colocated GPU, holding attention, KV and experts, fits fewer sequences than
// an attention GPU at the same batch.
TEST(AfdPlan, SearchMeetsTargetAndMemory) {
  const DecodeShape step3 = DecodeShape::preset("step3");
  EXPECT_NEAR(step3.attention_params, 169.3e6, 0.1e6);  // the paper's MFA layer
  EXPECT_NEAR(step3.layers * step3.kv_bytes_per_position * 4096, 1.28e8, 0.01e8);  // KV per token at 4K, FP8
  ClusterModel h100 = load_cluster_preset("h100-nvlink-ib");
  const AfdHardware hw = AfdHardware::of(h100, step3.weight_bytes);
  EXPECT_NEAR(hw.flops, 1979e12 * 0.7, 1e12);  // FP8 weights at the preset's FP8 rate
  const AfdSearch search{32, 4096, 0.05, 4};
  const AfdChoice afd = best_afd(step3, hw, search);
  const AfdChoice colocated = best_colocated(step3, hw, search);
  ASSERT_TRUE(afd.found);
  ASSERT_TRUE(colocated.found);
  for (const AfdChoice* c : {&afd, &colocated}) {
    EXPECT_LE(c->cost.tpot, 0.05);
    EXPECT_TRUE(c->cost.fits);
    EXPECT_LE(c->cost.attention_memory, hw.memory_capacity);
    // One more sequence would break the target or the memory.
    AfdPlan more = c->plan;
    ++more.batch;
    const AfdCost next = afd_cost(step3, hw, 4096, more);
    EXPECT_TRUE(!next.fits || next.tpot > 0.05);
  }
  AfdPlan same = afd.plan;
  same.colocated = true, same.attention_gpus = same.ffn_gpus = 32;
  EXPECT_GT(afd_cost(step3, hw, 4096, same).attention_memory, afd.cost.attention_memory);
  EXPECT_THROW(DecodeShape::preset("gpt-5"), ConfigError);
  EXPECT_THROW(best_afd(step3, hw, {1, 4096, 0.05, 4}), ConfigError);
}

}  // namespace
}  // namespace switchyard
