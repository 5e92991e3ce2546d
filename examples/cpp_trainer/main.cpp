// A small MoE regression model trained with plain SGD, as a trainer embeds
// Switchyard: two ranks (threads of this process), experts split between
// them, each rank feeding its half of every batch. The target is a fixed
// random teacher; the loss must fall.
#include <cmath>
#include <cstdio>
#include <vector>

#include "comm/backends/threads/threads_backend.h"
#include "core/rng.h"
#include "moe/moe_layer.h"

using namespace switchyard;

int main() {
  constexpr int kRanks = 2, kSteps = 80;
  constexpr int64_t kTokens = 256, M = 32, H = 64;
  // The global data: x and the teacher's targets tanh(x A), the same on every rank.
  Rng data(2024);
  Tensor x = Tensor::empty({kTokens, M}, DType::f32), a = Tensor::empty({M, M}, DType::f32);
  data.fill_normal(x, 0.0, 1.0);
  data.fill_normal(a, 0.0, 1.0 / std::sqrt(double(M)));
  std::vector<float> target(static_cast<size_t>(kTokens * M));
  for (int64_t t = 0; t < kTokens; ++t)
    for (int64_t j = 0; j < M; ++j) {
      double s = 0;
      for (int64_t i = 0; i < M; ++i) s += x.data_as<float>()[t * M + i] * a.data_as<float>()[i * M + j];
      target[static_cast<size_t>(t * M + j)] = static_cast<float>(std::tanh(s));
    }

  std::vector<double> losses(kSteps);
  run_thread_ranks(kRanks, [&](Communicator& world) {
    MoEConfig config;
    config.model_dim = M;
    config.hidden_dim = H;
    config.activation = kernels::Activation::gelu;
    config.router.experts = 4;
    config.router.k = 2;
    config.router.capacity_factor = 0.0;  // dropless
    config.plan.exchange = ExchangeMode::dropless;
    MoELayer layer(config, world.shared_from_this());
    layer.init_parameters(7);
    const int64_t per = kTokens / kRanks, first = world.rank() * per;
    const TensorView mine = x.view().slice(first, first + per);
    for (int step = 0; step < kSteps; ++step) {
      layer.zero_grad();
      MoEForward f = layer.forward(mine);
      Tensor dout = Tensor::empty({per, M}, DType::f32);
      double local = 0;
      for (int64_t i = 0; i < per * M; ++i) {
        const float diff = f.output.data_as<float>()[i] - target[static_cast<size_t>(first * M + i)];
        local += double(diff) * diff;
        dout.data_as<float>()[i] = 2.f * diff / float(kTokens * M);  // d(mean squared error)
      }
      const double loss = allreduce_scalar(world, local) / double(kTokens * M);
      layer.backward(dout, 0.01);
      layer.sgd_step(10.0);  // the loss is a mean over all kTokens * M elements: its gradients are small
      if (world.rank() == 0) {
        losses[static_cast<size_t>(step)] = loss;
        if (step % 10 == 0 || step == kSteps - 1) std::printf("step %3d  mse %.5f\n", step, loss);
      }
    }
  });
  const bool fell = losses.back() < 0.5 * losses.front();
  std::printf("%s: mse %.5f -> %.5f over %d steps on %d ranks\n", fell ? "trainer ok" : "trainer FAILED",
              losses.front(), losses.back(), kSteps, kRanks);
  return fell ? 0 : 1;
}
