// A checkpoint directory's manifest.json.
#include "parallel/checkpoint.h"
#include "tests/fuzz/harness.h"

SWITCHYARD_FUZZ_HARNESS((void)switchyard::parse_checkpoint_manifest(text, "fuzz-checkpoint"))
