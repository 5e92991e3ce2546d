#include "comm/backends/ucx/ucx_backend.h"

#include <ucp/api/ucp.h>

#include <atomic>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "core/env.h"
#include "core/error.h"

namespace switchyard {
namespace {

// Tag: [group 18 bits][tag 26 bits][source rank 20 bits].
constexpr int kSourceBits = 20, kTagBits = 26;
constexpr uint64_t kSourceMask = (uint64_t{1} << kSourceBits) - 1;
uint64_t make_tag(uint32_t group, uint32_t tag, int source) {
  return (uint64_t{group & 0x3FFFFu} << (kSourceBits + kTagBits)) |
         (uint64_t{tag & ((1u << kTagBits) - 1)} << kSourceBits) | (static_cast<uint64_t>(source) & kSourceMask);
}

void check(ucs_status_t s, const char* what) {
  if (s != UCS_OK) SY_THROW(IoError, "ucx: ", what, " failed: ", ucs_status_string(s));
}

// Progresses `worker` until `req` completes or `limit` passes; true when it completed.
bool progress_until(ucp_worker_h worker, void* req, std::chrono::milliseconds limit) {
  const auto deadline = Clock::now() + limit;
  while (ucp_request_check_status(req) == UCS_INPROGRESS) {
    if (Clock::now() >= deadline) return false;
    ucp_worker_progress(worker);
  }
  return true;
}

// The process's context, worker and endpoints, shared by every communicator made from one world.
struct UcxWorld {
  std::mutex mutex;  // every UCP call
  ucp_context_h context = nullptr;
  ucp_worker_h worker = nullptr;
  std::vector<ucp_ep_h> eps;  // by world rank
  std::vector<uint32_t> group_ids;  // of the live communicators, to refuse a tag-space collision
  int rank = 0;
  // A rank the heartbeat found dead (-1: none yet), and how it was found.
  std::atomic<int> failed_rank{-1};
  std::mutex failure_mutex;
  std::string failure;
  std::unique_ptr<class Heartbeat> heartbeat;

  void fail(int peer, const std::string& why) {
    {
      std::lock_guard lock(failure_mutex);
      if (failure.empty()) failure = why;
    }
    int none = -1;
    failed_rank.compare_exchange_strong(none, peer);
  }
  // Throws when the heartbeat found a dead rank.
  void check_alive() {
    if (failed_rank.load(std::memory_order_relaxed) < 0) return;
    std::lock_guard lock(failure_mutex);
    SY_THROW(IoError, "ucx: ", failure);
  }

  // Flush-close every endpoint (queued eager data still goes out), bounded;
  // a close that does not flush in time is cancelled (the process is ending).
  ~UcxWorld();
  void close_endpoints() {
    for (size_t r = 0; r < eps.size(); ++r) {
      if (!eps[r]) continue;
      ucp_request_param_t p{};
      p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      p.flags = 0;  // force-closing needs the peer error mode
      void* req = ucp_ep_close_nbx(eps[r], &p);
      if (UCS_PTR_IS_PTR(req)) {
        if (!progress_until(worker, req, std::chrono::milliseconds(2000))) ucp_request_cancel(worker, req);
        progress_until(worker, req, std::chrono::milliseconds(500));
        ucp_request_free(req);
      }
    }
    if (worker) ucp_worker_destroy(worker);
    if (context) ucp_cleanup(context);
  }
};

// Every `period` the rank bumps <prefix>/hb/<rank> and reads the counter of
// the next rank that has not ended cleanly; one that stays unchanged while
// this rank itself beat `dead_after / period` times in a row (so the store
// kept serving, and this process was not paused itself) is published as
// <prefix>/failed, which every rank polls. About three store calls per rank
// per period. A rank that unwinds through an exception publishes its own
// failure; one that ends normally writes <prefix>/done/<rank> first.
class Heartbeat {
 public:
  static constexpr auto kPeriod = std::chrono::milliseconds(250);

