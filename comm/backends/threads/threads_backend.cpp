#include "comm/backends/threads/threads_backend.h"

#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <thread>
#include <tuple>

#include "comm/spin.h"
#include "comm/store/memory_store.h"
#include "core/logging.h"

namespace switchyard {
namespace {

// A posted send waiting for its receiver. The receiver copies and marks it done.
struct PendingSend {
  const void* data;
  size_t bytes;
  bool consumed = false;
  std::string error;  // set by the receiver on a size mismatch
};

struct MailboxKey {
  uint64_t comm_id;
  int source;  // world rank
  uint32_t tag;
  auto operator<=>(const MailboxKey&) const = default;
};

// One per world rank: sends addressed to it, and the condition both its sends'
// completion and arrivals for it are signalled on.
struct Mailbox {
  std::mutex mutex;
  std::condition_variable cv;
  std::map<MailboxKey, std::deque<std::shared_ptr<PendingSend>>> incoming;
};

uint64_t hash_combine(uint64_t seed, uint64_t v) {
  return seed ^ (v + 0x9e3779b97f4a7c15ull + (seed << 6) + (seed >> 2));
}

}  // namespace

struct ThreadsWorld::State {
  explicit State(int n) : size(n), mailboxes(static_cast<size_t>(n)) {}
  int size;
  std::vector<Mailbox> mailboxes;
  std::atomic<bool> aborted{false};
  std::mutex abort_mutex;
  std::string abort_reason;
  MemoryStore store;

  std::string reason() {
    std::lock_guard lock(abort_mutex);
    return abort_reason;
  }
};

namespace {

class ThreadsCommunicator;

class ThreadsTransport : public Transport {
 public:
  ThreadsTransport(std::shared_ptr<ThreadsWorld::State> world, std::vector<int> world_ranks, int rank, uint64_t comm_id)
      : world_(std::move(world)), world_ranks_(std::move(world_ranks)), rank_(rank), comm_id_(comm_id) {}

  int rank() const override { return rank_; }
  int size() const override { return static_cast<int>(world_ranks_.size()); }
  const std::shared_ptr<ThreadsWorld::State>& world() const { return world_; }
  int world_rank_of(int rank) const { return world_ranks_[static_cast<size_t>(rank)]; }
  uint64_t comm_id() const { return comm_id_; }

  void post_send(int peer, const void* data, size_t bytes, uint32_t tag) override {
    auto pending = std::make_shared<PendingSend>(PendingSend{data, bytes, false, {}});
    Mailbox& box = world_->mailboxes[static_cast<size_t>(world_ranks_[static_cast<size_t>(peer)])];
    {
      std::lock_guard lock(box.mutex);
      box.incoming[MailboxKey{comm_id_, my_world_rank(), tag}].push_back(pending);
    }
    box.cv.notify_all();
    sends_.push_back({peer, tag, pending});
  }

  void post_recv(int peer, void* data, size_t bytes, uint32_t tag) override {
    recvs_.push_back({peer, data, bytes, tag});
  }

  void wait_all(Deadline deadline) override {
    // Clear the posted lists whatever happens: a failed op must not leak into the next.
    auto recvs = std::move(recvs_);
    auto sends = std::move(sends_);
    recvs_.clear();
    sends_.clear();
    try {
      complete(recvs, sends, deadline);
    } catch (...) {
      withdraw(sends);
      throw;
    }
  }

 private:
  struct PostedRecv {
    int peer;
    void* data;
    size_t bytes;
    uint32_t tag;
  };
  struct PostedSend {
    int peer;
    uint32_t tag;
    std::shared_ptr<PendingSend> pending;
  };

