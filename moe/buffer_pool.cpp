#include "moe/buffer_pool.h"

#include <algorithm>
#include <cstring>

#include "core/allocator.h"

namespace switchyard {

BufferPool::BufferPool(int kinds, bool poison) : state_(std::make_shared<State>()), poison_(poison) {
  state_->free.resize(static_cast<size_t>(kinds));
}

Tensor BufferPool::acquire(int kind, Shape shape, DType dtype) {
  const size_t bytes = static_cast<size_t>(shape_numel(shape)) * dtype_size(dtype);
  Block block{nullptr, 0};
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
    block.storage = allocate_host(block.capacity);
  }
  void* data = block.storage.get();
  if (poison_ && bytes) std::memset(data, 0xFF, bytes);
  // The owner hands the block back to this kind's free list.
  std::shared_ptr<void> owner(data, [state = state_, kind, block](void*) mutable {
    std::lock_guard lock(state->mutex);
    state->free[static_cast<size_t>(kind)].push_back(std::move(block));
  });
  return Tensor::adopt(TensorView(data, dtype, std::move(shape)), std::move(owner));
}

size_t BufferPool::free_bytes() const {
  std::lock_guard lock(state_->mutex);
  size_t n = 0;
  for (const auto& list : state_->free)
    for (const auto& b : list) n += b.capacity;
  return n;
}

}  // namespace switchyard
