#include "comm/store/memory_store.h"

#include <charconv>
#include <chrono>

#include "comm/store/store_util.h"
#include "core/error.h"

namespace switchyard {
using store_util::deadline_after;
using store_util::parse_counter;
using store_util::printable;
void MemoryStore::set(const std::string& key, const Bytes& value) {
  {
    std::lock_guard lock(mutex_);
    values_[key] = value;
  }
  changed_.notify_all();
}

Store::Bytes MemoryStore::get(const std::string& key, Milliseconds timeout) {
  std::unique_lock lock(mutex_);
  const bool found = changed_.wait_until(lock, deadline_after(timeout),
                                         [&] { return interrupted_ || values_.count(key) != 0; });
  if (interrupted_ && !values_.count(key)) SY_THROW(IoError, "MemoryStore::get: the store is shutting down");
  if (!found)
    SY_THROW(TimeoutError, "MemoryStore::get: key '", printable(key), "' not set within ",
             timeout.count(), " ms");
  return values_.at(key);
}

std::optional<Store::Bytes> MemoryStore::try_get(const std::string& key) {
  std::lock_guard lock(mutex_);
  const auto it = values_.find(key);
  if (it == values_.end()) return std::nullopt;
  return it->second;
}

int64_t MemoryStore::add(const std::string& key, int64_t delta) {
  int64_t updated = 0;
  {
    std::lock_guard lock(mutex_);
    const auto it = values_.find(key);
    const int64_t current = it == values_.end() ? 0 : parse_counter("MemoryStore", key, it->second);
    if (__builtin_add_overflow(current, delta, &updated))
      SY_THROW(InvalidArgument, "MemoryStore::add: key '", printable(key), "' overflows: ",
               current, " + ", delta);
    values_[key] = to_bytes(std::to_string(updated));
  }
  changed_.notify_all();
  return updated;
}

Store::Bytes MemoryStore::compare_set(const std::string& key, const Bytes& expected,
                                      const Bytes& desired) {
  std::unique_lock lock(mutex_);
  const auto it = values_.find(key);
  const bool matches = it == values_.end() ? expected.empty() : it->second == expected;
  if (!matches) return it == values_.end() ? Bytes{} : it->second;
  values_[key] = desired;
  lock.unlock();
  changed_.notify_all();
  return desired;
}

void MemoryStore::wait(const std::vector<std::string>& keys, Milliseconds timeout) {
  std::unique_lock lock(mutex_);
  if (changed_.wait_until(lock, deadline_after(timeout), [&] { return interrupted_ || has_all_locked(keys); })) {
    if (!has_all_locked(keys)) SY_THROW(IoError, "MemoryStore::wait: the store is shutting down");
    return;
  }
  std::string missing;
  size_t missing_count = 0;
  for (const auto& key : keys) {
    if (values_.count(key) != 0) continue;
    missing += (missing_count++ == 0 ? "'" : ", '") + printable(key) + "'";
  }
  SY_THROW(TimeoutError, "MemoryStore::wait: ", missing_count, " of ", keys.size(),
           " keys not set within ", timeout.count(), " ms: ", missing);
}

bool MemoryStore::check(const std::vector<std::string>& keys) {
  std::lock_guard lock(mutex_);
  return has_all_locked(keys);
}

bool MemoryStore::erase(const std::string& key) {
  std::lock_guard lock(mutex_);
  return values_.erase(key) != 0;
}

bool MemoryStore::has_all_locked(const std::vector<std::string>& keys) const {
  for (const auto& key : keys)
    if (values_.count(key) == 0) return false;
  return true;
}

}  // namespace switchyard

namespace switchyard {
void MemoryStore::interrupt_waits() {
  {
    std::lock_guard lock(mutex_);
    interrupted_ = true;
  }
  changed_.notify_all();
}
}  // namespace switchyard
