// Store behaviour shared by every implementation, plus FileStore across processes.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <functional>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "comm/store/file_store.h"
#include "comm/store/memory_store.h"
#include "comm/store/tcp_store.h"
#include "core/error.h"

namespace switchyard {
namespace {

using namespace std::chrono_literals;
using Bytes = Store::Bytes;
using Clock = std::chrono::steady_clock;

// A fresh directory per test, removed afterwards.
class TempDir {
 public:
  TempDir() {
    std::string pattern = (std::filesystem::temp_directory_path() / "sy_store_XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

template <typename StoreType>
struct StoreMaker;

template <>
struct StoreMaker<MemoryStore> {
  std::unique_ptr<Store> make() { return std::make_unique<MemoryStore>(); }
};

template <>
struct StoreMaker<FileStore> {
  TempDir dir;
  std::unique_ptr<Store> make() { return std::make_unique<FileStore>(dir.path()); }
};

template <>
struct StoreMaker<TcpStore> {
  TcpStoreServer server{"test-token"};
  std::unique_ptr<Store> make() { return std::make_unique<TcpStore>("127.0.0.1", server.port(), "test-token"); }
};

template <typename StoreType>
class StoreTest : public ::testing::Test {
 protected:
  StoreMaker<StoreType> maker_;
  std::unique_ptr<Store> store_ = maker_.make();
};

using StoreTypes = ::testing::Types<MemoryStore, FileStore, TcpStore>;
TYPED_TEST_SUITE(StoreTest, StoreTypes);

template <typename Fn>
std::string message_of(Fn&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no exception)";
}

TYPED_TEST(StoreTest, SetGetRoundTripsBinaryAndEmptyValues) {
  Store& store = *this->store_;
  Bytes binary;
  for (int i = 0; i < 256; ++i) binary.push_back(static_cast<uint8_t>(i));
  binary.push_back(0);
  binary.push_back(0);
  store.set("binary", binary);
  store.set("empty", {});
  EXPECT_EQ(store.get("binary", 1s), binary);
  EXPECT_EQ(store.get("empty", 1s), Bytes{});
  ASSERT_TRUE(store.try_get("empty").has_value());
  EXPECT_TRUE(store.try_get("empty")->empty());
  EXPECT_FALSE(store.try_get("absent").has_value());

  store.set("binary", Store::to_bytes("overwritten"));
  EXPECT_EQ(Store::to_string(store.get("binary", 1s)), "overwritten");
}

TYPED_TEST(StoreTest, GetTimesOutNamingKeyAndTimeout) {
  Store& store = *this->store_;
  const auto start = Clock::now();
  EXPECT_THROW(store.get("never-set", 100ms), TimeoutError);
  const auto elapsed = Clock::now() - start;
  EXPECT_GE(elapsed, 100ms);
  EXPECT_LT(elapsed, 2s);

  const std::string message = message_of([&] { store.get("never-set", 10ms); });
  EXPECT_NE(message.find("never-set"), std::string::npos) << message;
  EXPECT_NE(message.find("10 ms"), std::string::npos) << message;
}

TYPED_TEST(StoreTest, GetWaitsForKeySetLaterByAnotherThread) {
  Store& store = *this->store_;
  std::thread setter([&] {
    std::this_thread::sleep_for(50ms);
    store.set("late", Store::to_bytes("arrived"));
  });
  const auto start = Clock::now();
  const Bytes value = store.get("late", 5s);
  const auto elapsed = Clock::now() - start;
  setter.join();
  EXPECT_EQ(Store::to_string(value), "arrived");
  EXPECT_GE(elapsed, 40ms);
  EXPECT_LT(elapsed, 2s);
}

TYPED_TEST(StoreTest, AddIsAtomicAcrossThreads) {
  Store& store = *this->store_;
  EXPECT_EQ(store.add("counter", 0), 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&] {
      for (int i = 0; i < 100; ++i) store.add("counter", 1);
    });
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(store.add("counter", 0), 400);
  EXPECT_EQ(Store::to_string(store.get("counter", 1s)), "400");
  EXPECT_EQ(store.add("counter", -450), -50);
  EXPECT_EQ(store.add("fresh", 7), 7);
}

TYPED_TEST(StoreTest, AddRejectsNonIntegerContent) {
  Store& store = *this->store_;
  store.set("text", Store::to_bytes("12abc"));
  EXPECT_THROW(store.add("text", 1), InvalidArgument);
  const std::string message = message_of([&] { store.add("text", 1); });
  EXPECT_NE(message.find("text"), std::string::npos) << message;
  EXPECT_NE(message.find("12abc"), std::string::npos) << message;
  EXPECT_EQ(Store::to_string(store.get("text", 1s)), "12abc");  // left unchanged

  store.set("max", Store::to_bytes(std::to_string(INT64_MAX)));
  EXPECT_THROW(store.add("max", 1), InvalidArgument);
}

TYPED_TEST(StoreTest, CompareSetSemantics) {
  Store& store = *this->store_;
  const Bytes first = Store::to_bytes("first");
  const Bytes second = Store::to_bytes("second");

  // An absent key matches an empty `expected`.
  EXPECT_EQ(store.compare_set("cas", {}, first), first);
  EXPECT_EQ(store.get("cas", 1s), first);

  // A mismatch returns the current value and changes nothing.
  EXPECT_EQ(store.compare_set("cas", Store::to_bytes("wrong"), second), first);
  EXPECT_EQ(store.get("cas", 1s), first);
  EXPECT_EQ(store.compare_set("cas", {}, second), first);

  EXPECT_EQ(store.compare_set("cas", first, second), second);
  EXPECT_EQ(store.get("cas", 1s), second);

  // An absent key does not match a non-empty `expected`: stays absent.
  EXPECT_EQ(store.compare_set("absent", first, second), Bytes{});
  EXPECT_FALSE(store.try_get("absent").has_value());
}

TYPED_TEST(StoreTest, WaitAndCheckMultipleKeys) {
  Store& store = *this->store_;
  const std::vector<std::string> keys = {"rank/0", "rank/1", "rank/2"};
  EXPECT_TRUE(store.check({}));
  EXPECT_FALSE(store.check(keys));
  store.set("rank/0", Store::to_bytes("a"));
  EXPECT_FALSE(store.check(keys));

  const std::string message = message_of([&] { store.wait(keys, 20ms); });
  EXPECT_NE(message.find("rank/1"), std::string::npos) << message;
  EXPECT_NE(message.find("rank/2"), std::string::npos) << message;
  EXPECT_EQ(message.find("rank/0"), std::string::npos) << message;
  EXPECT_NE(message.find("20 ms"), std::string::npos) << message;
  EXPECT_THROW(store.wait(keys, 20ms), TimeoutError);

  std::thread setter([&] {
    std::this_thread::sleep_for(20ms);
    store.set("rank/1", Store::to_bytes("b"));
    std::this_thread::sleep_for(20ms);
    store.set("rank/2", Store::to_bytes("c"));
  });
  store.wait(keys, 5s);
  setter.join();
  EXPECT_TRUE(store.check(keys));
}

TYPED_TEST(StoreTest, Erase) {
  Store& store = *this->store_;
  EXPECT_FALSE(store.erase("gone"));
  store.set("gone", Store::to_bytes("x"));
  EXPECT_TRUE(store.check({"gone"}));
  EXPECT_TRUE(store.erase("gone"));
  EXPECT_FALSE(store.check({"gone"}));
  EXPECT_FALSE(store.try_get("gone").has_value());
  EXPECT_FALSE(store.erase("gone"));
  EXPECT_EQ(store.add("gone", 3), 3);  // an erased counter starts again from 0
}

TYPED_TEST(StoreTest, KeysWithSlashesAndOddBytesAreDistinct) {
  Store& store = *this->store_;
  const std::vector<std::string> keys = {
      "a/b/c", "a%2Fb%2Fc", "../escape", "..", ".", "", " spaced key ", "A", "%41",
      std::string("nul\0inside", 10), "\xff\xfe\x01", "k.a", "tab\tnew\nline", ".lock",
      std::string(60, '/')};
  for (size_t i = 0; i < keys.size(); ++i) store.set(keys[i], Store::to_bytes(std::to_string(i)));
  for (size_t i = 0; i < keys.size(); ++i) {
    SCOPED_TRACE(i);
    EXPECT_EQ(Store::to_string(store.get(keys[i], 1s)), std::to_string(i));
  }
  EXPECT_TRUE(store.check(keys));
  EXPECT_TRUE(store.erase(std::string("nul\0inside", 10)));
  EXPECT_FALSE(store.try_get(std::string("nul\0inside", 10)).has_value());
  EXPECT_TRUE(store.try_get("nul").value_or(Bytes{}).empty());
  EXPECT_FALSE(store.check({"nul"}));
}

class FileStoreTest : public ::testing::Test {
 protected:
  TempDir dir_;
};

TEST_F(FileStoreTest, AddIsAtomicAcrossProcesses) {
  FileStore store(dir_.path());
  constexpr int kChildren = 3;
  constexpr int kAddsPerChild = 50;
  std::vector<pid_t> children;
  for (int c = 0; c < kChildren; ++c) {
    const pid_t pid = ::fork();
    ASSERT_GE(pid, 0) << "fork failed";
    if (pid == 0) {
      // The child must never return into gtest; _exit skips its teardown.
      int status = 0;
      try {
        for (int i = 0; i < kAddsPerChild; ++i) store.add("shared", 1);
      } catch (...) {
        status = 1;
      }
      ::_exit(status);
    }
    children.push_back(pid);
  }
  for (const pid_t pid : children) {
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child status " << status;
  }
  EXPECT_EQ(store.add("shared", 0), kChildren * kAddsPerChild);
}

TEST_F(FileStoreTest, SharesValuesBetweenInstancesOnOneDirectory) {
  FileStore writer(dir_.path());
  FileStore reader(dir_.path());
  writer.set("id", Store::to_bytes("abc"));
  EXPECT_EQ(Store::to_string(reader.get("id", 1s)), "abc");
}

TEST_F(FileStoreTest, CreatesMissingDirectories) {
  const std::string nested = dir_.path() + "/x/y/z";
  FileStore store(nested);
  store.set("key", Store::to_bytes("v"));
  EXPECT_TRUE(std::filesystem::is_directory(nested));
}

TEST_F(FileStoreTest, UnusableDirectoryIsIoErrorNamingPath) {
  const std::string file = dir_.path() + "/plain_file";
  std::ofstream(file) << "not a directory";
  const std::string message = message_of([&] { FileStore store(file + "/sub"); });
  EXPECT_NE(message.find(file), std::string::npos) << message;
  EXPECT_THROW(FileStore store(file + "/sub"), IoError);
  EXPECT_THROW(FileStore store(file), IoError);
}

TEST_F(FileStoreTest, OverlongKeyIsInvalidArgument) {
  FileStore store(dir_.path());
  EXPECT_THROW(store.set(std::string(300, 'k'), {}), InvalidArgument);
}

}  // namespace
}  // namespace switchyard

namespace switchyard {
namespace {

// A raw TCP connection to the server, for sending what no client would.
int raw_connect(uint16_t port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

// Reads until the server closes the connection (bounded), so the refusal has
// been processed before the test looks at the counters.
void drain(int fd) {
  timeval tv{2, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  char buf[256];
  while (::recv(fd, buf, sizeof buf, 0) > 0) {
  }
  ::close(fd);
}

TEST(TcpStore, AWrongTokenIsRefusedClearlyAndOthersAreStillServed) {
  TcpStoreServer server("right");
  TcpStore good("127.0.0.1", server.port(), "right");
  good.set("k", Store::to_bytes("v"));
  const std::string message = message_of([&] { TcpStore bad("127.0.0.1", server.port(), "wrong"); });
  EXPECT_NE(message.find("refused this process's token: SWITCHYARD_STORE_TOKEN"), std::string::npos) << message;
  EXPECT_THROW(TcpStore("127.0.0.1", server.port(), ""), InvalidArgument);
  EXPECT_EQ(server.refused(), 2);
  EXPECT_EQ(Store::to_string(good.get("k", 1s)), "v");
}

TEST(TcpStore, GarbageAndOversizedFramesDropOnlyThatConnection) {
  TcpStoreServer server("t");
  TcpStore client("127.0.0.1", server.port(), "t");
  client.set("alive", Store::to_bytes("yes"));
  {  // random bytes where the hello frame should be
    const int fd = raw_connect(server.port());
    ASSERT_GE(fd, 0);
    const char junk[] = "\x07\x00\x00\x00GARBAGE!!";
    ASSERT_GT(::send(fd, junk, sizeof junk, 0), 0);
    drain(fd);
  }
  {  // a length prefix far over the limit
    const int fd = raw_connect(server.port());
    ASSERT_GE(fd, 0);
    const uint32_t huge = 0xfffffff0u;
    ASSERT_EQ(::send(fd, &huge, 4, 0), 4);
    drain(fd);
  }
  {  // a valid hello, then a truncated set whose string length overruns the frame
    const int fd = raw_connect(server.port());
    ASSERT_GE(fd, 0);
    std::vector<uint8_t> hello = {10, 0, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0, 't'};
    ASSERT_EQ(::send(fd, hello.data(), hello.size(), 0), static_cast<ssize_t>(hello.size()));
    std::vector<uint8_t> bad = {5, 0, 0, 0, 2, 0xff, 0xff, 0, 0};
    ASSERT_EQ(::send(fd, bad.data(), bad.size(), 0), static_cast<ssize_t>(bad.size()));
    drain(fd);
  }
  {  // a client that connects and vanishes
    const int fd = raw_connect(server.port());
    ASSERT_GE(fd, 0);
    ::close(fd);
  }
  EXPECT_GE(server.refused(), 3);
  EXPECT_EQ(Store::to_string(client.get("alive", 1s)), "yes");
  TcpStore later("127.0.0.1", server.port(), "t");
  EXPECT_EQ(later.add("n", 2), 2);
}

size_t open_descriptors() {
  size_t n = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator("/proc/self/fd")) ++n;
  return n;
}

// Before: a refused hello returned without closing, so each wrong-token
// connection kept a descriptor and one of the 4,096 slots for the life of the
// store, and 4,200 of them locked a real job out.
TEST(TcpStore, RefusedConnectionsAreClosedAndNeverUseUpTheSlots) {
  TcpStoreServer server("right");
  const size_t before = open_descriptors();
  std::vector<uint8_t> hello = {14, 0, 0, 0, 1, 1, 0, 0, 0, 5, 0, 0, 0, 'w', 'r', 'o', 'n', 'g'};
  for (int i = 0; i < 4200; ++i) {
    const int fd = raw_connect(server.port());
    ASSERT_GE(fd, 0) << "connection " << i;
    ASSERT_EQ(::send(fd, hello.data(), hello.size(), 0), static_cast<ssize_t>(hello.size()));
    const auto start = std::chrono::steady_clock::now();
    drain(fd);  // the server answers and closes
    ASSERT_LT(std::chrono::steady_clock::now() - start, 1s) << "the server kept refused connection " << i << " open";
  }
  std::this_thread::sleep_for(100ms);
  EXPECT_LT(open_descriptors(), before + 16);  // nothing kept on the server's side
  EXPECT_EQ(server.refused(), 4200);
  TcpStore good("127.0.0.1", server.port(), "right", 2000ms);
  good.set("k", Store::to_bytes("v"));
  EXPECT_EQ(Store::to_string(good.get("k", 1s)), "v");
}

// 512 connections that never say hello fill the strangers' budget: the next
// one is told "busy" and closed (counted), and a real client retries that
// until a slot frees, then is served.
TEST(TcpStore, ABusyServerIsRetriedUntilASlotFrees) {
  // 512 client and 512 server descriptors in this process: beyond a 1024 soft limit.
  rlimit files{};
  ::getrlimit(RLIMIT_NOFILE, &files);
  if (files.rlim_cur < 1400 && files.rlim_max >= 1400) {
    files.rlim_cur = files.rlim_max;
    ::setrlimit(RLIMIT_NOFILE, &files);
  }
  ::getrlimit(RLIMIT_NOFILE, &files);
  if (files.rlim_cur < 1400) GTEST_SKIP() << "needs 1400 descriptors; the limit is " << files.rlim_cur;
  TcpStoreServer server("right");
  std::vector<int> silent;
  for (int i = 0; i < 512; ++i) {
    const int fd = raw_connect(server.port());
    ASSERT_GE(fd, 0) << "connection " << i;
    silent.push_back(fd);
  }
  std::this_thread::sleep_for(200ms);  // the server has taken them all
  const int extra = raw_connect(server.port());
  ASSERT_GE(extra, 0);
  timeval tv{3, 0};
  ::setsockopt(extra, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  std::string reply;
  char buf[256];
  for (ssize_t n; (n = ::recv(extra, buf, sizeof buf, 0)) > 0;) reply.append(buf, static_cast<size_t>(n));
  ::close(extra);
  EXPECT_NE(reply.find("busy"), std::string::npos) << "reply: '" << reply << "'";
  const int64_t refused_before = server.refused();
  EXPECT_GE(refused_before, 1);
  std::thread freer([&] {
    std::this_thread::sleep_for(300ms);
    for (int fd : silent) ::close(fd);
  });
  const auto start = std::chrono::steady_clock::now();
  TcpStore good("127.0.0.1", server.port(), "right", 5000ms);  // retries "busy" meanwhile
  good.set("k", Store::to_bytes("v"));
  EXPECT_EQ(Store::to_string(good.get("k", 1s)), "v");
  freer.join();
  EXPECT_GE(std::chrono::steady_clock::now() - start, 250ms) << "the client got in while the budget was full";
}

// An authenticated client that announces a frame and never sends it: dropped
// at the frame deadline instead of holding its buffer forever.
TEST(TcpStore, AFrameAnnouncedAndNeverSentIsDropped) {
  TcpStoreServer server("t", 0, "127.0.0.1", 300ms);
  const int fd = raw_connect(server.port());
  ASSERT_GE(fd, 0);
  std::vector<uint8_t> hello = {10, 0, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0, 't'};
  ASSERT_EQ(::send(fd, hello.data(), hello.size(), 0), static_cast<ssize_t>(hello.size()));
  uint8_t ok[5];
  ASSERT_EQ(::recv(fd, ok, sizeof ok, MSG_WAITALL), 5);
  EXPECT_EQ(ok[4], 0);  // the hello was accepted
  const uint32_t announced = (64u << 20) - 1;
  ASSERT_EQ(::send(fd, &announced, 4, 0), 4);
  const auto start = std::chrono::steady_clock::now();
  timeval tv{5, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  char buf[256];
  while (::recv(fd, buf, sizeof buf, 0) > 0) {
  }
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ::close(fd);
  EXPECT_GE(waited, 0.25);
  EXPECT_LT(waited, 3.0) << "the unfinished frame was not dropped";
  EXPECT_GE(server.refused(), 1);
}

TEST(TcpStore, NothingListeningIsAnIoErrorNamingTheAddress) {
  uint16_t port = 0;
  {
    TcpStoreServer gone("t");
    port = gone.port();
  }
  const std::string message = message_of([&] { TcpStore s("127.0.0.1", port, "t", 200ms); });
  EXPECT_NE(message.find("nothing answers at 127.0.0.1:" + std::to_string(port)), std::string::npos) << message;
  EXPECT_NE(message.find("check SWITCHYARD_STORE"), std::string::npos) << message;
  EXPECT_NE(message_of([] { TcpStoreServer s("t", 0, "not-an-ip"); }).find("host 'not-an-ip' is not an IP address"),
            std::string::npos);
}

// Something listens but never answers (a stopped launcher): the client gives
// up within its timeout instead of hanging.
TEST(TcpStore, ASilentServerIsATimeoutNotAHang) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  ASSERT_EQ(::listen(fd, 8), 0);  // the kernel completes connections; nobody ever reads
  socklen_t len = sizeof addr;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  const auto start = Clock::now();
  const std::string message = message_of([&] { TcpStore s("127.0.0.1", ntohs(addr.sin_port), "t", 300ms); });
  EXPECT_LT(Clock::now() - start, 3s);
  EXPECT_NE(message.find("no reply within 300 ms"), std::string::npos) << message;
  ::close(fd);
}

TEST(TcpStore, ProcessesRendezvousThroughTheServer) {
  TcpStoreServer server("job");
  constexpr int kChildren = 3;
  std::vector<pid_t> pids;
  for (int c = 0; c < kChildren; ++c) {
    const pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      int code = 0;
      try {
        TcpStore s("127.0.0.1", server.port(), "job");
        s.set("rank" + std::to_string(c), Store::to_bytes(std::to_string(c * 10)));
        for (int i = 0; i < 50; ++i) s.add("count", 1);
        s.wait({"go"}, 10s);
      } catch (...) {
        code = 1;
      }
      ::_exit(code);
    }
    pids.push_back(pid);
  }
  TcpStore parent("127.0.0.1", server.port(), "job");
  parent.wait({"rank0", "rank1", "rank2"}, 10s);
  EXPECT_EQ(Store::to_string(parent.get("rank2", 1s)), "20");
  parent.set("go", {});
  for (pid_t pid : pids) {
    int status = 0;
    ::waitpid(pid, &status, 0);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  }
  EXPECT_EQ(parent.add("count", 0), 50 * kChildren);
}

}  // namespace
}  // namespace switchyard
