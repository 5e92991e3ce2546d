// Splits `count` elements into `parts` contiguous chunks whose sizes differ by
// at most one (the first count % parts chunks are one larger).
#pragma once

#include <cstddef>

namespace switchyard::algorithms {

struct Chunk {
  size_t offset;
  size_t count;
};

inline Chunk ring_chunk(size_t count, int parts, int index) {
  const size_t p = static_cast<size_t>(parts), i = static_cast<size_t>(index);
  const size_t base = count / p, extra = count % p;
  return {i * base + (i < extra ? i : extra), base + (i < extra ? 1 : 0)};
}

inline int ring_mod(int value, int n) { return ((value % n) + n) % n; }

}  // namespace switchyard::algorithms
