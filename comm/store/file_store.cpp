#include "comm/store/file_store.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <random>
#include <thread>

#include "comm/store/store_util.h"
#include "core/error.h"

namespace switchyard {
using store_util::deadline_after;
using store_util::parse_counter;
using store_util::printable;
namespace {

using Clock = std::chrono::steady_clock;

// Most file systems limit one name to 255 bytes; the temp-name suffix needs the rest.
constexpr size_t kMaxFileNameBytes = 200;
constexpr const char* kKeyFilePrefix = "k.";
constexpr const char* kLockFileName = ".lock";

std::string percent_encode(const std::string& key) {
  static const char* const kHex = "0123456789ABCDEF";
  std::string out;
  for (const char ch : key) {
    const auto c = static_cast<unsigned char>(ch);
    const bool kept = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                      (c >= '0' && c <= '9') || c == '_' || c == '-' || c == '.';
    if (kept) {
      out += ch;
    } else {
      out += '%';
      out += kHex[c >> 4];
      out += kHex[c & 0xf];
    }
  }
  return out;
}

[[noreturn]] void throw_io(const char* operation, const std::string& path, int error_number) {
  SY_THROW(IoError, "FileStore: ", operation, " '", path, "' failed: ", std::strerror(error_number));
}

// Closes the descriptor on every path out, exceptions included.
class FileDescriptor {
 public:
  explicit FileDescriptor(int fd) : fd_(fd) {}
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;
  ~FileDescriptor() {
    if (fd_ >= 0) ::close(fd_);
  }
  int get() const { return fd_; }

 private:
  int fd_;
};

// Exclusive flock() on the directory's lock file for one change. The file is opened
// anew each time: flock() belongs to the open file description, so a descriptor
// shared with threads or inherited by fork() children would not exclude them.
class DirectoryLock {
 public:
  explicit DirectoryLock(const std::string& lock_path)
      : fd_(::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644)) {
    if (fd_.get() < 0) throw_io("open", lock_path, errno);
    while (::flock(fd_.get(), LOCK_EX) != 0) {
      if (errno != EINTR) throw_io("flock", lock_path, errno);
    }
  }
  // Closing the descriptor releases the lock.

 private:
  FileDescriptor fd_;
};

// Unique among threads (counter), processes on a host (pid) and hosts (random nonce).
std::string temp_file_name() {
  static std::atomic<uint64_t> counter{0};
  static const uint64_t nonce = std::random_device{}();
  return detail::make_string(".tmp.", ::getpid(), ".", nonce, ".", counter.fetch_add(1));
}

// Sleeps 1 ms at first and up to 5 ms, never past the deadline.
class PollBackoff {
 public:
  explicit PollBackoff(Clock::time_point deadline) : deadline_(deadline) {}
  // Returns false once the deadline has passed.
  bool sleep() {
    const auto now = Clock::now();
    if (now >= deadline_) return false;
    std::this_thread::sleep_for(std::min<Clock::duration>(delay_, deadline_ - now));
    delay_ = std::min(delay_ * 3 / 2, std::chrono::microseconds(5000));
    return true;
  }

 private:
  Clock::time_point deadline_;
  std::chrono::microseconds delay_{1000};
};

}  // namespace

FileStore::FileStore(std::string directory) : directory_(std::move(directory)) {
  SY_CHECK(!directory_.empty(), "FileStore needs a directory");
  std::error_code error;
  std::filesystem::create_directories(directory_, error);
  if (error) throw_io("create directory", directory_, error.value());
  struct stat info {};
  if (::stat(directory_.c_str(), &info) != 0) throw_io("stat", directory_, errno);
  if (!S_ISDIR(info.st_mode)) throw_io("use as directory", directory_, ENOTDIR);
}

std::string FileStore::path_of(const std::string& key) const {
  const std::string name = kKeyFilePrefix + percent_encode(key);
  if (name.size() > kMaxFileNameBytes)
    SY_THROW(InvalidArgument, "FileStore: key '", printable(key), "' is too long (", key.size(),
             " bytes; its file name would have ", name.size(), ", at most ", kMaxFileNameBytes,
             " allowed)");
  return directory_ + "/" + name;
}