  Heartbeat(UcxWorld& world, std::unique_ptr<Store> store, std::string prefix, int rank, int size,
            std::chrono::milliseconds dead_after)
      : world_(world), store_(std::move(store)), prefix_(std::move(prefix)), rank_(rank), size_(size),
        dead_after_(dead_after), done_(static_cast<size_t>(size), false), thread_([this] { loop(); }) {}
  ~Heartbeat() {
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
    }
    cv_.notify_all();
    thread_.join();
    if (store_errors_ > 0) return;  // the store is going or gone: nothing to tell it
    try {
      if (std::uncaught_exceptions() > 0)  // this rank is failing: say so rather than "done"
        store_->set(prefix_ + "/failed", Store::to_bytes(std::to_string(rank_) + " rank " + std::to_string(rank_) +
                                                         " left the job with an error"));
      else
        store_->set(key("done", rank_), Store::to_bytes("1"));
    } catch (const std::exception&) {
    }
  }

 private:
  std::string key(const char* what, int r) const { return prefix_ + "/" + what + "/" + std::to_string(r); }
  // "<rank> <why>" as published; nothing when malformed.
  void take_published(const std::string& text) {
    int peer = -1;
    const auto space = text.find(' ');
    const auto [end, ec] = std::from_chars(text.data(), text.data() + std::min(space, text.size()), peer);
    if (ec != std::errc() || peer < 0 || peer >= size_ || space == std::string::npos) return;
    world_.fail(peer, text.substr(space + 1));
  }
  // The next rank after this one that has not ended cleanly (-1: none); done
  // never reverts, so each is read until it is seen once.
  int next_live() {
    for (int i = 1; i < size_; ++i) {
      const int r = (rank_ + i) % size_;
      if (done_[static_cast<size_t>(r)]) continue;
      if (!store_->try_get(key("done", r))) return r;
      done_[static_cast<size_t>(r)] = true;
    }
    return -1;
  }
  void loop() {
    const int64_t beats_to_declare = std::max<int64_t>(2, dead_after_ / kPeriod);
    int watched = -1;
    std::optional<Store::Bytes> last;
    int64_t my_beats_since_change = 0;
    auto last_round = Clock::now(), store_failing_since = Clock::now();
    std::unique_lock lock(mutex_);
    while (!stopping_) {
      lock.unlock();
      // A gap in this thread's own rounds (this process paused, or starved)
      // says nothing about the watched rank: start counting again.
      if (Clock::now() - last_round > 2 * kPeriod) my_beats_since_change = 0;
      last_round = Clock::now();
      try {
        store_->add(key("hb", rank_), 1);
        if (auto f = store_->try_get(prefix_ + "/failed")) take_published(Store::to_string(*f));
        const int next = next_live();
        if (next != watched) watched = next, last.reset(), my_beats_since_change = 0;
        if (watched >= 0) {
          // Counting starts at the watched rank's first beat (ranks leave bootstrap at different times).
          auto now_value = store_->try_get(key("hb", watched));
          if (!now_value || now_value != last) {
            last = now_value, my_beats_since_change = 0;
          } else if (++my_beats_since_change >= beats_to_declare) {
            const std::string why = detail::make_string(
                "rank ", watched, " stopped its heartbeat ", dead_after_.count(), " ms ago (seen by rank ", rank_,
                "): it died or was stopped");
            store_->set(prefix_ + "/failed", Store::to_bytes(std::to_string(watched) + " " + why));
            world_.fail(watched, why);
          }
        }
        store_errors_ = 0;
      } catch (const std::exception& e) {
        // One slow or refused call is not a failure; a store gone for the whole dead_after is.
        if (store_errors_++ == 0) store_failing_since = Clock::now();
        my_beats_since_change = 0;
        if (Clock::now() - store_failing_since > dead_after_)
          world_.fail(rank_, detail::make_string("the store the heartbeat runs through has not answered for ",
                                                 dead_after_.count(), " ms (", e.what(),
                                                 "); the launcher or the store's host is gone"));
      }
      lock.lock();
      cv_.wait_for(lock, kPeriod, [&] { return stopping_; });
    }
  }
  UcxWorld& world_;
  std::unique_ptr<Store> store_;
  std::string prefix_;
  int rank_, size_;
  std::chrono::milliseconds dead_after_;
  std::vector<bool> done_;
  int64_t store_errors_ = 0;
  std::mutex mutex_;
  std::condition_variable cv_;
  bool stopping_ = false;
  std::thread thread_;
};

UcxWorld::~UcxWorld() {
  heartbeat.reset();  // says "done" before the endpoints go
  close_endpoints();
}


class UcxTransport : public Transport {
 public:
  UcxTransport(std::shared_ptr<UcxWorld> world, std::vector<int> members, int me, uint32_t group)
      : world_(std::move(world)), members_(std::move(members)), me_(me), group_(group) {}
  int rank() const override { return me_; }
  int size() const override { return static_cast<int>(members_.size()); }

