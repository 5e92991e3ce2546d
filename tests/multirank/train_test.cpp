// Training the decoder (model/lm_train.h) on every rank count of the world:
// gradients against central differences of a float64 reference written from
// the architecture's definition (examples/tiny_lm/README.md), resume against
// an uninterrupted run, checkpoints across world sizes and killed saves.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/file.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <algorithm>
#include <map>

#include <nlohmann/json.hpp>

#include "comm/backends/threads/threads_backend.h"
#include "core/rng.h"
#include "core/safetensors.h"
#include "model/lm_train.h"
#include "model/model.h"
#include "parallel/checkpoint.h"
#include "tests/common/rank_harness.h"

namespace switchyard {
namespace {

using testing::for_each_rank;
namespace fs = std::filesystem;

ModelConfig tiny_config() {
  ModelConfig c;
  c.name = "tiny-train-test";
  c.vocab_size = 256;
  c.d_model = 16;
  c.layers = 2;
  c.heads = 2;
  c.max_seq = 32;
  c.experts = 4;
  c.k = 2;
  c.hidden = 12;
  c.activation = "gelu";
  c.gate = "softmax";
  return c;
}

LmTrainOptions dropless() {
  LmTrainOptions o;
  o.plan.exchange = ExchangeMode::dropless;
  return o;
}

// ---- the float64 reference, from the definition ----

using Vec = std::vector<double>;
struct Reference {
  ModelConfig c;
  std::map<std::string, Vec> t;  // the checkpoint's names; experts stacked [E, ...]
};

Vec to_vec(const float* p, int64_t n) { return Vec(p, p + n); }

// The whole model in double: replicated tensors from this rank, experts
// gathered from every rank (identity placement: rank r holds r*L .. r*L+L-1).
Reference reference_of(TrainableLM& m) {
  Reference ref{m.config(), {}};
  Communicator& world = m.world();
  for (const TrainParam& p : m.parameters()) {
    if (p.kind != ParamKind::expert) {
      ref.t[p.name] = to_vec(p.value.data_as<float>(), p.value.numel());
      continue;
    }
    std::vector<float> all(static_cast<size_t>(p.value.numel() * world.size()));
    world.allgather(p.value, TensorView(all.data(), DType::f32, {p.value.numel() * world.size()})).wait();
    ref.t[p.name] = Vec(all.begin(), all.end());
  }
  return ref;
}

Vec rmsnorm(const Vec& x, const Vec& w, int64_t rows, int64_t d, double eps) {
  Vec y(x.size());
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t j = 0; j < d; ++j) ss += x[r * d + j] * x[r * d + j];
    const double inv = 1 / std::sqrt(ss / d + eps);
    for (int64_t j = 0; j < d; ++j) y[r * d + j] = x[r * d + j] * inv * w[j];
  }
  return y;
}

Vec matmul(const Vec& x, const Vec& w, int64_t rows, int64_t k, int64_t n) {
  Vec y(static_cast<size_t>(rows * n), 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j < n; ++j) y[r * n + j] += x[r * k + i] * w[i * n + j];
  return y;
}

void rotate(Vec& u, int64_t rows, int T, const ModelConfig& c) {
  const int hd = c.head_dim(), half = hd / 2;
  for (int64_t r = 0; r < rows; ++r)
    for (int h = 0; h < c.heads; ++h)
      for (int j = 0; j < half; ++j) {
        const double angle = static_cast<double>(r % T) * std::pow(c.rope_theta, -static_cast<double>(j) / half);
        double& a = u[r * c.d_model + h * hd + j];
        double& b = u[r * c.d_model + h * hd + j + half];
        const double x1 = a, x2 = b;
        a = x1 * std::cos(angle) - x2 * std::sin(angle);
        b = x1 * std::sin(angle) + x2 * std::cos(angle);
      }
}

