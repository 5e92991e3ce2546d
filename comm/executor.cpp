#include "comm/executor.h"

#include <pthread.h>

#include "comm/spin.h"

namespace switchyard {

Executor::Executor(std::string name) : name_(std::move(name)) {
  thread_ = std::thread([this] { loop(); });
  // Thread names show in gdb and top; Linux allows 15 characters.
  pthread_setname_np(thread_.native_handle(), name_.substr(0, 15).c_str());
}

Executor::~Executor() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void Executor::post(std::function<void()> task) {
  {
    std::lock_guard lock(mutex_);
    queue_.push_back(std::move(task));
    queued_.fetch_add(1, std::memory_order_release);
  }
  cv_.notify_one();
}

void Executor::loop() {
  for (;;) {
    std::function<void()> task;
    spin_until([&] { return queued_.load(std::memory_order_acquire) > 0; });
    {
      std::unique_lock lock(mutex_);
      cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping and drained
      task = std::move(queue_.front());
      queue_.pop_front();
      queued_.fetch_sub(1, std::memory_order_relaxed);
    }
    task();  // tasks complete their own Work, errors included
  }
}

}  // namespace switchyard
