#include "core/allocator.h"

#include <cstdlib>
#include <map>
#include <mutex>

#include "core/env.h"
#include "core/error.h"

namespace switchyard {
namespace {

constexpr size_t kCachedFrom = size_t{1} << 20;
// Large blocks are rounded up to 2 MiB so that batches whose sizes wobble a
// little (dropless routing) still hit the cache.
constexpr size_t kLargeGranule = size_t{2} << 20;

struct HostCache {
  std::mutex mutex;
  std::multimap<size_t, void*> free_blocks;  // size -> block
  uint64_t cached = 0, hits = 0, misses = 0;
  uint64_t limit = 0;
  HostCache() : limit(static_cast<uint64_t>(env().host_cache_bytes)) {}
};

HostCache& cache() {
  static HostCache* c = new HostCache();  // blocks may be freed during static teardown
  return *c;
}

void give_back(void* block, size_t size) {
  HostCache& c = cache();
  {
    std::lock_guard lock(c.mutex);
    if (c.cached + size <= c.limit) {
      c.free_blocks.emplace(size, block);
      c.cached += size;
      return;
    }
  }
  std::free(block);
}

}  // namespace

std::shared_ptr<void> allocate_host(size_t bytes) {
  if (bytes < kCachedFrom) {
    // aligned_alloc wants a size that is a multiple of the alignment; never 0.
    const size_t rounded = (bytes + kHostAlignment - 1) / kHostAlignment * kHostAlignment;
    void* p = std::aligned_alloc(kHostAlignment, rounded ? rounded : kHostAlignment);
    if (!p) SY_THROW(Error, "out of host memory allocating ", bytes, " bytes");
    return std::shared_ptr<void>(p, [](void* q) { std::free(q); });
  }
  const size_t size = (bytes + kLargeGranule - 1) / kLargeGranule * kLargeGranule;
  HostCache& c = cache();
  void* block = nullptr;
  {
    std::lock_guard lock(c.mutex);
    auto it = c.free_blocks.find(size);
    if (it != c.free_blocks.end()) {
      block = it->second;
      c.free_blocks.erase(it);
      c.cached -= size;
      ++c.hits;
    } else {
      ++c.misses;
    }
  }
  if (!block) {
    block = std::aligned_alloc(kHostAlignment, size);
    if (!block) {
      release_host_cache();  // memory held for reuse is better spent now
      block = std::aligned_alloc(kHostAlignment, size);
    }
    if (!block) SY_THROW(Error, "out of host memory allocating ", bytes, " bytes");
  }
  return std::shared_ptr<void>(block, [size](void* q) { give_back(q, size); });
}

HostCacheStats host_cache_stats() {
  HostCache& c = cache();
  std::lock_guard lock(c.mutex);
  return {c.hits, c.misses, c.cached};
}

void release_host_cache() {
  HostCache& c = cache();
  std::multimap<size_t, void*> blocks;
  {
    std::lock_guard lock(c.mutex);
    blocks.swap(c.free_blocks);
    c.cached = 0;
  }
  for (auto& [size, block] : blocks) std::free(block);
}

}  // namespace switchyard