// sum over ranks' targets of CE / total + coef / W * sum over ranks of mean-over-layers balance.
double reference_loss(const Reference& ref, const std::vector<std::vector<int>>& tokens,
                      const std::vector<std::vector<int>>& targets, int T, double coef) {
  const ModelConfig& c = ref.c;
  const int64_t d = c.d_model, V = c.vocab_size, E = c.experts, H = c.hidden, hd = c.head_dim();
  const int W = static_cast<int>(tokens.size());
  double ce = 0, balance = 0;
  int64_t total = 0;
  for (int r = 0; r < W; ++r) {
    const int64_t N = static_cast<int64_t>(tokens[static_cast<size_t>(r)].size());
    total += N;
    if (N == 0) continue;
    Vec x(static_cast<size_t>(N * d));
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < d; ++j) x[i * d + j] = ref.t.at("embed.weight")[tokens[static_cast<size_t>(r)][static_cast<size_t>(i)] * d + j];
    for (int l = 0; l < c.layers; ++l) {
      const std::string p = "layers." + std::to_string(l) + ".";
      const Vec a = rmsnorm(x, ref.t.at(p + "attn_norm.weight"), N, d, c.norm_eps);
      Vec q = matmul(a, ref.t.at(p + "attn.wq"), N, d, d), k = matmul(a, ref.t.at(p + "attn.wk"), N, d, d);
      const Vec v = matmul(a, ref.t.at(p + "attn.wv"), N, d, d);
      rotate(q, N, T, c);
      rotate(k, N, T, c);
      Vec o(static_cast<size_t>(N * d), 0.0);
      for (int64_t s = 0; s < N / T; ++s)
        for (int h = 0; h < c.heads; ++h)
          for (int i = 0; i < T; ++i) {
            const int64_t qi = s * T + i;
            Vec score(static_cast<size_t>(i + 1));
            double mx = -1e300;
            for (int j = 0; j <= i; ++j) {
              double dot = 0;
              for (int64_t e = 0; e < hd; ++e) dot += q[qi * d + h * hd + e] * k[(s * T + j) * d + h * hd + e];
              score[static_cast<size_t>(j)] = dot / std::sqrt(static_cast<double>(hd));
              mx = std::max(mx, score[static_cast<size_t>(j)]);
            }
            double sum = 0;
            for (double& z : score) sum += z = std::exp(z - mx);
            for (int j = 0; j <= i; ++j)
              for (int64_t e = 0; e < hd; ++e) o[qi * d + h * hd + e] += score[static_cast<size_t>(j)] / sum * v[(s * T + j) * d + h * hd + e];
          }
      const Vec ao = matmul(o, ref.t.at(p + "attn.wo"), N, d, d);
      for (size_t i = 0; i < x.size(); ++i) x[i] += ao[i];
      // The MoE: softmax gate, top-k by probability (ties to the lower expert), weights = probabilities.
      const Vec xn = rmsnorm(x, ref.t.at(p + "ffn_norm.weight"), N, d, c.norm_eps);
      const Vec logits = matmul(xn, ref.t.at(p + "ffn.gate.weight"), N, d, E);
      const Vec &w1 = ref.t.at(p + "ffn.experts.w1"), &b1 = ref.t.at(p + "ffn.experts.b1");
      const Vec &w2 = ref.t.at(p + "ffn.experts.w2"), &b2 = ref.t.at(p + "ffn.experts.b2");
      Vec load(static_cast<size_t>(E), 0.0), mean_prob(static_cast<size_t>(E), 0.0);
      for (int64_t i = 0; i < N; ++i) {
        Vec prob(static_cast<size_t>(E));
        double mx = -1e300, sum = 0;
        for (int64_t e = 0; e < E; ++e) mx = std::max(mx, logits[i * E + e]);
        for (int64_t e = 0; e < E; ++e) sum += prob[static_cast<size_t>(e)] = std::exp(logits[i * E + e] - mx);
        for (double& z : prob) z /= sum;
        for (int64_t e = 0; e < E; ++e) mean_prob[static_cast<size_t>(e)] += prob[static_cast<size_t>(e)] / N;
        std::vector<bool> taken(static_cast<size_t>(E), false);
        for (int choice = 0; choice < c.k; ++choice) {
          int64_t best = -1;
          for (int64_t e = 0; e < E; ++e)
            if (!taken[static_cast<size_t>(e)] && (best < 0 || prob[static_cast<size_t>(e)] > prob[static_cast<size_t>(best)])) best = e;
          taken[static_cast<size_t>(best)] = true;
          load[static_cast<size_t>(best)] += 1;
          Vec hid(static_cast<size_t>(H));
          for (int64_t u = 0; u < H; ++u) {
            double z = b1[best * H + u];
            for (int64_t j = 0; j < d; ++j) z += xn[i * d + j] * w1[(best * d + j) * H + u];
            hid[static_cast<size_t>(u)] = 0.5 * z * (1 + std::erf(z / std::sqrt(2.0)));
          }
          for (int64_t j = 0; j < d; ++j) {
            double y = b2[best * d + j];
            for (int64_t u = 0; u < H; ++u) y += hid[static_cast<size_t>(u)] * w2[(best * H + u) * d + j];
            x[i * d + j] += prob[static_cast<size_t>(best)] * y;
          }
        }
      }
      double bal = 0;  // E * sum_e (load_e / (N k)) * mean_t p_te
      for (int64_t e = 0; e < E; ++e) bal += load[static_cast<size_t>(e)] / (static_cast<double>(N) * c.k) * mean_prob[static_cast<size_t>(e)];
      balance += E * bal / c.layers;
    }
    const Vec xf = rmsnorm(x, ref.t.at("norm.weight"), N, d, c.norm_eps);
    const Vec logits = matmul(xf, ref.t.at("lm_head.weight"), N, d, V);
    for (int64_t i = 0; i < N; ++i) {
      double mx = -1e300, sum = 0;
      for (int64_t j = 0; j < V; ++j) mx = std::max(mx, logits[i * V + j]);
      for (int64_t j = 0; j < V; ++j) sum += std::exp(logits[i * V + j] - mx);
      ce += mx + std::log(sum) - logits[i * V + targets[static_cast<size_t>(r)][static_cast<size_t>(i)]];
    }
  }
  return ce / static_cast<double>(total) + coef / W * balance;
}

