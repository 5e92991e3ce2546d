// The FIFO executor of a communicator: one progress thread that runs every op
// in issue order, so ops match across ranks and overlap the caller's compute.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

namespace switchyard {

class Executor {
 public:
  explicit Executor(std::string name);
  ~Executor();  // runs what is queued, then joins
  Executor(const Executor&) = delete;
  Executor& operator=(const Executor&) = delete;

  void post(std::function<void()> task);
  bool on_executor_thread() const { return std::this_thread::get_id() == thread_.get_id(); }

 private:
  void loop();
  std::string name_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  std::atomic<size_t> queued_{0};  // queue_.size(), polled without the mutex before sleeping
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace switchyard
