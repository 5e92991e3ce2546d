#include "comm/store/tcp_store.h"

#include <sys/socket.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/time.h>

#include <utility>  // boost 1.74 asio uses std::exchange without including it

#include <boost/asio.hpp>
#include <cstring>
#include <list>

#include "core/error.h"
#include "core/logging.h"

namespace switchyard {
namespace asio = boost::asio;
using tcp = asio::ip::tcp;

namespace {

enum class Op : uint8_t { hello = 1, set, get, try_get, add, compare_set, wait, check, erase };
enum class Status : uint8_t { ok = 0, timeout = 1, error = 2, invalid = 3 };
constexpr uint32_t kProtocolVersion = 1;

// Little-endian fields: u8, u32, i64, and strings/byte strings as u32 length + bytes.
class Writer {
 public:
  Writer& u8(uint8_t v) { bytes_.push_back(v); return *this; }
  Writer& u32(uint32_t v) { return raw(&v, 4); }
  Writer& i64(int64_t v) { return raw(&v, 8); }
  Writer& bytes(const Store::Bytes& b) { u32(static_cast<uint32_t>(b.size())); return raw(b.data(), b.size()); }
  Writer& str(const std::string& s) { u32(static_cast<uint32_t>(s.size())); return raw(s.data(), s.size()); }
  Writer& strs(const std::vector<std::string>& v) {
    u32(static_cast<uint32_t>(v.size()));
    for (const auto& s : v) str(s);
    return *this;
  }
  // The frame: u32 length of what follows, then the fields.
  Store::Bytes frame() const {
    Store::Bytes out(4 + bytes_.size());
    const auto n = static_cast<uint32_t>(bytes_.size());
    std::memcpy(out.data(), &n, 4);
    if (!bytes_.empty()) std::memcpy(out.data() + 4, bytes_.data(), bytes_.size());
    return out;
  }

 private:
  Writer& raw(const void* p, size_t n) {
    const auto* c = static_cast<const uint8_t*>(p);
    bytes_.insert(bytes_.end(), c, c + n);
    return *this;
  }
  Store::Bytes bytes_;
};

// Reads fields back; any overrun is a malformed frame (IoError).
class Reader {
 public:
  explicit Reader(const Store::Bytes& b) : b_(b) {}
  uint8_t u8() { uint8_t v; raw(&v, 1); return v; }
  uint32_t u32() { uint32_t v; raw(&v, 4); return v; }
  int64_t i64() { int64_t v; raw(&v, 8); return v; }
  Store::Bytes bytes() {
    const uint32_t n = u32();
    need(n);
    Store::Bytes out(b_.begin() + static_cast<ptrdiff_t>(at_), b_.begin() + static_cast<ptrdiff_t>(at_ + n));
    at_ += n;
    return out;
  }
  std::string str() { const Store::Bytes b = bytes(); return std::string(b.begin(), b.end()); }
  std::vector<std::string> strs() {
    const uint32_t n = u32();
    if (n > b_.size()) SY_THROW(IoError, "malformed store frame: a list of ", n, " strings in ", b_.size(), " bytes");
    std::vector<std::string> out;
    for (uint32_t i = 0; i < n; ++i) out.push_back(str());
    return out;
  }
  void done() const {
    if (at_ != b_.size()) SY_THROW(IoError, "malformed store frame: ", b_.size() - at_, " bytes left over");
  }

 private:
  void need(size_t n) const {
    if (at_ + n > b_.size())
      SY_THROW(IoError, "malformed store frame: field of ", n, " bytes at offset ", at_, " of ", b_.size());
  }
  void raw(void* p, size_t n) {
    need(n);
    std::memcpy(p, b_.data() + at_, n);
    at_ += n;
  }
  const Store::Bytes& b_;
  size_t at_ = 0;
};

// Reads exactly n bytes, waiting for each chunk with poll() so a silent peer
// ends at `deadline` (Asio's blocking read ignores socket timeouts).
void read_exact(tcp::socket& s, void* data, size_t n, std::chrono::steady_clock::time_point deadline) {
  auto* p = static_cast<uint8_t*>(data);
  while (n > 0) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) throw boost::system::system_error(asio::error::timed_out);
    pollfd fd{s.native_handle(), POLLIN, 0};
    const int ready = ::poll(&fd, 1, static_cast<int>(std::min<int64_t>(left.count(), 1 << 30)));
    if (ready < 0 && errno == EINTR) continue;
    if (ready <= 0) continue;  // re-check the deadline
    boost::system::error_code ec;
    const size_t got = s.read_some(asio::buffer(p, n), ec);
    if (ec) throw boost::system::system_error(ec);
    p += got;
    n -= got;
  }
}