  void post_send(int peer, const void* data, size_t bytes, uint32_t tag) override {
    std::lock_guard lock(world_->mutex);
    const int to = members_[static_cast<size_t>(peer)];
    // Throwing here leaves this op's earlier posts behind: cancel them first.
    if (world_->failed_rank.load(std::memory_order_relaxed) >= 0) {
      cancel_all_locked();
      world_->check_alive();
    }
    if (!world_->eps[static_cast<size_t>(to)]) {
      cancel_all_locked();
      SY_THROW(IoError, "ucx: rank ", peer, " failed earlier (its endpoint was closed); nothing more can be sent to it");
    }
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_DATATYPE;
    p.datatype = ucp_dt_make_contig(1);
    void* req = ucp_tag_send_nbx(world_->eps[static_cast<size_t>(members_[static_cast<size_t>(peer)])], data, bytes,
                                 make_tag(group_, tag, me_), &p);
    track(req, peer, bytes, false);
  }
  void post_recv(int peer, void* data, size_t bytes, uint32_t tag) override {
    std::lock_guard lock(world_->mutex);
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_DATATYPE;
    p.datatype = ucp_dt_make_contig(1);
    void* req = ucp_tag_recv_nbx(world_->worker, data, bytes, make_tag(group_, tag, peer), ~uint64_t{0}, &p);
    track(req, peer, bytes, true);
  }
  void wait_all(Deadline deadline) override {
    for (;;) {
      {
        std::lock_guard lock(world_->mutex);
        ucp_worker_progress(world_->worker);
        for (auto it = pending_.begin(); it != pending_.end();) {
          const ucs_status_t s = ucp_request_check_status(it->request);
          if (s == UCS_INPROGRESS) {
            ++it;
            continue;
          }
          std::string error;
          if (s != UCS_OK) {
            error = detail::make_string("ucx: ", it->recv ? "receive from" : "send to", " rank ", it->peer, " failed: ",
                                        ucs_status_string(s));
          } else if (it->recv) {
            ucp_tag_recv_info_t info{};
            if (ucp_tag_recv_request_test(it->request, &info) == UCS_OK && info.length != it->bytes)
              error = detail::make_string("ucx: message from rank ", it->peer, " has ", info.length,
                                          " bytes, the receive expected ", it->bytes);
          }
          ucp_request_free(it->request);
          it = pending_.erase(it);
          if (!error.empty()) {
            cancel_all_locked();
            SY_THROW(IoError, error);
          }
        }
        if (pending_.empty()) return;
        if (world_->failed_rank.load(std::memory_order_relaxed) >= 0) {
          cancel_all_locked();
          world_->check_alive();
        }
        if (Clock::now() >= deadline) {
          const Pending first = pending_.front();
          const size_t n = pending_.size();
          cancel_all_locked();
          SY_THROW(TimeoutError, "ucx: ", n, " transfer(s) still pending at the deadline, the first a ",
                   first.recv ? "receive from" : "send to", " rank ", first.peer, " (", first.bytes,
                   " bytes); that rank may have failed or stopped");
        }
      }
      std::this_thread::yield();
    }
  }

