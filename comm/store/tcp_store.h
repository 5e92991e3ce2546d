// TcpStore: the key-value store over TCP (Boost.Asio), for processes started
// without MPI (torchrun-style MASTER_ADDR/MASTER_PORT). One process runs a
// TcpStoreServer; every rank (that one included) talks to it through a
// TcpStore client. Every connection must first present the job's token (the
// launcher sets SWITCHYARD_STORE_TOKEN); a wrong or missing token is refused
// with a clear error and the connection closed, while the server keeps serving
// the others. Connections that have not presented the token have a budget of
// their own (beyond it: "busy", which clients retry). Frames are
// length-prefixed; malformed, oversized or unfinished ones close that
// connection only. Refusals are counted and logged at most every 5 s.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "comm/store/memory_store.h"
#include "comm/store/store.h"

namespace switchyard {

inline constexpr uint32_t kTcpStoreMaxFrame = 64u << 20;  // bytes, request or reply

class TcpStoreServer {
 public:
  // Binds `host:port` (port 0: any free port, see port()); loopback unless a
  // host is given. Serves on background threads until destroyed.
  // A request's body must arrive within `frame_within` of its length (a frame
  // announced and never sent is dropped with its connection).
  TcpStoreServer(std::string token, uint16_t port = 0, const std::string& host = "127.0.0.1",
                 std::chrono::milliseconds frame_within = std::chrono::milliseconds(30000));
  ~TcpStoreServer();
  TcpStoreServer(const TcpStoreServer&) = delete;
  TcpStoreServer& operator=(const TcpStoreServer&) = delete;

  uint16_t port() const { return port_; }
  // Connections refused so far (bad token, malformed or oversized frames).
  int64_t refused() const { return refused_.load(); }

 private:
  struct Impl;
  void serve(std::shared_ptr<void> socket);
  void note_refusal(const std::string& why);
  std::unique_ptr<Impl> impl_;
  std::string token_;
  std::chrono::milliseconds frame_within_;
  uint16_t port_ = 0;
  MemoryStore data_;  // the values; waits block the serving connection's thread
  std::atomic<int64_t> refused_{0};
};

class TcpStore : public Store {
 public:
  // Connects to host:port, retrying until `connect_timeout` (the server may
  // start later), and presents `token`. Throws IoError naming the address when
  // nothing answers, TimeoutError when something accepts but never answers
  // (within connect_timeout, at most 10 s), InvalidArgument when the token is refused.
  TcpStore(const std::string& host, uint16_t port, std::string token,
           Milliseconds connect_timeout = Milliseconds(30000));
  ~TcpStore() override;

  void set(const std::string& key, const Bytes& value) override;
  Bytes get(const std::string& key, Milliseconds timeout) override;
  std::optional<Bytes> try_get(const std::string& key) override;
  int64_t add(const std::string& key, int64_t delta) override;
  Bytes compare_set(const std::string& key, const Bytes& expected, const Bytes& desired) override;
  void wait(const std::vector<std::string>& keys, Milliseconds timeout) override;
  bool check(const std::vector<std::string>& keys) override;
  bool erase(const std::string& key) override;

 private:
  struct Impl;
  // One request, one reply, on an idle connection or a new one.
  Bytes call(const Bytes& request, Milliseconds reply_within);
  struct Connection;
  std::unique_ptr<Connection> connect();  // and present the token (a busy server retried)
  std::unique_ptr<Connection> connect_once();
  std::unique_ptr<Impl> impl_;
  std::string address_;
  Milliseconds hello_within_;  // a server that accepts but never answers the token is given up on after this
  std::mutex mutex_;
};

}  // namespace switchyard