// A whole frame of at most `limit` bytes; IoError when oversized or cut short.
// The body must follow its length within `body_within` (also when the length
// may wait until `deadline`): a frame announced and never sent is dropped
// instead of holding its buffer for the life of the connection.
Store::Bytes read_frame(tcp::socket& s, std::chrono::steady_clock::time_point deadline, uint32_t limit = kTcpStoreMaxFrame,
                        std::chrono::milliseconds body_within = std::chrono::milliseconds(30000)) {
  uint32_t n = 0;
  read_exact(s, &n, 4, deadline);
  if (n > limit) SY_THROW(IoError, "store frame of ", n, " bytes exceeds the limit of ", limit);
  Store::Bytes body(n);
  if (n) read_exact(s, body.data(), n, std::min(deadline, std::chrono::steady_clock::now() + body_within));
  return body;
}

constexpr auto kForever = std::chrono::steady_clock::time_point::max();
constexpr uint32_t kHelloLimit = 4096;                       // before the token is checked
constexpr std::chrono::milliseconds kHelloWithin{10000};     // a connection must present it this soon
constexpr int kMaxConnections = 4096;
// Connections that have not presented the token yet have a budget of their own, so
// strangers cannot take the slots the job's ranks need (a refused one is closed at once).
constexpr int kMaxUnauthenticated = 512;
constexpr const char* kBusy = "busy: too many connections have not presented a token; retry";

void close_on_exec(int fd) { ::fcntl(fd, F_SETFD, ::fcntl(fd, F_GETFD) | FD_CLOEXEC); }

// Constant-time comparison, so the token cannot be guessed byte by byte.
bool same_secret(const std::string& a, const std::string& b) {
  unsigned diff = a.size() == b.size() ? 0u : 1u;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned>(a[i] ^ b[i % std::max<size_t>(1, b.size())]);
  return diff == 0;
}

}  // namespace

// ---------------------------------------------------------------- server

struct TcpStoreServer::Impl {
  asio::io_context io;
  tcp::acceptor acceptor{io};
  std::thread accept_thread;
  std::mutex mutex;
  std::list<std::pair<std::shared_ptr<tcp::socket>, std::thread>> connections;
  std::atomic<bool> stopping{false};
  std::atomic<int> unauthenticated{0};
  // Refusals are logged at most once per interval, with the count since the last line.
  std::mutex log_mutex;
  std::chrono::steady_clock::time_point last_log{};
  int64_t unlogged = 0;
};

void TcpStoreServer::note_refusal(const std::string& why) {
  ++refused_;
  std::lock_guard lock(impl_->log_mutex);
  ++impl_->unlogged;
  const auto now = std::chrono::steady_clock::now();
  if (now - impl_->last_log < std::chrono::seconds(5)) return;
  SY_LOG_WARN("store", "store server on port ", port_, ": refused ", impl_->unlogged, " connection(s) since the last "
              "report (", refused_.load(), " in all; the latest: ", why, ")");
  impl_->last_log = now;
  impl_->unlogged = 0;
}

