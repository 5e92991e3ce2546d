// Store for ranks that are threads of one process (the threads backend and tests).
#pragma once

#include <condition_variable>
#include <map>
#include <mutex>

#include "comm/store/store.h"

namespace switchyard {

class MemoryStore : public Store {
 public:
  void set(const std::string& key, const Bytes& value) override;
  Bytes get(const std::string& key, Milliseconds timeout) override;
  std::optional<Bytes> try_get(const std::string& key) override;
  int64_t add(const std::string& key, int64_t delta) override;
  Bytes compare_set(const std::string& key, const Bytes& expected, const Bytes& desired) override;
  void wait(const std::vector<std::string>& keys, Milliseconds timeout) override;
  bool check(const std::vector<std::string>& keys) override;
  bool erase(const std::string& key) override;
  // Every blocked and later get/wait of a missing key throws IoError at once
  // (a server shutting down).
  void interrupt_waits();

 private:
  bool has_all_locked(const std::vector<std::string>& keys) const;

  std::mutex mutex_;
  // Notified on every change, so waiters re-check their keys.
  std::condition_variable changed_;
  std::map<std::string, Bytes> values_;
  bool interrupted_ = false;
};

}  // namespace switchyard
