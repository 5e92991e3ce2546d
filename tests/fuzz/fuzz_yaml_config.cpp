// Job configs (YAML): the whole load, keys, types and validation.
#include "launch/config.h"
#include "tests/fuzz/harness.h"

SWITCHYARD_FUZZ_HARNESS(switchyard::load_config_string(text, "fuzz.yaml", {}))