TcpStoreServer::TcpStoreServer(std::string token, uint16_t port, const std::string& host,
                               std::chrono::milliseconds frame_within)
    : impl_(std::make_unique<Impl>()), token_(std::move(token)), frame_within_(frame_within) {
  if (token_.empty()) SY_THROW(InvalidArgument, "store server: empty token; expected the job's secret");
  boost::system::error_code ec;
  const auto address = asio::ip::make_address(host, ec);
  if (ec) SY_THROW(InvalidArgument, "store server: host '", host, "' is not an IP address (", ec.message(), ")");
  const tcp::endpoint endpoint(address, port);
  impl_->acceptor.open(endpoint.protocol());
  impl_->acceptor.set_option(tcp::acceptor::reuse_address(true));
  impl_->acceptor.bind(endpoint, ec);
  if (ec) SY_THROW(IoError, "store server: cannot bind ", host, ":", port, ": ", ec.message());
  impl_->acceptor.listen();
  close_on_exec(impl_->acceptor.native_handle());  // launched ranks must not inherit the listening socket
  port_ = impl_->acceptor.local_endpoint().port();
  impl_->accept_thread = std::thread([this] {
    while (!impl_->stopping.load()) {
      auto socket = std::make_shared<tcp::socket>(impl_->io);
      boost::system::error_code aec;
      impl_->acceptor.accept(*socket, aec);
      if (impl_->stopping.load()) break;
      if (aec) {  // EMFILE and the like: back off, keep serving
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        continue;
      }
      close_on_exec(socket->native_handle());
      std::lock_guard lock(impl_->mutex);
      // Reap finished connections; refuse beyond the cap.
      for (auto it = impl_->connections.begin(); it != impl_->connections.end();)
        if (!it->first->is_open() && it->second.joinable()) {
          it->second.join();
          it = impl_->connections.erase(it);
        } else {
          ++it;
        }
      if (static_cast<int>(impl_->connections.size()) >= kMaxConnections ||
          impl_->unauthenticated.load() >= kMaxUnauthenticated) {
        // Counted first (the peer may look as soon as it is answered), then a short "busy" (the client
        // retries it) and closed: a fresh socket's send buffer takes it at once.
        note_refusal("over the connection budget");
        Store::Bytes frame = Writer().u8(static_cast<uint8_t>(Status::error)).str(kBusy).frame();
        socket->non_blocking(true, aec);
        socket->write_some(asio::buffer(frame), aec);
        socket->close(aec);
        continue;
      }
      try {
        ++impl_->unauthenticated;
        impl_->connections.emplace_back(socket, std::thread([this, socket] { serve(socket); }));
      } catch (const std::system_error&) {  // no thread to spare: refuse this one
        --impl_->unauthenticated;
        note_refusal("no thread to serve it");
        socket->close(aec);
      }
    }
  });
}

TcpStoreServer::~TcpStoreServer() {
  impl_->stopping.store(true);
  data_.interrupt_waits();  // connections blocked in get/wait return now
  boost::system::error_code ec;
  // Wake the accept loop with a connection of our own, then close.
  try {
    tcp::socket poke(impl_->io);
    poke.connect(tcp::endpoint(impl_->acceptor.local_endpoint().address(), port_), ec);
  } catch (...) {
  }
  impl_->acceptor.close(ec);
  if (impl_->accept_thread.joinable()) impl_->accept_thread.join();
  std::lock_guard lock(impl_->mutex);
  for (auto& [socket, thread] : impl_->connections) {
    socket->shutdown(tcp::socket::shutdown_both, ec);
    socket->close(ec);
  }
  for (auto& [socket, thread] : impl_->connections)
    if (thread.joinable()) thread.join();
}

