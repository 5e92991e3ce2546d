#include "comm/virtual_time.h"

#include <algorithm>

namespace switchyard::virtual_time {
namespace {
thread_local double lane = 0.0;
}

double now() { return lane; }
void advance_to(double t) { lane = std::max(lane, t); }
void charge(double seconds) { lane += seconds; }
void reset(double t) { lane = t; }

}  // namespace switchyard::virtual_time
