// Store behaviour shared by every implementation, plus FileStore across processes.
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "comm/store/file_store.h"
#include "comm/store/memory_store.h"
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

template <typename StoreType>
class StoreTest : public ::testing::Test {
 protected:
  StoreMaker<StoreType> maker_;
  std::unique_ptr<Store> store_ = maker_.make();
};

using StoreTypes = ::testing::Types<MemoryStore, FileStore>;
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
