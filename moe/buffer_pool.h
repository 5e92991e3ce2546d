// Per-layer buffers that many batches in flight can hold at once. A fresh
// 100 MB tensor per phase costs page faults inside the GEMMs that first touch
// it, so storage is reused from batch to batch: a buffer goes back to its
// kind's free list when the last tensor that refers to it is gone (a batch
// handle released, a phase's temporaries dropped), and the next batch takes
// the smallest free block that fits. With one batch at a time this is the
// same set of blocks every step; with M in flight, M sets.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "core/device_memory.h"
#include "core/tensor.h"

namespace switchyard {

class BufferPool {
 public:
  // kinds: how many kinds of buffer (free lists); a block is reused only by
  // its own kind, whose sizes follow the batch. poison: fill every buffer
  // handed out with NaN bytes (0xFF: a NaN in f32 and bf16, -1 in integers),
  // so a read before a write shows (tests; SWITCHYARD_POISON_BUFFERS).
  // memory: where the blocks live; null: host memory.
  BufferPool(int kinds, bool poison, std::shared_ptr<DeviceMemory> memory = nullptr);
  Tensor acquire(int kind, Shape shape, DType dtype);
  // Bytes held in free lists (not handed out).
  size_t free_bytes() const;
  bool poisons() const { return poison_; }

 private:
  struct Block {
    std::shared_ptr<void> storage;
    void* data;  // the block's address in its memory
    size_t capacity;
  };
  struct State {
    std::mutex mutex;
    std::vector<std::vector<Block>> free;  // per kind
  };
  std::shared_ptr<State> state_;  // shared with the handed-out tensors' owners
  bool poison_;
  std::shared_ptr<DeviceMemory> memory_;
};

}  // namespace switchyard
