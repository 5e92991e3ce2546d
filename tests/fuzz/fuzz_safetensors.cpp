// Safetensors files (weights, checkpoints' shards, traces): the header, then every tensor.
#include <memory>
#include <vector>

#include "core/safetensors.h"
#include "tests/fuzz/harness.h"

SWITCHYARD_FUZZ_HARNESS({
  auto bytes = std::make_shared<const std::vector<uint8_t>>(data, data + size);
  const switchyard::SafetensorsFile f = switchyard::SafetensorsFile::parse(bytes, "fuzz.safetensors");
  for (const auto& e : f.entries()) (void)f.load(e.name);
})
