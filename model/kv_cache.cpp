#include "model/kv_cache.h"

#include <algorithm>
#include <cstring>

#include "core/error.h"
#include "model/model_config.h"

namespace switchyard {

LayerKV::LayerKV(int width, int capacity)
    : width_(width), capacity_(capacity), k_(static_cast<size_t>(width) * capacity), v_(k_.size()) {
  if (capacity < 0) SY_THROW(InvalidArgument, "kv cache: capacity ", capacity, ", expected >= 0");
}

void LayerKV::write(int position, const float* key, const float* value) {
  if (position < 0 || position >= capacity_)
    SY_THROW(InvalidArgument, "kv cache: position ", position, " is outside its capacity ", capacity_);
  for (int j = 0; j < width_; ++j) key_dim(j)[position] = key[j];
  std::memcpy(values(position), value, static_cast<size_t>(width_) * sizeof(float));
}

void LayerKV::advance(int n) {
  if (n < 0 || length_ + n > capacity_)
    SY_THROW(InvalidArgument, "kv cache: ", length_, " + ", n, " positions exceed its capacity ", capacity_);
  length_ += n;
}

void LayerKV::crop(int length) {
  if (length < 0 || length > length_)
    SY_THROW(InvalidArgument, "kv cache: crop to ", length, ", expected 0..", length_, " (its length)");
  length_ = length;
}

KVCache::KVCache(const ModelConfig& config, int capacity) : KVCache(config, capacity, [&] {
  std::vector<int> all(static_cast<size_t>(config.layers));
  for (int l = 0; l < config.layers; ++l) all[static_cast<size_t>(l)] = l;
  return all;
}()) {}

KVCache::KVCache(const ModelConfig& config, int capacity, const std::vector<int>& owned, int width)
    : layers_(config.layers), width_(width > 0 ? width : config.d_model), capacity_(capacity), owned_(owned),
      index_(static_cast<size_t>(config.layers), -1) {
  std::sort(owned_.begin(), owned_.end());
  for (int l : owned_) {
    if (l < 0 || l >= layers_)
      SY_THROW(InvalidArgument, "kv cache: owned layer ", l, ", expected 0..", layers_ - 1);
    if (index_[static_cast<size_t>(l)] >= 0) SY_THROW(InvalidArgument, "kv cache: layer ", l, " listed twice");
    index_[static_cast<size_t>(l)] = static_cast<int>(kv_.size());
    kv_.emplace_back(width_, capacity);
  }
}

int KVCache::length() const {
  int n = capacity_;
  for (const LayerKV& kv : kv_) n = std::min(n, kv.length());
  return kv_.empty() ? 0 : n;
}

LayerKV& KVCache::layer(int l) {
  if (!owns(l)) SY_THROW(InvalidArgument, "kv cache: layer ", l, " is not one this cache holds");
  return kv_[static_cast<size_t>(index_[static_cast<size_t>(l)])];
}

const LayerKV& KVCache::layer(int l) const { return const_cast<KVCache*>(this)->layer(l); }

void KVCache::crop(int length) {
  if (length < 0 || length > this->length())
    SY_THROW(InvalidArgument, "kv cache: crop to ", length, ", expected 0..", this->length(), " (its length)");
  for (LayerKV& kv : kv_) kv.crop(length);
}

void KVCache::advance(int n) {
  for (LayerKV& kv : kv_) kv.advance(n);
}

bool KVCache::fits(const ModelConfig& c, int width) const {
  return layers_ == c.layers && width_ == (width > 0 ? width : c.d_model);
}

double KVCache::bytes(int positions) const {
  return 2.0 * static_cast<double>(kv_.size()) * positions * width_ * sizeof(float);
}

}  // namespace switchyard
