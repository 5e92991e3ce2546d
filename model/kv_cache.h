// Keys and values of the decoder's attention layers.
//
// LayerKV is one layer's cache of one sequence, positions [0, length), with a
// length of its own: a layer-parallel schedule (EasySpec's draft groups)
// fills layers at different times, and a rank may own the KV of only some
// layers. KVCache is a sequence's cache on one rank: a view over the layers
// that rank owns.
#pragma once

#include <cstddef>
#include <vector>

namespace switchyard {

struct ModelConfig;

// Keys are stored transposed, [dim][position], so a query's scores over all
// positions are one vectorised pass per dimension; values are [position][dim].
class LayerKV {
 public:
  LayerKV(int width, int capacity);
  int length() const { return length_; }
  int capacity() const { return capacity_; }
  int width() const { return width_; }
  // Key dimension `dim` of every position (contiguous over positions).
  float* key_dim(int dim) { return k_.data() + static_cast<size_t>(dim) * capacity_; }
  const float* key_dim(int dim) const { return k_.data() + static_cast<size_t>(dim) * capacity_; }
  float* values(int position) { return v_.data() + static_cast<size_t>(position) * width_; }
  const float* values(int position) const { return v_.data() + static_cast<size_t>(position) * width_; }
  // Writes position `position` (at or beyond length: advance() makes it count).
  void write(int position, const float* key, const float* value);
  void advance(int n);   // n more positions hold data
  void crop(int length); // forget positions >= length (rejected speculative tokens)

 private:
  int width_, capacity_, length_ = 0;
  std::vector<float> k_, v_;
};

class KVCache {
 public:
  // Every layer of the model.
  KVCache(const ModelConfig& config, int capacity);
  // Only `owned` layers (others are refused by layer()), `width` floats per
  // position and layer (0: d_model; a tensor-parallel rank keeps only its
  // heads' keys and values).
  KVCache(const ModelConfig& config, int capacity, const std::vector<int>& owned, int width = 0);

  // Positions every owned layer holds (the least of their lengths).
  int length() const;
  int capacity() const { return capacity_; }
  bool owns(int layer) const {
    return layer >= 0 && layer < static_cast<int>(index_.size()) && index_[static_cast<size_t>(layer)] >= 0;
  }
  LayerKV& layer(int layer);
  const LayerKV& layer(int layer) const;
  const std::vector<int>& owned_layers() const { return owned_; }
  // Every owned layer at once.
  void crop(int length);
  void advance(int n);
  KVCache copy() const { return *this; }
  // Same layer count as `config` and `width` floats per position (0: d_model).
  bool fits(const ModelConfig& config, int width = 0) const;
  int width() const { return width_; }
  // Bytes this cache holds for `positions` positions over its owned layers.
  double bytes(int positions) const;

 private:
  int layers_, width_, capacity_;
  std::vector<int> owned_;
  std::vector<int> index_;  // [model layer] -> index into kv_, -1 when not owned
  std::vector<LayerKV> kv_;
};

}  // namespace switchyard