  void complete(const std::vector<PostedRecv>& recvs, const std::vector<PostedSend>& sends, Deadline deadline) {
    Mailbox& mine = world_->mailboxes[static_cast<size_t>(my_world_rank())];
    for (const PostedRecv& r : recvs) {
      const MailboxKey key{comm_id_, world_ranks_[static_cast<size_t>(r.peer)], r.tag};
      std::shared_ptr<PendingSend> msg;
      {
        std::unique_lock lock(mine.mutex);
        wait_until(mine, lock, deadline, [&] {
          auto it = mine.incoming.find(key);
          return it != mine.incoming.end() && !it->second.empty();
        }, "a message from rank", r.peer, r.bytes);
        auto it = mine.incoming.find(key);
        msg = it->second.front();
        it->second.pop_front();
        if (it->second.empty()) mine.incoming.erase(it);
      }
      // Copy outside our lock; the sender's buffer is pinned until we mark it consumed.
      std::string error;
      if (msg->bytes != r.bytes)
        error = detail::make_string("message size mismatch between rank ", r.peer, " (sent ", msg->bytes,
                                    " bytes) and rank ", rank_, " (expects ", r.bytes, " bytes), tag ", r.tag);
      else if (r.bytes)
        std::memcpy(r.data, msg->data, r.bytes);
      Mailbox& sender = world_->mailboxes[static_cast<size_t>(world_ranks_[static_cast<size_t>(r.peer)])];
      {
        std::lock_guard lock(sender.mutex);
        msg->consumed = true;
        msg->error = error;
      }
      sender.cv.notify_all();
      if (!error.empty()) SY_THROW(IoError, error);
    }
    for (const PostedSend& s : sends) {
      std::unique_lock lock(mine.mutex);
      wait_until(mine, lock, deadline, [&] { return s.pending->consumed; }, "rank", s.peer, s.pending->bytes,
                 " to receive");
      if (!s.pending->error.empty()) SY_THROW(IoError, s.pending->error);
    }
  }

  // After a failure our send buffers are about to be released: take back every
  // send no receiver has picked up yet, and wait for the copies in progress
  // (a receiver pops a message before copying from our buffer).
  void withdraw(const std::vector<PostedSend>& sends) {
    Mailbox& mine = world_->mailboxes[static_cast<size_t>(my_world_rank())];
    for (const PostedSend& s : sends) {
      Mailbox& box = world_->mailboxes[static_cast<size_t>(world_ranks_[static_cast<size_t>(s.peer)])];
      bool picked_up = true;
      {
        std::lock_guard lock(box.mutex);
        auto it = box.incoming.find(MailboxKey{comm_id_, my_world_rank(), s.tag});
        if (it != box.incoming.end()) {
          auto& queue = it->second;
          for (auto q = queue.begin(); q != queue.end(); ++q)
            if (*q == s.pending) {
              queue.erase(q);
              picked_up = false;
              break;
            }
          if (queue.empty()) box.incoming.erase(it);
        }
      }
      if (picked_up) {
        std::unique_lock lock(mine.mutex);
        mine.cv.wait(lock, [&] { return s.pending->consumed; });
      }
    }
  }

  int my_world_rank() const { return world_ranks_[static_cast<size_t>(rank_)]; }

  template <typename Pred>
  void wait_until(Mailbox& box, std::unique_lock<std::mutex>& lock, Deadline deadline, Pred ready,
                  const char* what, int peer, size_t bytes, const char* suffix = "") {
    if (!ready()) {  // poll a while (without holding the mailbox) before sleeping on it
      lock.unlock();
      spin_until([&] {
        std::unique_lock probe(box.mutex, std::try_to_lock);
        return probe.owns_lock() && ready();
      });
      lock.lock();
    }
    while (!ready()) {
      if (world_->aborted.load()) SY_THROW(IoError, "aborted while waiting for ", what, " ", peer, suffix, ": ", world_->reason());
      if (box.cv.wait_until(lock, deadline) == std::cv_status::timeout && !ready()) {
        if (world_->aborted.load()) SY_THROW(IoError, "aborted while waiting for ", what, " ", peer, suffix, ": ", world_->reason());
        SY_THROW(TimeoutError, "timed out waiting for ", what, " ", peer, suffix, " (", bytes,
                 " bytes); that rank has not reached the matching op");
      }
    }
  }

  std::shared_ptr<ThreadsWorld::State> world_;
  std::vector<int> world_ranks_;  // communicator rank -> world rank
  int rank_;
  uint64_t comm_id_;
  std::vector<PostedRecv> recvs_;
  std::vector<PostedSend> sends_;
};

class ThreadsCommunicator : public Communicator {
 public:
  ThreadsCommunicator(std::shared_ptr<ThreadsWorld::State> world, std::vector<int> world_ranks, int rank,
                      uint64_t comm_id, std::string name)
      : Communicator(rank, static_cast<int>(world_ranks.size()), std::move(name)),
        transport_(std::move(world), std::move(world_ranks), rank, comm_id) {}
  ~ThreadsCommunicator() override { shutdown_executor(); }

