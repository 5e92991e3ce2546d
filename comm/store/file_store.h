// Store for processes that share a directory (one host, or a network file system
// with working flock(), as NFSv4 and Lustre have).
//
// Each key is one file, named "k." + the key percent-encoded (bytes outside
// [A-Za-z0-9_.-] become %XX), so keys may hold '/' and any byte. Writers replace
// a file by renaming a complete temporary one over it, so readers never see a
// partial value and need no lock. Every change holds flock() on the directory's
// ".lock" file, which makes add() and compare_set() atomic across processes.
// Assumes a case-sensitive file system ("A" and "a" are different files).
#pragma once

#include "comm/store/store.h"

namespace switchyard {

class FileStore : public Store {
 public:
  // Creates `directory` (and its parents) if missing; IoError if that fails.
  explicit FileStore(std::string directory);

  const std::string& directory() const { return directory_; }

  void set(const std::string& key, const Bytes& value) override;
  Bytes get(const std::string& key, Milliseconds timeout) override;
  std::optional<Bytes> try_get(const std::string& key) override;
  int64_t add(const std::string& key, int64_t delta) override;
  Bytes compare_set(const std::string& key, const Bytes& expected, const Bytes& desired) override;
  void wait(const std::vector<std::string>& keys, Milliseconds timeout) override;
  bool check(const std::vector<std::string>& keys) override;
  bool erase(const std::string& key) override;

 private:
  std::string path_of(const std::string& key) const;
  std::optional<Bytes> read_value(const std::string& key) const;
  void write_value(const std::string& key, const Bytes& value) const;
  bool exists(const std::string& key) const;

  std::string directory_;
};

}  // namespace switchyard
