// Named crash points for failure tests: failpoint("checkpoint.shard_saved")
// does nothing unless SWITCHYARD_FAILPOINT names that point, in which case the
// process kills itself (SIGKILL: no unwinding, no flush, as a crash or the OOM
// killer would) the N-th time it passes there ("NAME#N", N counted per
// process over all its threads).
#pragma once

namespace switchyard {

void failpoint(const char* name);
bool failpoints_armed();  // SWITCHYARD_FAILPOINT is set (points that cost something check first)

}  // namespace switchyard