// Sequences of random bytes; sequence s goes to rank s % W (the last ranks may hold none).
struct Batch {
  std::vector<std::vector<int>> tokens, targets;  // per rank
  std::vector<int> sequences;
};
Batch random_batch(uint64_t seed, int W, int sequences, int T) {
  Rng rng(seed);
  Batch b{std::vector<std::vector<int>>(static_cast<size_t>(W)), std::vector<std::vector<int>>(static_cast<size_t>(W)),
          std::vector<int>(static_cast<size_t>(W), 0)};
  for (int s = 0; s < sequences; ++s) {
    for (int t = 0; t < T; ++t) {
      b.tokens[static_cast<size_t>(s % W)].push_back(static_cast<int>(rng.uniform_int(0, 255)));
      b.targets[static_cast<size_t>(s % W)].push_back(static_cast<int>(rng.uniform_int(0, 255)));
    }
    ++b.sequences[static_cast<size_t>(s % W)];
  }
  return b;
}

TEST(LmTrain, GradientsMatchCentralDifferencesOfAFloat64Reference) {
  for_each_rank([](Communicator& world, uint64_t seed) {
    const int W = world.size(), R = world.rank(), T = 5;  // odd sizes; 3 sequences: 4 ranks leave one empty
    const double coef = 0.3;
    TrainableLM model(tiny_config(), world.shared_from_this(), dropless());
    model.init_parameters(seed);
    const Batch batch = random_batch(seed + 1, W, 3, T);
    model.zero_grad();
    const auto loss = model.forward_backward(batch.tokens[static_cast<size_t>(R)], batch.targets[static_cast<size_t>(R)],
                                             batch.sequences[static_cast<size_t>(R)], T, 3.0 * T, coef);
    model.all_reduce_gradients();
    Reference ref = reference_of(model);
    // The loss itself, against the reference.
    const double got = allreduce_scalar(world, loss.ce_sum) / (3.0 * T) + coef / W * allreduce_scalar(world, loss.balance);
    const double want = reference_loss(ref, batch.tokens, batch.targets, T, coef);
    EXPECT_NEAR(got, want, 1e-5 * std::abs(want)) << "loss on " << W << " ranks";
    Rng pick(seed + 2);
    const int L = model.local_experts(0);
    for (const TrainParam& p : model.parameters()) {
      const int64_t n = p.value.numel();
      double largest = 0;
      for (int64_t i = 0; i < n; ++i) largest = std::max(largest, std::abs(static_cast<double>(p.grad.data_as<float>()[i])));
      for (int trial = 0; trial < 3; ++trial) {
        // The first and last elements (edges of every loop), then one at random.
        int64_t i = trial == 0 ? 0 : trial == 1 ? n - 1 : pick.uniform_int(0, n - 1);
        if (p.name == "embed.weight") {  // a row the batch uses, so the gradient is not trivially zero
          const int64_t d = model.config().d_model;
          i = batch.tokens[0][static_cast<size_t>(trial)] * d + (trial == 0 ? 0 : trial == 1 ? d - 1 : i % d);
        }
        Vec& values = ref.t.at(p.name);
        const int64_t at = p.kind == ParamKind::expert ? R * L * (n / L) + i : i;  // this rank's slots in the stacked whole
        const double h = 1e-5, keep = values[static_cast<size_t>(at)];
        values[static_cast<size_t>(at)] = keep + h;
        const double up = reference_loss(ref, batch.tokens, batch.targets, T, coef);
        values[static_cast<size_t>(at)] = keep - h;
        const double down = reference_loss(ref, batch.tokens, batch.targets, T, coef);
        values[static_cast<size_t>(at)] = keep;
        const double fd = (up - down) / (2 * h), analytic = p.grad.data_as<float>()[i];
        EXPECT_NEAR(analytic, fd, 1e-3 * largest + 1e-3 * std::abs(fd) + 1e-7)
            << p.name << "[" << i << "] on rank " << R << " of " << W << " (largest |grad| " << largest << ")";
      }
    }
  }, Milliseconds(30000));
}

