// A model's config.json.
#include "model/model_config.h"
#include "tests/fuzz/harness.h"

SWITCHYARD_FUZZ_HARNESS((void)switchyard::ModelConfig::parse(text, "config.json"))
