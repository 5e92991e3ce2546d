// The threads backend: ranks are threads of one process. Messages are handed
// over by rendezvous (the receiver copies straight from the sender's buffer),
// so a message costs one copy. The embedded default and the test harness.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "comm/communicator.h"

namespace switchyard {

class MemoryStore;

// State shared by the thread-ranks of one world: mailboxes, the abort flag, a store.
class ThreadsWorld {
 public:
  explicit ThreadsWorld(int size);
  ~ThreadsWorld();
  int size() const;
  // Makes every pending and future wait of every rank fail with `reason`
  // (a rank that died stops the others at once instead of at their timeouts).
  void abort(const std::string& reason);
  MemoryStore& store();
  // The world communicator of `rank`; call once per rank.
  std::shared_ptr<Communicator> communicator(int rank);

  struct State;

 private:
  std::shared_ptr<State> state_;
};

struct ThreadRanksOptions {
  std::optional<Milliseconds> default_timeout;
};

// Runs fn on `size` threads, one per rank, each with its world communicator.
// When a rank throws, the world is aborted so the others stop; after all
// threads end, the first failure is rethrown as "rank R: <message>" (its type kept
// for TimeoutError/IoError/InvalidArgument).
void run_thread_ranks(int size, const std::function<void(Communicator&)>& fn, ThreadRanksOptions options = {});

}  // namespace switchyard
