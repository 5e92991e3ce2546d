#include "comm/work.h"

#include "comm/virtual_time.h"
#include "core/error.h"

namespace switchyard {

std::string WorkLabel::describe() const {
  return detail::make_string(op, " on '", communicator, "' rank ", rank, "/", size, " (", backend, ")");
}

bool WorkState::wait(std::optional<Milliseconds> timeout) {
  std::unique_lock lock(mutex_);
  if (timeout) {
    if (!done_cv_.wait_for(lock, *timeout, [&] { return done_; })) return false;
  } else {
    done_cv_.wait(lock, [&] { return done_; });
  }
  if (error_) std::rethrow_exception(error_);
  if (virtual_end_ >= 0) virtual_time::advance_to(virtual_end_);
  return true;
}

bool WorkState::test() {
  std::lock_guard lock(mutex_);
  if (done_ && error_) std::rethrow_exception(error_);
  if (done_ && virtual_end_ >= 0) virtual_time::advance_to(virtual_end_);
  return done_;
}

void WorkState::complete(std::exception_ptr error) {
  // The op's buffers go before the waiters wake: an owner may need what the
  // waiter holds while it runs (a Python tensor's deleter needs the GIL).
  std::vector<std::shared_ptr<void>> release;
  {
    std::lock_guard lock(mutex_);
    release.swap(owners_);
  }
  release.clear();
  {
    std::lock_guard lock(mutex_);
    done_ = true;
    error_ = std::move(error);
  }
  done_cv_.notify_all();
}

void Work::wait(Milliseconds timeout) {
  SY_CHECK(valid(), "wait on an empty Work");
  if (!state_->wait(timeout))
    SY_THROW(TimeoutError, "Work::wait: ", state_->description(), " still running after ", timeout.count(), " ms");
}

}  // namespace switchyard