// Every plan the planner may pick (and the job's probe trains with) computes the same gradients.
TEST(LmTrain, EveryPlanGivesTheSameGradients) {
  for_each_rank([](Communicator& world, uint64_t seed) {
    const int W = world.size(), R = world.rank(), T = 6;
    const Batch batch = random_batch(seed + 1, W, 5, T);
    std::vector<std::vector<float>> reference;
    auto plan = [](int r, int d, ExchangeMode x) {
      ExecPlan p;
      p.r = r, p.d = d, p.exchange = x;
      return p;
    };
    for (const ExecPlan& p : {plan(1, 1, ExchangeMode::dropless), plan(1, 1, ExchangeMode::padded),
                              plan(1, 2, ExchangeMode::dropless), plan(1, 4, ExchangeMode::padded),
                              plan(0, 1, ExchangeMode::dropless), plan(0, 2, ExchangeMode::padded)}) {
      LmTrainOptions o = dropless();
      o.plan = p;
      TrainableLM model(tiny_config(), world.shared_from_this(), o);
      model.init_parameters(seed);
      model.zero_grad();
      model.forward_backward(batch.tokens[static_cast<size_t>(R)], batch.targets[static_cast<size_t>(R)],
                             batch.sequences[static_cast<size_t>(R)], T, 5.0 * T, 0.1);
      model.all_reduce_gradients();
      std::vector<std::vector<float>> grads;
      for (const TrainParam& t : model.parameters())
        grads.emplace_back(t.grad.data_as<float>(), t.grad.data_as<float>() + t.grad.numel());
      if (reference.empty()) {
        reference = grads;
        continue;
      }
      const auto params = model.parameters();
      for (size_t i = 0; i < grads.size(); ++i) {
        float largest = 0;
        for (float v : reference[i]) largest = std::max(largest, std::abs(v));
        for (size_t j = 0; j < grads[i].size(); ++j)
          ASSERT_NEAR(grads[i][j], reference[i][j], 1e-5f * largest + 1e-8f)
              << params[i].name << "[" << j << "] under " << p.describe() << " on rank " << R << " of " << W;
      }
    }
  }, Milliseconds(30000));
}

TEST(LmTrain, TrainingLowersTheLossOfTheSameBatch) {
  for_each_rank([](Communicator& world, uint64_t seed) {
    const int W = world.size(), R = world.rank(), T = 8;
    TrainableLM model(tiny_config(), world.shared_from_this(), dropless());
    model.init_parameters(seed);
    const Batch batch = random_batch(seed + 1, W, 4, T);
    AdamW adam;
    double first = 0, last = 0;
    for (int step = 0; step < 30; ++step) {
      model.zero_grad();
      const auto l = model.forward_backward(batch.tokens[static_cast<size_t>(R)], batch.targets[static_cast<size_t>(R)],
                                            batch.sequences[static_cast<size_t>(R)], T, 4.0 * T, 0.01);
      model.all_reduce_gradients();
      auto params = model.parameters();
      adam.step(params, 1e-2);
      const double mean = allreduce_scalar(world, l.ce_sum) / (4.0 * T);
      (step == 0 ? first : last) = mean;
    }
    EXPECT_LT(last, 0.5 * first) << "a batch of random bytes memorised in 30 AdamW steps: " << first << " -> " << last;
  }, Milliseconds(30000));
}

// A text of a few hundred bytes, so the tests need no corpus installed.
TextCorpus small_corpus(uint64_t seed) {
  Rng rng(seed);
  TextCorpus c;
  const char* words[] = {"the ", "cat ", "sat ", "on ", "a ", "mat ", "and ", "dog ", "ran\n"};
  for (int i = 0; i < 400; ++i) c.train += words[rng.uniform_int(0, 8)];
  for (int i = 0; i < 100; ++i) c.held_out += words[rng.uniform_int(0, 8)];
  return c;
}

LmTrainSchedule small_schedule() {
  LmTrainSchedule s;
  s.batch = 5;  // uneven over 2 and 4 ranks
  s.seq = 12;
  s.steps = 6;
  s.warmup = 2;
  s.lr = 5e-3;
  s.clip = 0.5;  // small enough to clip: the path resume must reproduce
  s.seed = 7;
  return s;
}

