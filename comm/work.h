// Work: the handle of an asynchronous op. wait() rethrows the op's error on
// every call; the Work keeps the op's buffers alive until it completes.
#pragma once

#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "comm/types.h"

namespace switchyard {

// What an op was, kept cheaply per op; the text is composed only when needed
// (errors, timeouts). `op` and `backend` name static strings.
struct WorkLabel {
  std::string_view op;
  std::string communicator;
  int rank = 0;
  int size = 1;
  std::string_view backend;
  std::string describe() const;
};

class WorkState {
 public:
  explicit WorkState(WorkLabel label) : label_(std::move(label)) {}
  virtual ~WorkState() = default;

  // Returns true when complete (throws the op's error if it failed); false when
  // `timeout` passed first. No timeout: waits for completion.
  virtual bool wait(std::optional<Milliseconds> timeout);
  virtual bool test();
  void complete(std::exception_ptr error = nullptr);
  // Emulated ops: the virtual time the op ends; a wait moves the waiting
  // thread's virtual lane there (comm/virtual_time.h). Set before complete().
  void set_virtual_end(double t) { virtual_end_ = t; }
  void keep_alive(std::shared_ptr<void> owner) { owners_.push_back(std::move(owner)); }
  std::string description() const { return label_.describe(); }

 private:
  WorkLabel label_;
  std::mutex mutex_;
  std::condition_variable done_cv_;
  bool done_ = false;
  std::exception_ptr error_;
  std::vector<std::shared_ptr<void>> owners_;
  double virtual_end_ = -1.0;
};

class Work {
 public:
  Work() = default;
  explicit Work(std::shared_ptr<WorkState> state) : state_(std::move(state)) {}

  // Blocks until the op completes and rethrows its error.
  void wait() { state_->wait(std::nullopt); }
  // Blocks at most `timeout`; throws TimeoutError naming the op when it is still running.
  void wait(Milliseconds timeout);
  // Non-blocking: true when complete (rethrows its error).
  bool test() { return state_->test(); }
  bool valid() const { return state_ != nullptr; }
  std::string description() const { return state_->description(); }

 private:
  std::shared_ptr<WorkState> state_;
};

}  // namespace switchyard