void TcpStoreServer::serve(std::shared_ptr<void> opaque) {
  auto& socket = *std::static_pointer_cast<tcp::socket>(opaque);
  auto reply = [&](Status status, const Writer& payload) {
    Store::Bytes frame = payload.frame();
    frame.insert(frame.begin() + 4, static_cast<uint8_t>(status));
    const uint32_t n = static_cast<uint32_t>(frame.size() - 4);
    std::memcpy(frame.data(), &n, 4);
    asio::write(socket, asio::buffer(frame));
  };
  // Until the token is presented this connection counts against the strangers' budget.
  bool authenticated = false;
  auto leave_budget = [&] {
    if (!authenticated) --impl_->unauthenticated;
    authenticated = true;
  };
  try {
    {  // The first frame must be hello with the job's token.
      const Store::Bytes hello = read_frame(socket, std::chrono::steady_clock::now() + kHelloWithin, kHelloLimit);
      Reader r(hello);
      const auto op = static_cast<Op>(r.u8());
      const uint32_t version = r.u32();
      const std::string token = r.str();
      r.done();
      if (op != Op::hello || !same_secret(token, token_) || version != kProtocolVersion) {
        const std::string why = op != Op::hello ? "the first request must present the token"
                                : version != kProtocolVersion
                                    ? "protocol version " + std::to_string(version) + " (server speaks " +
                                          std::to_string(kProtocolVersion) + ")"
                                    : "wrong token";
        note_refusal(why);
        // Refused: answered, then closed below, so it never keeps a slot or a descriptor.
        boost::system::error_code ignored;
        try {
          reply(Status::error, Writer().str(why));
        } catch (...) {
        }
        leave_budget();
        socket.close(ignored);
        return;
      }
      leave_budget();
      reply(Status::ok, Writer());
    }
    while (!impl_->stopping.load()) {
      const Store::Bytes request = read_frame(socket, kForever, kTcpStoreMaxFrame, frame_within_);
      Reader r(request);
      const auto op = static_cast<Op>(r.u8());
      try {
      switch (op) {
        case Op::set: {
          const std::string key = r.str();
          const Store::Bytes value = r.bytes();
          r.done();
          data_.set(key, value);
          reply(Status::ok, Writer());
          break;
        }
        case Op::get: {
          const std::string key = r.str();
          const auto timeout = Store::Milliseconds(r.i64());
          r.done();
          try {
            reply(Status::ok, Writer().bytes(data_.get(key, timeout)));
          } catch (const TimeoutError& e) {
            reply(Status::timeout, Writer().str(e.what()));
          }
          break;
        }
        case Op::try_get: {
          const std::string key = r.str();
          r.done();
          const auto v = data_.try_get(key);
          reply(Status::ok, Writer().u8(v ? 1 : 0).bytes(v ? *v : Store::Bytes{}));
          break;
        }
        case Op::add: {
          const std::string key = r.str();
          const int64_t delta = r.i64();
          r.done();
          reply(Status::ok, Writer().i64(data_.add(key, delta)));
          break;
        }
        case Op::compare_set: {
          const std::string key = r.str();
          const Store::Bytes expected = r.bytes(), desired = r.bytes();
          r.done();
          reply(Status::ok, Writer().bytes(data_.compare_set(key, expected, desired)));
          break;
        }
        case Op::wait: {
          const std::vector<std::string> keys = r.strs();
          const auto timeout = Store::Milliseconds(r.i64());
          r.done();
          try {
            data_.wait(keys, timeout);
            reply(Status::ok, Writer());
          } catch (const TimeoutError& e) {
            reply(Status::timeout, Writer().str(e.what()));
          }
          break;
        }
        case Op::check: {
          const std::vector<std::string> keys = r.strs();
          r.done();
          reply(Status::ok, Writer().u8(data_.check(keys) ? 1 : 0));
          break;
        }
        case Op::erase: {
          const std::string key = r.str();
          r.done();
          reply(Status::ok, Writer().u8(data_.erase(key) ? 1 : 0));
          break;
        }
        default:
          SY_THROW(IoError, "unknown store op ", static_cast<int>(op));
      }
      } catch (const InvalidArgument& e) {  // the request was well-formed, its content not (add on text)
        reply(Status::invalid, Writer().str(e.what()));
      }
    }
  } catch (const std::exception& e) {
    // Garbage, an oversized frame or a vanished client: drop this connection only.
    if (!impl_->stopping.load()) {
      const std::string what = e.what();
      if (what.find("End of file") == std::string::npos) {
        note_refusal(what);
        try {
          reply(Status::error, Writer().str(what));
        } catch (...) {
        }
      }
    }
  }
  leave_budget();
  boost::system::error_code ec;
  socket.close(ec);  // marks the connection finished for the accept loop's reaping
}

// ---------------------------------------------------------------- client

// One connection per concurrent caller: a get() blocked on the server must
// not hold up another thread's set(). Idle connections are reused.
struct TcpStore::Connection {
  explicit Connection(asio::io_context& io) : socket(io) {}
  tcp::socket socket;
};