std::string test_dir(const std::string& name, Communicator& world, uint64_t seed) {
  const std::string dir = (fs::temp_directory_path() / ("switchyard-" + name + "-" + std::to_string(seed) + "-" +
                                                        std::to_string(world.size()))).string();
  if (world.rank() == 0) fs::remove_all(dir);
  world.barrier().wait();
  return dir;
}

std::vector<float> flat_parameters(TrainableLM& m) {
  std::vector<float> out;
  for (const TrainParam& p : m.parameters()) out.insert(out.end(), p.value.data_as<float>(), p.value.data_as<float>() + p.value.numel());
  return out;
}

TEST(LmTrain, ResumeEqualsAnUninterruptedRunBitForBit) {
  for_each_rank([](Communicator& world, uint64_t seed) {
    const TextCorpus corpus = small_corpus(seed);
    const std::string dir = test_dir("resume", world, seed);
    std::vector<double> straight, resumed;
    std::vector<float> straight_params;
    {
      TrainableLM model(tiny_config(), world.shared_from_this(), dropless());
      model.init_parameters(seed);
      LmTrainer trainer(model, corpus, small_schedule());
      for (int i = 0; i < 6; ++i) straight.push_back(trainer.step().loss);
      straight_params = flat_parameters(model);
      // Replicated tensors stay bit-identical on every rank (a hash of their bytes, gathered).
      std::string bytes;
      for (const TrainParam& p : model.parameters())
        if (p.kind != ParamKind::expert) bytes.append(static_cast<const char*>(p.value.data()), p.value.nbytes());
      const double mine = static_cast<double>(std::hash<std::string>{}(bytes) % (1ull << 50));
      std::vector<double> all(static_cast<size_t>(world.size()));
      world.allgather(TensorView(const_cast<double*>(&mine), DType::f64, {1}),
                      TensorView(all.data(), DType::f64, {world.size()})).wait();
      for (int r = 1; r < world.size(); ++r) EXPECT_EQ(all[static_cast<size_t>(r)], all[0]) << "replicated weights of rank " << r;
    }
    {
      TrainableLM model(tiny_config(), world.shared_from_this(), dropless());
      model.init_parameters(seed);
      LmTrainer trainer(model, corpus, small_schedule());
      for (int i = 0; i < 3; ++i) resumed.push_back(trainer.step().loss);
      trainer.save(dir);
    }
    {
      TrainableLM model(tiny_config(), world.shared_from_this(), dropless());
      model.init_parameters(seed + 99);  // other weights: the checkpoint must replace every one
      LmTrainer trainer(model, corpus, small_schedule());
      trainer.resume(dir);
      EXPECT_EQ(trainer.next_step(), 3);
      for (int i = 0; i < 3; ++i) resumed.push_back(trainer.step().loss);
      const std::vector<float> params = flat_parameters(model);
      ASSERT_EQ(params.size(), straight_params.size());
      EXPECT_EQ(0, std::memcmp(params.data(), straight_params.data(), params.size() * sizeof(float)))
          << "weights after a resumed run differ from an uninterrupted one";
    }
    for (size_t i = 0; i < straight.size(); ++i)
      EXPECT_EQ(straight[i], resumed[i]) << "step " << i << " on " << world.size() << " ranks";
    EXPECT_LT(straight.back(), straight.front());
  }, Milliseconds(30000));
}

// Saved on this world, loaded on one rank: the same model (the experts found
// in whichever shard holds them), and model/model.h's loader reads it too.
TEST(LmTrain, CheckpointLoadsAtAnotherWorldSizeAndIntoTheInferenceModel) {
  for_each_rank([](Communicator& world, uint64_t seed) {
    const TextCorpus corpus = small_corpus(seed);
    const std::string dir = test_dir("reshard", world, seed);
    TrainableLM model(tiny_config(), world.shared_from_this(), dropless());
    model.init_parameters(seed);
    LmTrainer trainer(model, corpus, small_schedule());
    for (int i = 0; i < 2; ++i) trainer.step();
    trainer.save(dir);
    std::vector<int> prompt;
    for (char ch : std::string("the cat sat")) prompt.push_back(static_cast<unsigned char>(ch));
    const int T = static_cast<int>(prompt.size());
    // Every rank computes the prompt's logits here (replicated rows, so each rank's view is whole).
    const Tensor here = model.logits(prompt, 1, T);
    auto one = ThreadsWorld(1).communicator(0);
    TrainableLM alone(tiny_config(), one, dropless());
    alone.init_parameters(seed + 5);
    load_lm_checkpoint(alone, nullptr, dir);
    const Tensor there = alone.logits(prompt, 1, T);
    ASSERT_EQ(here.numel(), there.numel());
    for (int64_t i = 0; i < here.numel(); ++i)
      ASSERT_NEAR(here.data_as<float>()[i], there.data_as<float>()[i], 1e-4) << "logit " << i;
    // The inference model (row-wise kernels) from the same directory: the last position's logits agree.
    Model inference(dir, world.shared_from_this());
    KVCache cache = inference.new_cache(32);
    const Tensor served = inference.forward({Chunk{&cache, prompt}});
    ASSERT_EQ(served.numel(), here.numel());
    for (int64_t i = 0; i < here.numel(); ++i)
      ASSERT_NEAR(here.data_as<float>()[i], served.data_as<float>()[i], 1e-4) << "inference logit " << i;
    // Greedy text from the checkpoint on this world and on one rank: the same bytes.
    auto greedy = [&](Model& m) {
      KVCache kv = m.new_cache(32);
      std::vector<int> out;
      Tensor l = m.forward({Chunk{&kv, prompt}});
      for (int i = 0; i < 12; ++i) {
        const float* last = l.data_as<float>() + (l.shape()[0] - 1) * l.shape()[1];
        out.push_back(static_cast<int>(std::max_element(last, last + l.shape()[1]) - last));
        l = m.forward({Chunk{&kv, {out.back()}}});
      }
      return out;
    };
    Model single(dir, one);
    EXPECT_EQ(greedy(inference), greedy(single)) << "greedy text from the checkpoint on " << world.size() << " ranks vs one";
  }, Milliseconds(30000));
}

