// Host memory for tensors: 64-byte aligned (cache line, AVX-512). Blocks of
// 1 MiB and more are kept in a size-bucketed cache when freed and handed out
// again: glibc returns such blocks to the kernel, and touching fresh pages
// costs a fault and a zeroing per 4 KiB (for a 64 MiB activation, tens of ms
// per step). The cache holds at most SWITCHYARD_HOST_CACHE_BYTES (default 4 GiB).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

namespace switchyard {

inline constexpr size_t kHostAlignment = 64;

std::shared_ptr<void> allocate_host(size_t bytes);

struct HostCacheStats {
  uint64_t hits = 0;        // large allocations served from the cache
  uint64_t misses = 0;      // large allocations that went to the system
  uint64_t cached_bytes = 0;
};
HostCacheStats host_cache_stats();
// Returns every cached block to the system.
void release_host_cache();

}  // namespace switchyard
