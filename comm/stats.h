// What a communicator moved: bytes and time per op and bytes per peer, so
// strategies can be judged by their traffic.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace switchyard {

struct OpStats {
  uint64_t calls = 0;
  uint64_t bytes = 0;    // payload this rank contributed (input bytes)
  double seconds = 0.0;  // time on the executor, from start to completion
  double virtual_seconds = 0.0;  // emulated backends: modelled duration (comm/virtual_time.h)
};

struct CommStats {
  std::map<std::string, OpStats> ops;
  // Bytes this rank sent to / received from each peer (by rank in this
  // communicator): as moved for the generic algorithms and point-to-point ops;
  // for native collectives (MPI_I*, fake) as a direct exchange would move them.
  std::vector<uint64_t> sent_to;
  std::vector<uint64_t> received_from;
  uint64_t total_sent() const;
  uint64_t total_received() const;
};

}  // namespace switchyard