std::optional<Store::Bytes> FileStore::read_value(const std::string& key) const {
  const std::string path = path_of(key);
  FileDescriptor fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) {
    if (errno == ENOENT) return std::nullopt;
    throw_io("open", path, errno);
  }
  struct stat info {};
  if (::fstat(fd.get(), &info) != 0) throw_io("stat", path, errno);
  // Files are replaced whole, never grown in place, so the size seen here is final.
  Bytes value(static_cast<size_t>(info.st_size));
  size_t done = 0;
  while (done < value.size()) {
    const ssize_t n = ::read(fd.get(), value.data() + done, value.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw_io("read", path, errno);
    if (n == 0) SY_THROW(IoError, "FileStore: read '", path, "' ended early at ", done, " of ",
                         value.size(), " bytes");
    done += static_cast<size_t>(n);
  }
  return value;
}

void FileStore::write_value(const std::string& key, const Bytes& value) const {
  const std::string path = path_of(key);
  const std::string temp_path = directory_ + "/" + temp_file_name();
  {
    FileDescriptor fd(::open(temp_path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644));
    if (fd.get() < 0) throw_io("create", temp_path, errno);
    size_t done = 0;
    while (done < value.size()) {
      const ssize_t n = ::write(fd.get(), value.data() + done, value.size() - done);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        const int saved = errno;
        ::unlink(temp_path.c_str());
        throw_io("write", temp_path, saved);
      }
      done += static_cast<size_t>(n);
    }
  }
  if (::rename(temp_path.c_str(), path.c_str()) != 0) {
    const int saved = errno;
    ::unlink(temp_path.c_str());
    throw_io(("rename '" + temp_path + "' to").c_str(), path, saved);
  }
}

bool FileStore::exists(const std::string& key) const {
  const std::string path = path_of(key);
  struct stat info {};
  if (::stat(path.c_str(), &info) == 0) return true;
  if (errno == ENOENT) return false;
  throw_io("stat", path, errno);
}

// set() and erase() lock too: otherwise one could land between the read and the
// write of an add() and be silently lost.
void FileStore::set(const std::string& key, const Bytes& value) {
  const DirectoryLock lock(directory_ + "/" + kLockFileName);
  write_value(key, value);
}

Store::Bytes FileStore::get(const std::string& key, Milliseconds timeout) {
  PollBackoff backoff(deadline_after(timeout));
  do {
    if (auto value = read_value(key)) return std::move(*value);
  } while (backoff.sleep());
  // One last look: the key may have arrived during the final sleep.
  if (auto value = read_value(key)) return std::move(*value);
  SY_THROW(TimeoutError, "FileStore::get: key '", printable(key), "' not set within ",
           timeout.count(), " ms (directory '", directory_, "')");
}

std::optional<Store::Bytes> FileStore::try_get(const std::string& key) { return read_value(key); }

int64_t FileStore::add(const std::string& key, int64_t delta) {
  const DirectoryLock lock(directory_ + "/" + kLockFileName);
  const auto stored = read_value(key);
  const int64_t current = stored ? parse_counter("FileStore", key, *stored) : 0;
  int64_t updated = 0;
  if (__builtin_add_overflow(current, delta, &updated))
    SY_THROW(InvalidArgument, "FileStore::add: key '", printable(key), "' overflows: ", current,
             " + ", delta);
  write_value(key, to_bytes(std::to_string(updated)));
  return updated;
}

Store::Bytes FileStore::compare_set(const std::string& key, const Bytes& expected,
                                    const Bytes& desired) {
  const DirectoryLock lock(directory_ + "/" + kLockFileName);
  const auto stored = read_value(key);
  const bool matches = stored ? *stored == expected : expected.empty();
  if (!matches) return stored.value_or(Bytes{});
  write_value(key, desired);
  return desired;
}

void FileStore::wait(const std::vector<std::string>& keys, Milliseconds timeout) {
  PollBackoff backoff(deadline_after(timeout));
  do {
    if (check(keys)) return;
  } while (backoff.sleep());
  std::string missing;
  size_t missing_count = 0;
  for (const auto& key : keys) {
    if (exists(key)) continue;
    missing += (missing_count++ == 0 ? "'" : ", '") + printable(key) + "'";
  }
  if (missing_count == 0) return;  // the last ones arrived during the final sleep
  SY_THROW(TimeoutError, "FileStore::wait: ", missing_count, " of ", keys.size(),
           " keys not set within ", timeout.count(), " ms (directory '", directory_, "'): ",
           missing);
}

bool FileStore::check(const std::vector<std::string>& keys) {
  return std::all_of(keys.begin(), keys.end(), [&](const std::string& key) { return exists(key); });
}

bool FileStore::erase(const std::string& key) {
  const DirectoryLock lock(directory_ + "/" + kLockFileName);
  const std::string path = path_of(key);
  if (::unlink(path.c_str()) == 0) return true;
  if (errno == ENOENT) return false;
  throw_io("unlink", path, errno);
}

}  // namespace switchyard