struct TcpStore::Impl {
  asio::io_context io;
  std::string host, token;
  uint16_t port = 0;
  std::vector<std::unique_ptr<Connection>> idle;
};

namespace {
struct Reply {
  Status status;
  Store::Bytes payload;
};

// One request and its reply; IoError or TimeoutError when the connection
// itself failed (then it is not reused).
Reply round_trip(tcp::socket& socket, const Store::Bytes& request, std::chrono::milliseconds reply_within,
                 const std::string& address, std::chrono::milliseconds grace = std::chrono::milliseconds(5000)) {
  // The server answers timed requests itself, `grace` after which a silent
  // server is given up on.
  const auto now = std::chrono::steady_clock::now();
  const auto deadline = reply_within >= std::chrono::duration_cast<std::chrono::milliseconds>(kForever - now) - grace
                            ? kForever
                            : now + reply_within + grace;
  boost::system::error_code ec;
  asio::write(socket, asio::buffer(request), ec);
  if (ec) SY_THROW(IoError, "store at ", address, ": request not sent (", ec.message(), ")");
  Store::Bytes reply;
  try {
    reply = read_frame(socket, deadline);
  } catch (const boost::system::system_error& e) {
    if (e.code() == asio::error::timed_out)
      SY_THROW(TimeoutError, "store at ", address, ": no reply within ",
               std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now).count(), " ms");
    SY_THROW(IoError, "store at ", address, ": connection lost (", e.what(), ")");
  }
  if (reply.empty()) SY_THROW(IoError, "store at ", address, ": empty reply");
  return {static_cast<Status>(reply.front()), Store::Bytes(reply.begin() + 1, reply.end())};
}

// The payload of an ok reply; the error a refused one names.
Store::Bytes unwrap(Reply r, const std::string& address) {
  if (r.status == Status::ok) return std::move(r.payload);
  std::string message;
  try {
    Reader reader(r.payload);
    message = reader.str();
  } catch (...) {
    message = "(unreadable)";
  }
  if (r.status == Status::timeout) SY_THROW(TimeoutError, message);
  if (r.status == Status::invalid) SY_THROW(InvalidArgument, message);
  if (message == "wrong token")
    SY_THROW(InvalidArgument, "store at ", address,
             " refused this process's token: SWITCHYARD_STORE_TOKEN must be the job's (set by the launcher)");
  SY_THROW(IoError, "store at ", address, " refused the request: ", message);
}
}  // namespace