TEST(LmTrain, AFailedSaveLeavesThePreviousGenerationAndTornShardsAreNamed) {
  for_each_rank([](Communicator& world, uint64_t seed) {
    const std::string dir = test_dir("ckpt", world, seed);
    const int R = world.rank(), W = world.size();
    Tensor mine = testing::random_tensor(seed + R, 3, 5);
    const std::string name = "t." + std::to_string(R);
    EXPECT_EQ(save_checkpoint(world, dir, {{name, mine.view()}}, {{"step", "1"}}), 1u);
    // Generation 2 fails on the last rank (a bad tensor name there, as a full disk would): every rank throws,
    // and the directory still holds generation 1, whole.
    Tensor other = testing::random_tensor(seed + 100 + R, 3, 5);
    try {
      save_checkpoint(world, dir, {{R == W - 1 ? "" : name, other.view()}}, {{"step", "2"}});
      ADD_FAILURE() << "a save that failed on rank " << W - 1 << " returned on rank " << R;
    } catch (const IoError& e) {
      EXPECT_NE(std::string(e.what()).find("rank " + std::to_string(W - 1) + " failed to write its shard"), std::string::npos)
          << e.what();
    }
    world.barrier().wait();
    {
      const Checkpoint c = Checkpoint::open(dir);
      EXPECT_EQ(c.generation(), 1u);
      EXPECT_EQ(c.meta("step"), "1");
      for (int r = 0; r < W; ++r) {
        const Tensor want = testing::random_tensor(seed + r, 3, 5), got = c.load_f32("t." + std::to_string(r), {3, 5});
        EXPECT_EQ(0, std::memcmp(want.data(), got.data(), want.nbytes())) << "tensor of rank " << r;
      }
    }
    // What a save killed after some ranks renamed their shards leaves: complete shards of generation 2, a
    // temporary file, and the old manifest. Readers still get generation 1, whole.
    if (R == 0) {
      std::ofstream(dir + "/g000002.rank0-of-" + std::to_string(W) + ".safetensors") << "complete but unlisted";
      std::ofstream(dir + "/g000002.rank1-of-" + std::to_string(W) + ".safetensors.tmp.1") << "half";
    }
    world.barrier().wait();
    EXPECT_EQ(Checkpoint::open(dir).generation(), 1u);
    // Another job saving into the directory (it holds the lock): every rank fails, naming it.
    auto expect_all_fail = [&](const std::string& part, const char* what) {
      try {
        save_checkpoint(world, dir, {{name, other.view()}}, {{"step", "2"}});
        ADD_FAILURE() << what << ": the save returned on rank " << R;
      } catch (const IoError& e) {
        EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << what << ": " << e.what();
      }
      world.barrier().wait();
      EXPECT_EQ(Checkpoint::open(dir).generation(), 1u) << what;
    };
    {
      int fd = -1;
      if (R == 0) {
        fd = ::open((dir + "/.lock").c_str(), O_RDWR | O_CREAT, 0644);
        ASSERT_EQ(::flock(fd, LOCK_EX | LOCK_NB), 0);
      }
      world.barrier().wait();
      expect_all_fail(R == 0 ? "another process is saving into this directory" : "rank 0 failed to start a new generation",
                      "a held lock");
      if (R == 0) ::close(fd);
    }
    // Rank 0 cannot publish the manifest (its temporary name is taken by a directory): every rank fails.
    if (R == 0) fs::create_directories(dir + "/manifest.json.tmp");
    world.barrier().wait();
    expect_all_fail("rank 0 failed to publish generation 2", "a manifest that cannot be written");
    if (R == 0) fs::remove_all(dir + "/manifest.json.tmp");
    world.barrier().wait();
    // A later save completes and removes generation 1 and the strays.
    EXPECT_EQ(save_checkpoint(world, dir, {{name, other.view()}}, {{"step", "2"}}), 2u);
    world.barrier().wait();
    if (R == 0) {
      int shards = 0;
      for (const auto& e : fs::directory_iterator(dir)) shards += e.path().filename().string().starts_with("g");
      EXPECT_EQ(shards, W) << "older generations and strays are removed once the new one is complete";
      EXPECT_EQ(Checkpoint::open(dir).generation(), 2u);
      // A torn shard, then a missing one: named.
      const std::string shard = dir + "/" + Checkpoint::open(dir).shards().back().file;
      fs::resize_file(shard, fs::file_size(shard) - 3);
      try {
        Checkpoint::open(dir);
        ADD_FAILURE() << "a torn shard loaded";
      } catch (const InvalidArgument& e) {
        EXPECT_NE(std::string(e.what()).find("is torn"), std::string::npos) << e.what();
      }
      fs::remove(shard);
      try {
        Checkpoint::open(dir);
        ADD_FAILURE() << "a missing shard loaded";
      } catch (const InvalidArgument& e) {
        EXPECT_NE(std::string(e.what()).find("is missing"), std::string::npos) << e.what();
      }
    }
    world.barrier().wait();
  }, Milliseconds(30000));
}

