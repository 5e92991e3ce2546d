#include "launch/launcher.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/prctl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <thread>

#include "comm/store/tcp_store.h"
#include "core/error.h"

extern char** environ;

namespace switchyard {
namespace {

// A port nothing listens on now (the kernel's pick), for torch's store.
uint16_t free_loopback_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) SY_THROW(IoError, "launch: socket failed: ", std::strerror(errno));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 &&
                  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0;
  ::close(fd);
  if (!ok) SY_THROW(IoError, "launch: cannot find a free port for MASTER_PORT: ", std::strerror(errno));
  return ntohs(a.sin_port);
}

std::string random_token() {
  std::random_device rd;
  std::string t;
  for (int i = 0; i < 4; ++i) {
    char buf[17];
    std::snprintf(buf, sizeof buf, "%08x", rd());
    t += buf;
  }
  return t;
}

struct Child {
  pid_t pid = -1;
  int rank = 0;
  int out = -1, err = -1;  // read ends
  std::string out_partial, err_partial;
  bool exited = false;
  int code = 0;
};

// Writes complete lines of `data` with the rank prefix; keeps the tail.
void emit(FILE* to, int rank, std::string& partial, const char* data, size_t n) {
  partial.append(data, n);
  size_t start = 0;
  for (size_t nl; (nl = partial.find('\n', start)) != std::string::npos; start = nl + 1)
    std::fprintf(to, "[%d] %.*s\n", rank, static_cast<int>(nl - start), partial.data() + start);
  partial.erase(0, start);
  std::fflush(to);
}

// Signals to the launcher (Ctrl-C, SIGTERM from a scheduler, a closed
// terminal) arrive through this pipe in the poll loop, which stops the ranks.
int g_signal_pipe[2] = {-1, -1};
void on_signal(int sig) {
  const unsigned char s = static_cast<unsigned char>(sig);
  [[maybe_unused]] const ssize_t n = ::write(g_signal_pipe[1], &s, 1);
}
}  // namespace