TcpStore::TcpStore(const std::string& host, uint16_t port, std::string token, Milliseconds connect_timeout)
    : impl_(std::make_unique<Impl>()),
      address_(host + ":" + std::to_string(port)),
      hello_within_(std::min(connect_timeout, Milliseconds(10000))) {
  impl_->host = host;
  impl_->port = port;
  impl_->token = std::move(token);
  const auto deadline = std::chrono::steady_clock::now() + connect_timeout;
  std::string last_error = "no attempt";
  // The first connection waits for the server (rank 0 may start it later).
  for (;;) {
    try {
      impl_->idle.push_back(connect());
      break;
    } catch (const IoError& e) {
      last_error = e.what();
    }
    if (std::chrono::steady_clock::now() >= deadline)
      SY_THROW(IoError, "store: nothing answers at ", address_, " after ", connect_timeout.count(), " ms (",
               last_error, "); check SWITCHYARD_STORE (set by `switchyard launch`; under torchrun MASTER_ADDR / MASTER_PORT + 1, which rank 0 hosts) and that its host is up");
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

TcpStore::~TcpStore() = default;

std::unique_ptr<TcpStore::Connection> TcpStore::connect() {
  // A server whose strangers' budget is full says "busy": retried for as long as a hello may take.
  const auto give_up = std::chrono::steady_clock::now() + hello_within_;
  for (;;) {
    try {
      return connect_once();
    } catch (const IoError& e) {
      if (std::string(e.what()).find(kBusy) == std::string::npos || std::chrono::steady_clock::now() >= give_up) throw;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

std::unique_ptr<TcpStore::Connection> TcpStore::connect_once() {
  auto connection = std::make_unique<Connection>(impl_->io);
  tcp::socket* socket = &connection->socket;
  boost::system::error_code ec;
  tcp::resolver resolver(impl_->io);
  const auto endpoints = resolver.resolve(impl_->host, std::to_string(impl_->port), ec);
  if (ec) SY_THROW(IoError, "store: cannot resolve '", impl_->host, "' (", ec.message(), ")");
  asio::connect(*socket, endpoints, ec);
  if (ec) SY_THROW(IoError, "store: cannot connect to ", address_, " (", ec.message(), ")");
  close_on_exec(socket->native_handle());  // children exec'd later must not hold it
  socket->set_option(tcp::no_delay(true));
  Reader(unwrap(round_trip(*socket,
                           Writer().u8(static_cast<uint8_t>(Op::hello)).u32(kProtocolVersion).str(impl_->token).frame(),
                           hello_within_, address_, Milliseconds(0)),
                address_))
      .done();
  return connection;
}

Store::Bytes TcpStore::call(const Bytes& request, Milliseconds reply_within) {
  std::unique_ptr<Connection> connection;
  {
    std::lock_guard lock(mutex_);
    if (!impl_->idle.empty()) {
      connection = std::move(impl_->idle.back());
      impl_->idle.pop_back();
    }
  }
  if (!connection) connection = connect();
  Reply reply = round_trip(connection->socket, request, reply_within, address_);  // a throw drops the connection
  if (reply.status != Status::error) {  // the server answered (timeouts and bad content included): reuse
    std::lock_guard lock(mutex_);
    impl_->idle.push_back(std::move(connection));
  }
  return unwrap(std::move(reply), address_);
}

void TcpStore::set(const std::string& key, const Bytes& value) {
  Reader(call(Writer().u8(static_cast<uint8_t>(Op::set)).str(key).bytes(value).frame(), Milliseconds(10000))).done();
}

Store::Bytes TcpStore::get(const std::string& key, Milliseconds timeout) {
  const Bytes reply = call(Writer().u8(static_cast<uint8_t>(Op::get)).str(key).i64(timeout.count()).frame(), timeout);
  Reader r(reply);
  Bytes v = r.bytes();
  r.done();
  return v;
}

std::optional<Store::Bytes> TcpStore::try_get(const std::string& key) {
  const Bytes reply = call(Writer().u8(static_cast<uint8_t>(Op::try_get)).str(key).frame(), Milliseconds(10000));
  Reader r(reply);
  const bool present = r.u8() != 0;
  Bytes v = r.bytes();
  r.done();
  return present ? std::optional<Bytes>(std::move(v)) : std::nullopt;
}

int64_t TcpStore::add(const std::string& key, int64_t delta) {
  const Bytes reply = call(Writer().u8(static_cast<uint8_t>(Op::add)).str(key).i64(delta).frame(), Milliseconds(10000));
  Reader r(reply);
  const int64_t v = r.i64();
  r.done();
  return v;
}

Store::Bytes TcpStore::compare_set(const std::string& key, const Bytes& expected, const Bytes& desired) {
  const Bytes reply = call(
      Writer().u8(static_cast<uint8_t>(Op::compare_set)).str(key).bytes(expected).bytes(desired).frame(),
      Milliseconds(10000));
  Reader r(reply);
  Bytes v = r.bytes();
  r.done();
  return v;
}

void TcpStore::wait(const std::vector<std::string>& keys, Milliseconds timeout) {
  Reader(call(Writer().u8(static_cast<uint8_t>(Op::wait)).strs(keys).i64(timeout.count()).frame(), timeout)).done();
}

bool TcpStore::check(const std::vector<std::string>& keys) {
  const Bytes reply = call(Writer().u8(static_cast<uint8_t>(Op::check)).strs(keys).frame(), Milliseconds(10000));
  Reader r(reply);
  const bool all = r.u8() != 0;
  r.done();
  return all;
}

bool TcpStore::erase(const std::string& key) {
  const Bytes reply = call(Writer().u8(static_cast<uint8_t>(Op::erase)).str(key).frame(), Milliseconds(10000));
  Reader r(reply);
  const bool erased = r.u8() != 0;
  r.done();
  return erased;
}

}  // namespace switchyard
