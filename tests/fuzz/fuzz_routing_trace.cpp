// Routing traces (switchyard-routing-trace-v1): parsed, checked and summarised as `trace stats` does.
#include <memory>
#include <vector>

#include "core/safetensors.h"
#include "launch/trace_stats.h"
#include "tests/fuzz/harness.h"

SWITCHYARD_FUZZ_HARNESS({
  auto bytes = std::make_shared<const std::vector<uint8_t>>(data, data + size);
  const auto stats = switchyard::trace_stats(switchyard::SafetensorsFile::parse(bytes, "fuzz-trace"));
  (void)switchyard::format_trace_stats(stats);
})
