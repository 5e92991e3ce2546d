#include "moe/routing_trace.h"

#include <algorithm>
#include <charconv>
#include <cmath>

#include "core/error.h"

namespace switchyard {
namespace {

// A metadata integer in [lo, hi]; the fallback when absent.
int metadata_int(const SafetensorsFile& f, const std::string& key, int fallback, int lo, int hi) {
  const auto it = f.metadata().find(key);
  if (it == f.metadata().end()) return fallback;
  int v = 0;
  const std::string& text = it->second;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || end != text.data() + text.size() || v < lo || v > hi)
    SY_THROW(InvalidArgument, "trace ", f.path(), ": metadata ", key, " = '", text.substr(0, 40), "', expected an integer ",
             lo, "..", hi);
  return v;
}

std::vector<int32_t> i32_vector(const SafetensorsFile& f, const std::string& name, int64_t n) {
  const Tensor t = f.load(name);
  if (t.dtype() != DType::i32 || t.shape() != Shape{n})
    SY_THROW(InvalidArgument, "trace ", f.path(), ": ", name, " is ", dtype_name(t.dtype()), " ", shape_string(t.shape()),
             ", expected i32 [", n, "]");
  const int32_t* p = t.data_as<int32_t>();
  return std::vector<int32_t>(p, p + n);
}

}  // namespace

RoutingTrace RoutingTrace::load(const std::string& path) { return load(SafetensorsFile::open(path)); }