int run_launch(const LaunchOptions& o) {
  if (o.nprocs < 1) SY_THROW(ConfigError, "--nprocs = ", o.nprocs, ", expected >= 1");
  if (o.nnodes < 1) SY_THROW(ConfigError, "--nnodes = ", o.nnodes, ", expected >= 1");
  if (o.node_rank < 0 || o.node_rank >= o.nnodes)
    SY_THROW(ConfigError, "--node-rank = ", o.node_rank, ", expected 0..", o.nnodes - 1);
  if (o.command.empty()) SY_THROW(ConfigError, "no command to launch; expected: switchyard launch --nprocs N -- CMD ARGS");
  if (o.nnodes > 1 && o.master.empty())
    SY_THROW(ConfigError, "--nnodes = ", o.nnodes, " needs --master ADDR:PORT (node 0's address, reachable from every node)");
  std::string host = "127.0.0.1";
  uint16_t port = 0;
  if (!o.master.empty()) {
    const auto colon = o.master.rfind(':');
    if (colon == std::string::npos)
      SY_THROW(ConfigError, "--master = '", o.master, "', expected ADDR:PORT");
    host = o.master.substr(0, colon);
    const std::string p = o.master.substr(colon + 1);
    char* end = nullptr;
    const long v = std::strtol(p.c_str(), &end, 10);
    if (p.empty() || *end != '\0' || v < 1 || v > 65535)
      SY_THROW(ConfigError, "--master = '", o.master, "': port '", p, "', expected 1..65535");
    port = static_cast<uint16_t>(v);
  }
  // Every node must share the token: node 0 makes one unless the caller set it.
  const char* given = std::getenv("SWITCHYARD_STORE_TOKEN");
  if (o.nnodes > 1 && !given)
    SY_THROW(ConfigError, "launching on ", o.nnodes, " nodes needs SWITCHYARD_STORE_TOKEN set to the same secret on every node");
  const std::string token = given ? given : random_token();
  std::unique_ptr<TcpStoreServer> server;
  if (o.node_rank == 0) {
    server = std::make_unique<TcpStoreServer>(token, port, host);
    port = server->port();
  }
  // torch.distributed's env:// store must not land on Switchyard's: torch gets
  // MASTER_PORT = the store's port + 1 (--master), or another free port.
  uint16_t torch_port = 0;
  if (!o.master.empty()) {
    if (port == 65535)
      SY_THROW(ConfigError, "--master = '", o.master, "': port 65535 leaves none for torch (MASTER_PORT = PORT + 1)");
    torch_port = static_cast<uint16_t>(port + 1);
  } else {
    torch_port = free_loopback_port();
  }
  const int world = o.nprocs * o.nnodes;
  const int omp_threads_per_rank =
      std::max(1, static_cast<int>(std::max(1u, std::thread::hardware_concurrency())) / o.nprocs);
  if (::pipe2(g_signal_pipe, O_CLOEXEC | O_NONBLOCK) != 0) SY_THROW(IoError, "launch: pipe failed: ", std::strerror(errno));
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  ::sigemptyset(&sa.sa_mask);
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) ::sigaction(sig, &sa, nullptr);
  ::signal(SIGPIPE, SIG_IGN);  // a closed stdout (launch ... | head) must not kill the launcher silently
  const pid_t launcher = ::getpid();
  // A watchdog outlives a SIGKILLed launcher just long enough to take every rank's process group
  // with it: PR_SET_PDEATHSIG reaches only the direct child, not what a wrapper (sh -c ...) started.
  // The launcher tells it each rank's group through a pipe, and 0 when it ends normally; EOF with
  // no 0 means the launcher died.
  int watch[2] = {-1, -1};
  if (::pipe2(watch, O_CLOEXEC) != 0) SY_THROW(IoError, "launch: pipe failed: ", std::strerror(errno));
  std::vector<pid_t> watched(static_cast<size_t>(o.nprocs), 0);  // sized before the fork: the watchdog may not allocate
  const pid_t watchdog = ::fork();
  if (watchdog < 0) SY_THROW(IoError, "launch: fork failed: ", std::strerror(errno));
  if (watchdog == 0) {
    // Only async-signal-safe calls here (this process was forked from a multi-threaded one).
    ::close(watch[1]);
    struct sigaction ignore {};
    ignore.sa_handler = SIG_IGN;
    for (int sig : {SIGINT, SIGTERM, SIGHUP}) ::sigaction(sig, &ignore, nullptr);  // the launcher handles those
    size_t n = 0;
    for (;;) {
      pid_t group = 0;
      const ssize_t got = ::read(watch[0], &group, sizeof group);
      if (got < 0 && errno == EINTR) continue;
      if (got != static_cast<ssize_t>(sizeof group)) break;  // EOF: the launcher is gone
      if (group == 0) ::_exit(0);                             // it ended normally
      if (group < 0) {  // that rank was reaped: its group id may be reused, so it is forgotten
        for (size_t i = 0; i < n; ++i)
          if (watched[i] == -group) watched[i] = 0;
        continue;
      }
      if (n < watched.size()) watched[n++] = group;
    }
    for (size_t i = 0; i < n; ++i)
      if (watched[i] > 0) ::kill(-watched[i], SIGKILL);
    ::_exit(0);
  }
  ::close(watch[0]);
  // Groups of reaped ranks are dropped from the watchdog's list (their ids could be reused).
  auto forget = [&](pid_t pid) {
    const pid_t gone = -pid;
    [[maybe_unused]] const ssize_t w = ::write(watch[1], &gone, sizeof gone);
  };
  auto end_watchdog = [&] {
    const pid_t done = 0;
    [[maybe_unused]] const ssize_t w = ::write(watch[1], &done, sizeof done);
    ::close(watch[1]);
    ::waitpid(watchdog, nullptr, 0);
  };
  std::vector<Child> children(static_cast<size_t>(o.nprocs));
  auto kill_started = [&] {
    for (auto& c : children)
      if (c.pid > 0) ::kill(-c.pid, SIGKILL);
    for (auto& c : children)
      if (c.pid > 0 && !c.exited) ::waitpid(c.pid, nullptr, 0);
  };
  for (int i = 0; i < o.nprocs; ++i) {
    Child& c = children[static_cast<size_t>(i)];
    c.rank = o.node_rank * o.nprocs + i;
    int out[2], err[2];
    if (::pipe2(out, O_CLOEXEC) != 0 || ::pipe2(err, O_CLOEXEC) != 0) {
      kill_started();
      SY_THROW(IoError, "launch: pipe failed: ", std::strerror(errno));
    }
    // Everything the child needs is built here: after fork a child of this
    // multi-threaded process may only make async-signal-safe calls (another
    // thread may have held the allocator's lock at the fork).
    std::map<std::string, std::string> vars = {
        {"RANK", std::to_string(c.rank)},            {"WORLD_SIZE", std::to_string(world)},
        {"LOCAL_RANK", std::to_string(i)},           {"LOCAL_WORLD_SIZE", std::to_string(o.nprocs)},
        {"GROUP_RANK", std::to_string(o.node_rank)}, {"MASTER_ADDR", host},
        {"MASTER_PORT", std::to_string(torch_port)}, {"SWITCHYARD_STORE", host + ":" + std::to_string(port)},
        {"SWITCHYARD_STORE_TOKEN", token}};
    // As torchrun does: without it every process's OpenMP (torch's included) takes every core.
    if (!std::getenv("OMP_NUM_THREADS")) vars["OMP_NUM_THREADS"] = std::to_string(omp_threads_per_rank);
    std::vector<std::string> env_strings;
    for (char** e = environ; *e; ++e) {
      const std::string entry = *e;
      if (!vars.count(entry.substr(0, entry.find('=')))) env_strings.push_back(entry);
    }
    for (const auto& [k, v] : vars) env_strings.push_back(k + "=" + v);
    std::vector<char*> envp, argv;
    for (auto& e : env_strings) envp.push_back(e.data());
    envp.push_back(nullptr);
    for (const auto& a : o.command) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    static const char kExecFailed[] = "switchyard launch: cannot run the command (not found or not executable)\n";
    // Signals stay blocked across fork until the child has its default
    // handlers back: a stop that comes that early must end the child, not run
    // the launcher's handler in it.
    sigset_t stops, previous;
    ::sigemptyset(&stops);
    for (int sig : {SIGINT, SIGTERM, SIGHUP}) ::sigaddset(&stops, sig);
    ::sigprocmask(SIG_BLOCK, &stops, &previous);
    const pid_t pid = ::fork();
    if (pid < 0) {
      ::sigprocmask(SIG_SETMASK, &previous, nullptr);
      kill_started();
      SY_THROW(IoError, "launch: fork failed: ", std::strerror(errno));
    }
    if (pid == 0) {
      ::setpgid(0, 0);  // its own group, so stopping it stops what it started
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // the launcher gone (even SIGKILLed): so is the rank
      if (::getppid() != launcher) ::_exit(128 + SIGKILL);
      ::signal(SIGPIPE, SIG_DFL);
      for (int sig : {SIGINT, SIGTERM, SIGHUP}) ::signal(sig, SIG_DFL);
      ::sigprocmask(SIG_SETMASK, &previous, nullptr);
      ::dup2(out[1], 1);
      ::dup2(err[1], 2);
      ::close(out[0]), ::close(out[1]), ::close(err[0]), ::close(err[1]);
      ::execvpe(argv[0], argv.data(), envp.data());
      [[maybe_unused]] const ssize_t n = ::write(2, kExecFailed, sizeof kExecFailed - 1);
      ::_exit(127);
    }
    c.pid = pid;
    ::setpgid(pid, pid);  // also here: a stop may come before the child ran its own setpgid
    [[maybe_unused]] const ssize_t told = ::write(watch[1], &pid, sizeof pid);  // atomic: under PIPE_BUF
    ::sigprocmask(SIG_SETMASK, &previous, nullptr);
    ::close(out[1]), ::close(err[1]);
    c.out = out[0], c.err = err[0];
  }
  int first_failure = 0, first_failed_rank = -1;
  auto stop_others = [&] {
    // SIGCONT after the TERM: a stopped rank acts on it now instead of at the SIGKILL after the grace.
    for (auto& c : children)
      if (!c.exited) ::kill(-c.pid, SIGTERM), ::kill(-c.pid, SIGCONT);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(o.grace_ms);
    while (std::chrono::steady_clock::now() < deadline) {
      bool all = true;
      for (auto& c : children)
        if (!c.exited) all = false;
      if (all) return;
      for (auto& c : children) {
        if (c.exited) continue;
        int status = 0;
        if (::waitpid(c.pid, &status, WNOHANG) == c.pid) c.exited = true;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    for (auto& c : children)
      if (!c.exited) ::kill(-c.pid, SIGKILL);
  };
  bool stopping = false;
  int signalled = 0;
  int failure_priority = 0;  // of the failure reported (or about to be)
  std::chrono::steady_clock::time_point cause_deadline;
  // Forward output until every pipe closed and every child exited.
  for (;;) {
    std::vector<pollfd> fds;
    std::vector<std::pair<Child*, bool>> owner;
    fds.push_back({g_signal_pipe[0], POLLIN, 0});
    owner.push_back({nullptr, false});
    for (auto& c : children) {
      if (c.out >= 0) fds.push_back({c.out, POLLIN, 0}), owner.push_back({&c, true});
      if (c.err >= 0) fds.push_back({c.err, POLLIN, 0}), owner.push_back({&c, false});
    }
    // Also the pace of the exit checks when no pipe is left; shorter while a failure's cause is awaited.
    ::poll(fds.data(), fds.size(), first_failure != 0 && !stopping ? 5 : 50);
    for (size_t k = 0; k < fds.size(); ++k) {
      if (!(fds[k].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      auto [c, is_out] = owner[k];
      if (c == nullptr) {  // a signal to the launcher
        unsigned char sig = 0;
        if (::read(g_signal_pipe[0], &sig, 1) == 1 && !stopping) {
          signalled = sig;
          stopping = true;
          std::fprintf(stderr, "switchyard launch: got signal %d; stopping the ranks\n", sig);
          stop_others();
        }
        continue;
      }
      char buf[65536];
      const ssize_t n = ::read(fds[k].fd, buf, sizeof buf);
      if (n > 0) {
        emit(is_out ? stdout : stderr, c->rank, is_out ? c->out_partial : c->err_partial, buf, static_cast<size_t>(n));
      } else {
        ::close(fds[k].fd);
        std::string& rest = is_out ? c->out_partial : c->err_partial;
        if (!rest.empty()) emit(is_out ? stdout : stderr, c->rank, rest, "\n", 1);
        (is_out ? c->out : c->err) = -1;
      }
    }
    // A failure's likelier cause is reported: a rank killed outright
    // (SIGKILL: the OOM killer, an operator), then a crash (SEGV, BUS, ILL,
    // FPE), then other signals (an abort: often a library noticing the dead
    // peer), then error exits (ranks whose ops failed because of it). A
    // killed rank's exit can reach us after its peer's reaction to it (the
    // kernel tears a large process down for a while), so after a failure of
    // lower priority the other ranks get kCauseWindow to show a likelier one
    // before the rest are stopped; output keeps flowing meanwhile.
    constexpr auto kCauseWindow = std::chrono::milliseconds(250);
    for (auto& c : children) {
      if (c.exited) continue;
      int status = 0;
      if (::waitpid(c.pid, &status, WNOHANG) != c.pid) continue;
      c.exited = true;
      forget(c.pid);
      c.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      // A shell that ran the rank without exec exits 128 + the signal that killed it.
      const int sig = WIFSIGNALED(status) ? WTERMSIG(status) : c.code > 128 && c.code < 160 ? c.code - 128 : 0;
      const int priority = sig == 0                                                            ? 1
                           : sig == SIGKILL                                                    ? 4
                           : sig == SIGSEGV || sig == SIGBUS || sig == SIGILL || sig == SIGFPE ? 3
                                                                                               : 2;
      if (c.code != 0 && !stopping && priority > failure_priority) {
        if (first_failure == 0) cause_deadline = std::chrono::steady_clock::now() + kCauseWindow;
        first_failure = c.code;
        first_failed_rank = c.rank;
        failure_priority = priority;
      }
    }
    bool all_exited = true;
    for (auto& c : children) all_exited = all_exited && c.exited;
    if (first_failure != 0 && !stopping &&
        (failure_priority == 4 || all_exited || std::chrono::steady_clock::now() >= cause_deadline)) {
      stopping = true;
      std::fprintf(stderr, "switchyard launch: rank %d exited with code %d; stopping the other ranks\n",
                   first_failed_rank, first_failure);
      stop_others();
    }
    bool pipes_open = false;
    for (auto& c : children) pipes_open = pipes_open || c.out >= 0 || c.err >= 0;
    if (all_exited && !pipes_open) break;
    if (all_exited && stopping) break;  // pipes held open by orphans of killed ranks
  }
  // Whatever a rank left behind in its process group goes with it.
  for (auto& c : children) {
    ::kill(-c.pid, SIGKILL);
    if (c.out >= 0) ::close(c.out);
    if (c.err >= 0) ::close(c.err);
  }
  end_watchdog();
  ::close(g_signal_pipe[0]);
  ::close(g_signal_pipe[1]);
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) ::signal(sig, SIG_DFL);
  return first_failure != 0 ? first_failure : signalled != 0 ? 128 + signalled : 0;
}

}  // namespace switchyard