 private:
  struct Pending {
    void* request;
    int peer;
    size_t bytes;
    bool recv;
  };
  void track(void* req, int peer, size_t bytes, bool recv) {
    if (req == nullptr) return;  // completed in place
    if (UCS_PTR_IS_ERR(req)) {
      cancel_all_locked();
      SY_THROW(IoError, "ucx: ", recv ? "receive from" : "send to", " rank ", peer, " failed to start: ",
               ucs_status_string(UCS_PTR_STATUS(req)));
    }
    pending_.push_back({req, peer, bytes, recv});
  }
  // Cancelled transfers must not touch buffers freed after the failure. UCX
  // cancels unmatched receives; sends and matched transfers finish on their
  // own with a live peer. Without the peer error mode nothing completes a
  // transfer to a dead peer, and an endpoint may not be force-closed, so a
  // request still running after a bounded wait ends this process with the
  // reason (as the MPI backend does) rather than let UCX write freed memory.
  void cancel_all_locked() {
    for (auto& p : pending_) ucp_request_cancel(world_->worker, p.request);
    for (auto& p : pending_) {
      if (!progress_until(world_->worker, p.request, std::chrono::milliseconds(2000))) {
        std::fprintf(stderr,
                     "switchyard: ucx rank %d: a %s rank %d (%zu bytes) cannot be cancelled (%s); ending this process "
                     "so that it cannot write into released buffers\n",
                     world_->rank, p.recv ? "receive from" : "send to", members_[static_cast<size_t>(p.peer)], p.bytes,
                     world_->failed_rank.load() >= 0 ? "a peer failed" : "the op failed");
        std::fflush(stderr);
        std::_Exit(1);
      }
      ucp_request_free(p.request);
    }
    pending_.clear();
  }
  std::shared_ptr<UcxWorld> world_;
  std::vector<int> members_;  // world rank of each member
  int me_;
  uint32_t group_;
  std::vector<Pending> pending_;
};

class UcxCommunicator : public Communicator {
 public:
  // members: the world rank of each rank of this communicator.
  UcxCommunicator(std::shared_ptr<UcxWorld> world, std::vector<int> members, int me, uint32_t group, std::string name)
      : Communicator(me, static_cast<int>(members.size()), std::move(name)),
        group_(group),
        world_members_(members),
        world_(world),
        transport_(std::move(world), std::move(members), me, group) {}
  ~UcxCommunicator() override {
    shutdown_executor();
    std::lock_guard lock(world_->mutex);
    auto& ids = world_->group_ids;
    for (auto it = ids.begin(); it != ids.end(); ++it)
      if (*it == group_) {
        ids.erase(it);
        break;
      }
  }
  std::string_view backend_name() const override { return "ucx"; }

 protected:
  Transport& transport() override { return transport_; }
  std::shared_ptr<Communicator> do_create_group(const std::vector<int>& members, uint64_t group_key,
                                                const std::string& name, const OpContext&) override {
    std::vector<int> world_ranks;
    int mine = -1;
    for (size_t i = 0; i < members.size(); ++i) {
      world_ranks.push_back(world_members_[static_cast<size_t>(members[i])]);
      if (members[i] == rank()) mine = static_cast<int>(i);
    }
    // A group's tags are its own (0 is the world's). Its id hashes the
    // parent's id with the key (the same on every member: member list and how
    // many groups of that list the parent made), so equal member lists of
    // different parents differ. 18 bits: two live groups of this process that
    // still collide are refused rather than risk crossed messages.
    uint64_t h = group_key * 0x9E3779B97F4A7C15ull ^ (uint64_t{group_} + 0x632BE59BD9B4E019ull);
    h ^= h >> 29;
    h *= 0xBF58476D1CE4E5B9ull;
    h ^= h >> 32;
    const auto group = static_cast<uint32_t>(h & 0x3FFFF) | 1u;
    {
      std::lock_guard lock(world_->mutex);
      for (uint32_t id : world_->group_ids)
        if (id == group)
          SY_THROW(NotSupported, "ucx: group '", name, "' hashes to the tag space of a live group of this process (",
                   group, "); create it after the other is gone, or from another parent");
      world_->group_ids.push_back(group);
    }
    return std::make_shared<UcxCommunicator>(world_, std::move(world_ranks), mine, group, name);
  }

