#include "kernels/router.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace switchyard::kernels::cpu {
namespace {

// Index of the largest value among those allowed, ties to the lower index; -1 if none.
int argmax_allowed(const float* v, const uint8_t* allowed, int n) {
  int best = -1;
  for (int i = 0; i < n; ++i)
    if (allowed[i] && (best < 0 || v[i] > v[best])) best = i;
  return best;
}

}  // namespace

void topk_gate(const TopKGateArgs& a) {
  const int E = a.experts;
  const int group_size = E / a.groups;
  std::vector<float> score(static_cast<size_t>(E)), select(static_cast<size_t>(E)), group_score(static_cast<size_t>(a.groups));
  std::vector<uint8_t> allowed(static_cast<size_t>(E)), group_allowed(static_cast<size_t>(a.groups));
  for (int64_t t = 0; t < a.tokens; ++t) {
    const float* x = a.logits + t * E;
    if (a.score == GateScore::softmax) {
      float m = -std::numeric_limits<float>::infinity();
      for (int e = 0; e < E; ++e) m = std::max(m, x[e]);
      float sum = 0.f;
      for (int e = 0; e < E; ++e) sum += score[e] = std::exp(x[e] - m);
      const float inv = 1.f / sum;
      for (int e = 0; e < E; ++e) select[e] = score[e] *= inv;
    } else {
      for (int e = 0; e < E; ++e) {
        score[e] = 1.f / (1.f + std::exp(-x[e]));
        select[e] = score[e] + (a.bias ? a.bias[e] : 0.f);
      }
    }
    if (a.scores_out) std::copy(score.begin(), score.end(), a.scores_out + t * E);

    std::fill(allowed.begin(), allowed.end(), uint8_t{1});
    if (a.groups > 1) {
      for (int g = 0; g < a.groups; ++g) {
        const float* s = select.data() + g * group_size;
        float first = -std::numeric_limits<float>::infinity(), second = first;
        for (int i = 0; i < group_size; ++i) {
          if (s[i] > first) second = first, first = s[i];
          else if (s[i] > second) second = s[i];
        }
        group_score[g] = group_size > 1 ? first + second : first;
      }
      std::fill(group_allowed.begin(), group_allowed.end(), uint8_t{1});
      std::vector<uint8_t> chosen(static_cast<size_t>(a.groups), 0);
      for (int j = 0; j < a.topk_groups; ++j) {
        const int g = argmax_allowed(group_score.data(), group_allowed.data(), a.groups);
        chosen[g] = 1;
        group_allowed[g] = 0;
      }
      for (int e = 0; e < E; ++e) allowed[e] = chosen[e / group_size];
    }

    int32_t* idx = a.experts_out + t * a.k;
    float* w = a.weights_out + t * a.k;
    float total = 0.f;
    for (int j = 0; j < a.k; ++j) {
      const int e = argmax_allowed(select.data(), allowed.data(), E);
      allowed[e] = 0;
      idx[j] = e;
      w[j] = score[e];
      total += w[j];
    }
    if (a.renormalize && total > 0.f)
      for (int j = 0; j < a.k; ++j) w[j] /= total;
  }
}

}  // namespace switchyard::kernels::cpu