RoutingTrace RoutingTrace::load(const SafetensorsFile& f) {
  const std::string& path = f.path();
  RoutingTrace t;
  t.path = path;
  const auto model = f.metadata().find("model");
  t.model = model == f.metadata().end() ? "?" : model->second;
  if (const auto fmt = f.metadata().find("format"); fmt != f.metadata().end() && fmt->second != "switchyard-routing-trace-v1")
    SY_THROW(InvalidArgument, "trace ", path, ": format '", fmt->second, "', expected switchyard-routing-trace-v1");
  const Tensor tokens = f.load("tokens");
  if (tokens.dtype() != DType::i32 || tokens.shape().size() != 1)
    SY_THROW(InvalidArgument, "trace ", path, ": tokens is ", dtype_name(tokens.dtype()), " ", shape_string(tokens.shape()),
             ", expected i32 [N]");
  const int64_t N = tokens.shape()[0];
  if (N < 1) SY_THROW(InvalidArgument, "trace ", path, ": tokens is empty; expected at least one routed token");
  t.tokens.assign(tokens.data_as<int32_t>(), tokens.data_as<int32_t>() + N);
  for (int64_t i = 0; i < N; ++i)
    if (t.tokens[static_cast<size_t>(i)] < 0 || t.tokens[static_cast<size_t>(i)] >= kMaxVocab)
      SY_THROW(InvalidArgument, "trace ", path, ": tokens[", i, "] = ", t.tokens[static_cast<size_t>(i)], ", expected 0..",
               kMaxVocab - 1);
  if (f.contains("positions")) {
    t.positions = i32_vector(f, "positions", N);
  } else {
    t.positions.resize(static_cast<size_t>(N));
    for (int64_t i = 0; i < N; ++i) t.positions[static_cast<size_t>(i)] = static_cast<int32_t>(i);
  }
  if (f.contains("sequences")) {
    t.has_documents = true;
    t.sequences = i32_vector(f, "sequences", N);
    for (int64_t i = 1; i < N; ++i)
      if (t.sequences[static_cast<size_t>(i)] < t.sequences[static_cast<size_t>(i - 1)])
        SY_THROW(InvalidArgument, "trace ", path, ": sequences[", i, "] = ", t.sequences[static_cast<size_t>(i)],
                 " after ", t.sequences[static_cast<size_t>(i - 1)], ", expected ascending document ids");
  } else {  // windows: a new one wherever the position does not grow
    t.sequences.resize(static_cast<size_t>(N));
    int32_t seq = 0;
    for (int64_t i = 0; i < N; ++i) {
      if (i > 0 && t.positions[static_cast<size_t>(i)] <= t.positions[static_cast<size_t>(i - 1)]) ++seq;
      t.sequences[static_cast<size_t>(i)] = seq;
    }
  }
  while (f.contains("layer" + std::to_string(t.layers) + ".experts")) ++t.layers;
  if (t.layers == 0) SY_THROW(InvalidArgument, "trace ", path, ": no layer0.experts tensor");
  if (metadata_int(f, "layers", t.layers, 1, 1 << 16) != t.layers)
    SY_THROW(InvalidArgument, "trace ", path, ": metadata layers = ", f.metadata().at("layers"), " but the file holds ",
             t.layers, " layer tensors (layer0.experts .. layer", t.layers - 1, ".experts)");
  const Tensor first = f.load("layer0.experts");
  if (first.shape().size() != 2 || first.shape()[1] < 1 || first.shape()[1] > 64)
    SY_THROW(InvalidArgument, "trace ", path, ": layer0.experts is ", shape_string(first.shape()),
             ", expected [tokens, k] with k in 1..64");
  t.k = static_cast<int>(first.shape()[1]);
  if (metadata_int(f, "k", t.k, 1, 64) != t.k)
    SY_THROW(InvalidArgument, "trace ", path, ": metadata k = ", f.metadata().at("k"), " but layer0.experts is ",
             shape_string(first.shape()), " (k = ", t.k, ")");
  int max_expert = 0;
  for (int l = 0; l < t.layers; ++l) {
    const std::string name = "layer" + std::to_string(l);
    const Tensor e = f.load(name + ".experts", {N, t.k}, DType::i32);
    const int32_t* p = e.data_as<int32_t>();
    for (int64_t i = 0; i < N * t.k; ++i) {
      if (p[i] < 0) SY_THROW(InvalidArgument, "trace ", path, ": ", name, ".experts holds ", p[i], ", expected >= 0");
      max_expert = std::max(max_expert, p[i]);
    }
    t.choices.emplace_back(p, p + N * t.k);
    if (f.contains(name + ".weights")) {
      const Tensor w = f.load(name + ".weights", {N, t.k}, DType::f32);
      const float* q = w.data_as<float>();
      for (int64_t i = 0; i < N * t.k; ++i)
        if (!std::isfinite(q[i]) || q[i] < 0)
          SY_THROW(InvalidArgument, "trace ", path, ": ", name, ".weights[", i / t.k, ", ", i % t.k, "] = ", q[i],
                   ", expected a finite gate weight >= 0");
      t.weights.emplace_back(q, q + N * t.k);
    } else {
      t.weights.emplace_back();
    }
  }
  // More experts than any choice names only widens per-expert arrays; bounded like the ids themselves.
  if (max_expert >= kMaxExperts)
    SY_THROW(InvalidArgument, "trace ", path, ": expert id ", max_expert, ", expected below ", kMaxExperts);
  t.experts = metadata_int(f, "experts", max_expert + 1, max_expert + 1, kMaxExperts);
  // Each layer keeps a count per expert: bounded in all, so a small file cannot claim gigabytes.
  if (static_cast<int64_t>(t.experts) * t.layers > (int64_t{1} << 22))
    SY_THROW(InvalidArgument, "trace ", path, ": ", t.layers, " layers x ", t.experts, " experts, expected at most ",
             int64_t{1} << 22, " in all");
  int32_t max_token = 0;
  for (int32_t id : t.tokens) max_token = std::max(max_token, id);
  if ((static_cast<int64_t>(max_token) + 1) * t.experts * t.layers > kMaxTableEntries)
    SY_THROW(InvalidArgument, "trace ", path, ": token ids up to ", max_token, " x ", t.experts, " experts x ", t.layers,
             " layers need ", (static_cast<int64_t>(max_token) + 1) * t.experts * t.layers,
             " table entries, expected at most ", kMaxTableEntries, " (the affinity tables are dense per token id)");
  return t;
}

void RoutingTrace::save(const std::string& out, const std::map<std::string, std::string>& extra_metadata) const {
  const int64_t N = size();
  auto view = [](const auto& v, Shape shape, DType dtype) {
    return TensorView(const_cast<void*>(static_cast<const void*>(v.data())), dtype, std::move(shape));
  };
  std::vector<std::pair<std::string, TensorView>> tensors = {{"tokens", view(tokens, {N}, DType::i32)},
                                                             {"positions", view(positions, {N}, DType::i32)},
                                                             {"sequences", view(sequences, {N}, DType::i32)}};
  for (int l = 0; l < layers; ++l) {
    const std::string name = "layer" + std::to_string(l);
    tensors.emplace_back(name + ".experts", view(choices[static_cast<size_t>(l)], {N, k}, DType::i32));
    if (!weights[static_cast<size_t>(l)].empty())
      tensors.emplace_back(name + ".weights", view(weights[static_cast<size_t>(l)], {N, k}, DType::f32));
  }
  std::map<std::string, std::string> metadata = extra_metadata;
  metadata["format"] = "switchyard-routing-trace-v1";
  metadata["model"] = model;
  metadata["layers"] = std::to_string(layers);
  metadata["k"] = std::to_string(k);
  metadata["experts"] = std::to_string(experts);
  save_safetensors(out, tensors, metadata);
}

}  // namespace switchyard