 private:
  uint32_t group_;
  std::vector<int> world_members_;
  std::shared_ptr<UcxWorld> world_;
  UcxTransport transport_;
};

}  // namespace

std::shared_ptr<Communicator> make_ucx_world_communicator(Store& store, int rank, int size, const std::string& prefix,
                                                          Milliseconds timeout,
                                                          std::function<std::unique_ptr<Store>()> heartbeat_store) {
  if (size < 1 || rank < 0 || rank >= size)
    SY_THROW(InvalidArgument, "ucx: rank ", rank, " of ", size, ", expected 0 <= rank < size");
  if (size > (1 << kSourceBits))
    SY_THROW(NotSupported, "ucx: ", size, " ranks exceed the ", 1 << kSourceBits, " the tag layout addresses");
  auto world = std::make_shared<UcxWorld>();
  world->rank = rank;
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED;
  params.features = UCP_FEATURE_TAG;
  params.mt_workers_shared = 0;
  check(ucp_init(&params, nullptr, &world->context), "ucp_init");
  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SERIALIZED;
  check(ucp_worker_create(world->context, &wp, &world->worker), "ucp_worker_create");
  ucp_address_t* address = nullptr;
  size_t address_length = 0;
  check(ucp_worker_get_address(world->worker, &address, &address_length), "ucp_worker_get_address");
  const auto* a = reinterpret_cast<const uint8_t*>(address);
  store.set(prefix + "/addr/" + std::to_string(rank), Store::Bytes(a, a + address_length));
  ucp_worker_release_address(world->worker, address);
  std::vector<std::string> keys;
  for (int r = 0; r < size; ++r) keys.push_back(prefix + "/addr/" + std::to_string(r));
  store.wait(keys, timeout);
  world->eps.assign(static_cast<size_t>(size), nullptr);
  // No peer error mode (it would rule out shared memory; the heartbeat finds
  // dead peers). Rank `rank` connects to itself too, so algorithms may send
  // to their own rank.
  for (int r = 0; r < size; ++r) {
    Store::Bytes peer;
    if (r == rank) {
      check(ucp_worker_get_address(world->worker, &address, &address_length), "ucp_worker_get_address");
      const auto* self = reinterpret_cast<const uint8_t*>(address);
      peer.assign(self, self + address_length);
      ucp_worker_release_address(world->worker, address);
    } else {
      peer = store.get(keys[static_cast<size_t>(r)], timeout);
    }
    ucp_ep_params_t ep{};
    ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
    ep.address = reinterpret_cast<const ucp_address_t*>(peer.data());
    ep.err_mode = UCP_ERR_HANDLING_MODE_NONE;
    check(ucp_ep_create(world->worker, &ep, &world->eps[static_cast<size_t>(r)]), "ucp_ep_create");
  }
  if (heartbeat_store && size > 1 && env().ucx_heartbeat_ms > 0)
    world->heartbeat = std::make_unique<Heartbeat>(*world, heartbeat_store(), prefix + "/heartbeat", rank, size,
                                                   std::chrono::milliseconds(env().ucx_heartbeat_ms));
  std::vector<int> members(static_cast<size_t>(size));
  for (int r = 0; r < size; ++r) members[static_cast<size_t>(r)] = r;
  return std::make_shared<UcxCommunicator>(world, members, rank, 0u, "world");
}

}  // namespace switchyard