// The PyTorch model of examples/tiny_lm/tinylm.py (embeddings, RMSNorms,
// rotary attention and head in torch autograd; the MoE FFNs the same C++
// layer through switchyard.torch) against this model: one training step's
// gradients of the same weights and batch, every tensor, every element.
// tests/python/torch_lm_grads.py writes the file that
// SWITCHYARD_TORCH_GRADS names (CTest's train_torch_grads does both).
ModelConfig torch_grads_config() {  // tests/python/torch_lm_grads.py's CONFIG
  ModelConfig c = tiny_config();  // the script's: wider, more heads, a longer hidden layer
  c.name = "torch-grads";
  c.d_model = 32;
  c.heads = 4;
  c.max_seq = 16;
  c.hidden = 24;
  return c;
}

TEST(LmTrain, GradientsMatchThePyTorchModel) {
  const char* env = std::getenv("SWITCHYARD_TORCH_GRADS");
  if (env == nullptr || *env == '\0')
    GTEST_SKIP() << "SWITCHYARD_TORCH_GRADS is unset: no PyTorch gradients to compare with (CTest's "
                    "train_torch_grads writes them with tests/python/torch_lm_grads.py)";
  const std::string path = env;
  ASSERT_TRUE(fs::is_regular_file(path)) << "SWITCHYARD_TORCH_GRADS='" << path << "' is not a file";
  for_each_rank([&path](Communicator&, uint64_t) {
    // Every rank does the whole check on a world of its own: on one rank the
    // layer's slots are all the experts, as on the PyTorch side.
    auto one = ThreadsWorld(1).communicator(0);
    const SafetensorsFile file = SafetensorsFile::open(path);
    const ModelConfig config = torch_grads_config();
    const auto meta = [&](const std::string& key) {
      const auto it = file.metadata().find(key);
      if (it == file.metadata().end()) throw std::runtime_error(path + ": no metadata '" + key + "'");
      return it->second;
    };
    {  // the script's architecture is the one built here
      const nlohmann::json j = nlohmann::json::parse(meta("config"));
      const nlohmann::json& f = j.at("ffn");
      EXPECT_EQ(j.at("vocab_size").get<int>(), config.vocab_size);
      EXPECT_EQ(j.at("d_model").get<int>(), config.d_model);
      EXPECT_EQ(j.at("layers").get<int>(), config.layers);
      EXPECT_EQ(j.at("heads").get<int>(), config.heads);
      EXPECT_EQ(j.at("norm_eps").get<double>(), config.norm_eps);
      EXPECT_EQ(j.at("rope_theta").get<double>(), config.rope_theta);
      EXPECT_EQ(j.at("max_seq").get<int>(), config.max_seq);
      EXPECT_EQ(f.at("experts").get<int>(), config.experts);
      EXPECT_EQ(f.at("k").get<int>(), config.k);
      EXPECT_EQ(f.at("hidden").get<int64_t>(), config.hidden);
      EXPECT_EQ(f.at("activation").get<std::string>(), config.activation);
      EXPECT_EQ(f.at("gate").get<std::string>(), config.gate);
      EXPECT_EQ(f.at("renormalize").get<bool>(), config.renormalize);
    }
    const double coef = std::stod(meta("balance_coef"));
    ASSERT_NE(coef, 0.0) << "the balance loss must take part";
    ASSERT_EQ(file.entry("tokens").shape.size(), 2u);
    const int B = static_cast<int>(file.entry("tokens").shape[0]), T = static_cast<int>(file.entry("tokens").shape[1]);
    const Tensor tokens_t = file.load("tokens", {B, T}, DType::i32), targets_t = file.load("targets", {B, T}, DType::i32);
    const std::vector<int> tokens(tokens_t.data_as<int32_t>(), tokens_t.data_as<int32_t>() + B * T);
    const std::vector<int> targets(targets_t.data_as<int32_t>(), targets_t.data_as<int32_t>() + B * T);
    const double torch_loss = file.load("loss", {1}, DType::f32).data_as<float>()[0];

    TrainableLM model(config, one, dropless());
    ASSERT_EQ(model.local_experts(0), config.experts);
    // The file's weights (experts stacked [E, ...] in logical order) into the model's tensors.
    const auto copy_in = [&](const std::string& name, const TrainParam& p, const Tensor& dst) {
      const Tensor src = file.load(name, p.value.shape(), DType::f32);  // [L, ...] = [E, ...] on one rank
      if (p.kind != ParamKind::expert) {
        std::memcpy(dst.data(), src.data(), src.nbytes());
        return;
      }
      const int64_t per = src.numel() / config.experts;
      for (int s = 0; s < model.local_experts(p.layer); ++s)
        std::memcpy(dst.data_as<float>() + s * per, src.data_as<float>() + model.expert_at_slot(p.layer, s) * per,
                    static_cast<size_t>(per) * sizeof(float));
    };
    size_t names = 0;
    for (const TrainParam& p : model.parameters()) {
      copy_in(p.name, p, p.value);
      ++names;
    }
    size_t in_file = 0;
    for (const SafetensorsEntry& e : file.entries()) in_file += e.name.starts_with("grad.");
    ASSERT_EQ(in_file, names) << "the file's gradients vs the model's parameters";

    model.zero_grad();
    const auto loss = model.forward_backward(tokens, targets, B, T, static_cast<double>(B) * T, coef);
    model.all_reduce_gradients();  // one rank: nothing to sum
    const double got = loss.ce_sum / (static_cast<double>(B) * T) + coef * loss.balance;
    EXPECT_NEAR(got, torch_loss, 1e-5 * std::abs(torch_loss))
        << "loss (ce_sum " << loss.ce_sum << ", balance " << loss.balance << ") vs PyTorch's";
    if (std::getenv("SWITCHYARD_TORCH_GRADS_VERBOSE"))
      std::printf("loss %.7f here, %.7f in PyTorch: %.2e relative\n", got, torch_loss,
                  std::abs(got - torch_loss) / std::abs(torch_loss));

    for (const TrainParam& p : model.parameters()) {
      Tensor want = Tensor::zeros(p.grad.shape(), DType::f32);
      copy_in("grad." + p.name, p, want);
      const float* g = p.grad.data_as<float>();
      const float* w = want.data_as<float>();
      double largest = 0;
      for (int64_t i = 0; i < want.numel(); ++i) largest = std::max(largest, std::abs(static_cast<double>(w[i])));
      const double tolerance = 1e-4 * largest + 1e-6;
      int64_t worst = 0;
      double worst_err = -1;
      for (int64_t i = 0; i < want.numel(); ++i) {
        const double err = std::abs(static_cast<double>(g[i]) - w[i]);
        if (err > worst_err || std::isnan(err)) {  // a NaN is the worst and stays so
          worst_err = err;
          worst = i;
          if (std::isnan(err)) break;
        }
      }
      EXPECT_TRUE(worst_err <= tolerance)
          << p.name << ": worst element [" << worst << "] is " << g[worst] << " here, " << w[worst]
          << " in PyTorch (|diff| " << worst_err << ", tolerance " << tolerance << ", largest |PyTorch grad| "
          << largest << ")";
      if (std::getenv("SWITCHYARD_TORCH_GRADS_VERBOSE"))
        std::printf("%-28s max|grad| %.3e  worst |diff| %.3e = %.2e of max\n", p.name.c_str(), largest, worst_err,
                    largest > 0 ? worst_err / largest : 0.0);
    }
  }, Milliseconds(30000));
}

}  // namespace
}  // namespace switchyard
