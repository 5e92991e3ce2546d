#include "moe/buffer_pool.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "core/allocator.h"

namespace switchyard {

BufferPool::BufferPool(int kinds, bool poison, std::shared_ptr<DeviceMemory> memory)
    : state_(std::make_shared<State>()), poison_(poison), memory_(std::move(memory)) {
  state_->free.resize(static_cast<size_t>(kinds));
}

Tensor BufferPool::acquire(int kind, Shape shape, DType dtype) {
  const size_t bytes = static_cast<size_t>(shape_numel(shape)) * dtype_size(dtype);
  Block block{nullptr, nullptr, 0};
  {
    std::lock_guard lock(state_->mutex);
    auto& list = state_->free.at(static_cast<size_t>(kind));
    auto best = list.end();
    for (auto it = list.begin(); it != list.end(); ++it)
      if (it->capacity >= bytes && (best == list.end() || it->capacity < best->capacity)) best = it;
    if (best != list.end()) {
      block = std::move(*best);
      list.erase(best);
    } else if (!list.empty()) {
      // The batches outgrew this kind's blocks: the largest free one that is
      // too small goes back to the host, the new larger one takes its place
      // (one at a time, so sets of other batches in flight keep theirs).
      auto largest = std::max_element(list.begin(), list.end(),
                                      [](const Block& a, const Block& b) { return a.capacity < b.capacity; });
      list.erase(largest);
    }
  }
  if (!block.storage) {
    block.capacity = bytes + bytes / 8;  // headroom for the next batch's routing
    if (memory_) {
      Tensor t = memory_->allocate({static_cast<int64_t>(std::max<size_t>(block.capacity, 1))}, DType::u8);
      block.storage = t.storage();
      block.data = t.data();
    } else {
      block.storage = allocate_host(block.capacity);
      block.data = block.storage.get();
    }
  }
  void* data = block.data;
  if (poison_ && bytes) {
    if (memory_) {
      const std::vector<unsigned char> nan_bytes(bytes, 0xFF);
      memory_->from_host(data, nan_bytes.data(), static_cast<int64_t>(bytes));
    } else {
      std::memset(data, 0xFF, bytes);
    }
  }
  // The owner hands the block back to this kind's free list.
  std::shared_ptr<void> owner(data, [state = state_, kind, block](void*) mutable {
    std::lock_guard lock(state->mutex);
    state->free[static_cast<size_t>(kind)].push_back(std::move(block));
  });
  return Tensor::adopt(TensorView(data, dtype, std::move(shape), memory_ ? memory_->device() : Device::cpu()),
                       std::move(owner));
}

size_t BufferPool::free_bytes() const {
  std::lock_guard lock(state_->mutex);
  size_t n = 0;
  for (const auto& list : state_->free)
    for (const auto& b : list) n += b.capacity;
  return n;
}

}  // namespace switchyard
