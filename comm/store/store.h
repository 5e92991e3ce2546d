// Key-value store used to bootstrap communicators (rank rendezvous, ids).
// Implementations: MemoryStore (threads of one process), FileStore (processes
// sharing a file system), TcpStore (processes anywhere; comm/store/tcp_store.h).
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace switchyard {

class Store {
 public:
  using Bytes = std::vector<uint8_t>;
  using Milliseconds = std::chrono::milliseconds;
  virtual ~Store() = default;

  virtual void set(const std::string& key, const Bytes& value) = 0;
  // Waits until the key exists; TimeoutError naming the key after `timeout`.
  virtual Bytes get(const std::string& key, Milliseconds timeout) = 0;
  virtual std::optional<Bytes> try_get(const std::string& key) = 0;
  // Atomically adds `delta` to the integer stored at key (absent = 0); returns the new value.
  virtual int64_t add(const std::string& key, int64_t delta) = 0;
  // Sets key to `desired` if its value equals `expected` (an absent key matches an
  // empty `expected`); returns the value after the call.
  virtual Bytes compare_set(const std::string& key, const Bytes& expected, const Bytes& desired) = 0;
  // Waits until all keys exist; TimeoutError naming the missing keys.
  virtual void wait(const std::vector<std::string>& keys, Milliseconds timeout) = 0;
  virtual bool check(const std::vector<std::string>& keys) = 0;
  virtual bool erase(const std::string& key) = 0;

  static Bytes to_bytes(const std::string& s) { return Bytes(s.begin(), s.end()); }
  static std::string to_string(const Bytes& b) { return std::string(b.begin(), b.end()); }
};

}  // namespace switchyard
