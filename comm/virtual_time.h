// Virtual time for emulated runs: each thread keeps a lane (seconds). Compute
// phases charge the lane of the thread that runs them; an emulated op starts
// no earlier than its issuing thread's lane and, when waited on, moves the
// waiting thread's lane to the op's end. So overlap (an all-to-all on the
// executor while the caller computes) shows in virtual time as it would on a
// GPU's two streams. Outside emulation nothing charges and lanes stay 0.
#pragma once

namespace switchyard::virtual_time {

double now();                // this thread's lane
void advance_to(double t);   // lane = max(lane, t)
void charge(double seconds); // lane += seconds
// Rewinds this thread's lane only: communicators keep their streams' times,
// so use it with fresh communicators (tests); benchmarks measure differences.
void reset(double t = 0.0);

}  // namespace switchyard::virtual_time