  std::string_view backend_name() const override { return "threads"; }

 protected:
  Transport& transport() override { return transport_; }

  std::shared_ptr<Communicator> do_create_group(const std::vector<int>& members, uint64_t group_key,
                                                const std::string& name, const OpContext&) override {
    // Every member derives the same id from the parent's and the group key (which
    // already hashes the member list); no traffic needed.
    const uint64_t id = hash_combine(transport_.comm_id(), group_key);
    std::vector<int> world_ranks;
    int my_rank = -1;
    for (size_t i = 0; i < members.size(); ++i) {
      world_ranks.push_back(transport_.world_rank_of(members[i]));
      if (members[i] == rank()) my_rank = static_cast<int>(i);
    }
    auto child = std::make_shared<ThreadsCommunicator>(transport_.world(), world_ranks, my_rank, id, name);
    child->set_default_timeout(default_timeout());
    return child;
  }

 private:
  ThreadsTransport transport_;
};

}  // namespace

ThreadsWorld::ThreadsWorld(int size) {
  SY_CHECK(size >= 1, "threads world size ", size, ", expected >= 1");
  state_ = std::make_shared<State>(size);
}
ThreadsWorld::~ThreadsWorld() = default;
int ThreadsWorld::size() const { return state_->size; }
MemoryStore& ThreadsWorld::store() { return state_->store; }

void ThreadsWorld::abort(const std::string& reason) {
  {
    std::lock_guard lock(state_->abort_mutex);
    if (state_->aborted.load()) return;
    state_->abort_reason = reason;
    state_->aborted.store(true);
  }
  for (Mailbox& box : state_->mailboxes) {
    std::lock_guard lock(box.mutex);  // so no waiter misses the flag between check and sleep
    box.cv.notify_all();
  }
}

std::shared_ptr<Communicator> ThreadsWorld::communicator(int rank) {
  SY_CHECK(rank >= 0 && rank < state_->size, "rank ", rank, " of a threads world of size ", state_->size);
  std::vector<int> ranks(static_cast<size_t>(state_->size));
  for (int i = 0; i < state_->size; ++i) ranks[static_cast<size_t>(i)] = i;
  return std::make_shared<ThreadsCommunicator>(state_, std::move(ranks), rank, 1, "world");
}

void run_thread_ranks(int size, const std::function<void(Communicator&)>& fn, ThreadRanksOptions options) {
  ThreadsWorld world(size);
  std::mutex failure_mutex;
  std::exception_ptr first_failure;
  int first_rank = -1;
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(size));
  for (int r = 0; r < size; ++r) {
    try {
    threads.emplace_back([&, r] {
      set_log_rank(r);
      // Declared outside the try: the world is aborted before the communicator's
      // destructor drains its queue, so the others stop at once.
      std::shared_ptr<Communicator> comm;
      try {
        comm = world.communicator(r);
        if (options.default_timeout) comm->set_default_timeout(*options.default_timeout);
        fn(*comm);
      } catch (const std::exception& e) {
        {
          std::lock_guard lock(failure_mutex);
          if (!first_failure) {
            first_failure = std::current_exception();
            first_rank = r;
          }
        }
        world.abort(detail::make_string("rank ", r, " failed: ", e.what()));
      }
    });
    } catch (const std::system_error& e) {
      // No thread for this rank (a thread or memory limit): the ranks already started are
      // stopped and joined, and the run fails saying so, instead of std::terminate.
      const std::string why = detail::make_string("cannot start thread-rank ", r, " of ", size, " (", e.what(),
                                                  "); lower the rank count or raise the process's thread limit");
      world.abort(why);
      for (auto& t : threads) t.join();
      SY_THROW(IoError, why);
    }
  }
  for (auto& t : threads) t.join();
  if (!first_failure) return;
  std::rethrow_exception(with_context(first_failure, detail::make_string("rank ", first_rank, ": ")));
}

}  // namespace switchyard
