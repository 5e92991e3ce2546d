// Named crash points for failure tests: failpoint("checkpoint.shard_saved")
// does nothing unless SWITCHYARD_FAILPOINT names that point, in which case the
// process kills itself (SIGKILL: no unwinding, no flush, as a crash or the OOM
// killer would) the N-th time it passes there ("NAME#N", N counted per
// process over all its threads).
#pragma once

#include <string>

namespace switchyard {

// Every point the code has (SWITCHYARD_FAILPOINT must name one of them).
inline constexpr const char* kFailpoints[] = {"checkpoint.locked",         "safetensors.partly_written",
                                              "checkpoint.shard_saved",    "checkpoint.manifest_written",
                                              "checkpoint.published",      "checkpoint.side_files_written"};
// "a, b, c": the names, for docs and errors.
std::string failpoint_names();

void failpoint(const char* name);
bool failpoints_armed();  // SWITCHYARD_FAILPOINT is set (points that cost something check first)

}  // namespace switchyard
