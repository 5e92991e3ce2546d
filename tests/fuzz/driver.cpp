// A fuzz driver for builds without libFuzzer (any compiler; `make test`):
// replays every input given (files, or directories of them: the corpus and the
// saved crashers), then mutates them at random for a bounded time, each input
// through the harness's LLVMFuzzerTestOneInput. A crash, an exception other
// than switchyard::Error, an allocation beyond the memory limit or one input
// taking too long fails the run, and the input is written out first so it can
// be replayed and added to the corpus.
//
//   fuzz_<name> [--seconds S] [--seed N] [--limit-mb M] [--out DIR] PATH...
#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <random>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace {

namespace fs = std::filesystem;
using Bytes = std::vector<uint8_t>;

// The input being run, for the signal handler to write out.
const Bytes* g_current = nullptr;
char g_crash_path[4096] = {};

void on_fatal(int sig) {
  if (g_current && g_crash_path[0]) {
    const int fd = ::open(g_crash_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
      [[maybe_unused]] const ssize_t n = ::write(fd, g_current->data(), g_current->size());
      ::close(fd);
    }
    static const char msg[] = "fuzz: the input that crashed is written to the crash file named above\n";
    [[maybe_unused]] const ssize_t n = ::write(2, msg, sizeof msg - 1);
  }
  ::signal(sig, SIG_DFL);
  ::raise(sig);
}

// An input that runs too long: written out too, then the run fails.
void on_alarm(int) {
  static const char msg[] = "fuzz: FAIL an input ran longer than 10 s (a hang); it is written to the crash file\n";
  if (g_current && g_crash_path[0]) {
    const int fd = ::open(g_crash_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
      [[maybe_unused]] const ssize_t n = ::write(fd, g_current->data(), g_current->size());
      ::close(fd);
    }
  }
  [[maybe_unused]] const ssize_t n = ::write(2, msg, sizeof msg - 1);
  ::_exit(1);
}

Bytes read_all(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return Bytes(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// Byte strings the parsers care about, spliced in by the mutator.
const std::vector<std::string> kTokens = {
    "[", "]", "{", "}", "\"", ",", ":", "---", "\n", " ", "-", "0", "-1", "1e308", "4294967552", "-4294967292",
    "9223372036854775807", "null", "true", "\\u0000", "NaN", "\"experts\"", "\"shape\"", "\"data_offsets\"",
    "\"dtype\":\"F32\"", "\"I32\"", "\"__metadata__\"", "moe:", "comm:", "ranks:", "&a", "*a", "!!binary", "? "};

Bytes mutate(const std::vector<Bytes>& pool, std::mt19937_64& rng, size_t max_len) {
  Bytes b = pool[rng() % pool.size()];
  const int steps = 1 + static_cast<int>(rng() % 4);
  for (int s = 0; s < steps; ++s) {
    const size_t at = b.empty() ? 0 : rng() % (b.size() + 1);
    switch (rng() % 7) {
      case 0:
        if (!b.empty()) b[rng() % b.size()] ^= static_cast<uint8_t>(1u << (rng() % 8));
        break;
      case 1:
        if (!b.empty()) b[rng() % b.size()] = static_cast<uint8_t>(rng());
        break;
      case 2: {  // delete a run
        if (b.empty()) break;
        const size_t from = rng() % b.size(), n = 1 + rng() % std::min<size_t>(64, b.size() - from);
        b.erase(b.begin() + static_cast<ptrdiff_t>(from), b.begin() + static_cast<ptrdiff_t>(from + n));
        break;
      }
      case 3: {  // a token
        const std::string& t = kTokens[rng() % kTokens.size()];
        b.insert(b.begin() + static_cast<ptrdiff_t>(at), t.begin(), t.end());
        break;
      }
      case 4: {  // duplicate a run (deep nesting, long lists)
        if (b.empty()) break;
        const size_t from = rng() % b.size(), n = 1 + rng() % std::min<size_t>(32, b.size() - from);
        const Bytes run(b.begin() + static_cast<ptrdiff_t>(from), b.begin() + static_cast<ptrdiff_t>(from + n));
        const int times = 1 + static_cast<int>(rng() % 64);
        for (int k = 0; k < times; ++k) b.insert(b.begin() + static_cast<ptrdiff_t>(at), run.begin(), run.end());
        break;
      }
      case 5: {  // splice with another input
        const Bytes& o = pool[rng() % pool.size()];
        if (o.empty()) break;
        const size_t from = rng() % o.size(), n = 1 + rng() % std::min<size_t>(256, o.size() - from);
        b.insert(b.begin() + static_cast<ptrdiff_t>(at), o.begin() + static_cast<ptrdiff_t>(from),
                 o.begin() + static_cast<ptrdiff_t>(from + n));
        break;
      }
      default:
        b.resize(at);  // truncate
    }
  }
  if (b.size() > max_len) b.resize(max_len);
  return b;
}

}  // namespace

int main(int argc, char** argv) {
  double seconds = 3;
  uint64_t seed = std::random_device{}();
  size_t limit_mb = 1024, max_len = 1 << 20;
  std::string out_dir = fs::temp_directory_path().string();
  std::vector<fs::path> paths;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::cerr << "fuzz: " << a << " needs a value\n";
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--seconds") seconds = std::stod(next());
    else if (a == "--seed") seed = std::stoull(next());
    else if (a == "--limit-mb") limit_mb = std::stoull(next());
    else if (a == "--out") out_dir = next();
    else paths.emplace_back(a);
  }
  // Unbounded growth shows as std::bad_alloc at the limit instead of the OOM killer.
  const rlimit as{limit_mb << 20, limit_mb << 20};
  ::setrlimit(RLIMIT_AS, &as);
  std::vector<Bytes> pool;
  std::vector<std::string> names;
  for (const fs::path& p : paths) {
    if (fs::is_directory(p)) {
      for (const auto& e : fs::recursive_directory_iterator(p))
        if (e.is_regular_file()) pool.push_back(read_all(e.path())), names.push_back(e.path().string());
    } else if (fs::is_regular_file(p)) {
      pool.push_back(read_all(p)), names.push_back(p.string());
    } else {
      std::cerr << "fuzz: no such input " << p << "\n";
      return 2;
    }
  }
  if (pool.empty()) pool.emplace_back(), names.emplace_back("(empty)");
  const std::string crash = out_dir + "/fuzz-crash-" + fs::path(argv[0]).filename().string() + "-" + std::to_string(seed);
  std::snprintf(g_crash_path, sizeof g_crash_path, "%s", crash.c_str());
  // The handlers run on a stack of their own: a stack overflow, the likeliest crash here, leaves none.
  static std::vector<char> alt(1 << 16);
  stack_t ss{};
  ss.ss_sp = alt.data();
  ss.ss_size = alt.size();
  ::sigaltstack(&ss, nullptr);
  struct sigaction fatal {};
  fatal.sa_handler = on_fatal;
  fatal.sa_flags = SA_ONSTACK;
  for (int sig : {SIGSEGV, SIGABRT, SIGBUS, SIGFPE, SIGILL}) ::sigaction(sig, &fatal, nullptr);
  ::signal(SIGALRM, on_alarm);
  std::cerr << "fuzz: " << pool.size() << " input(s), seed " << seed << ", " << seconds << " s, memory limit "
            << limit_mb << " MB; a crashing input would be written to " << crash << "\n";
  auto run = [&](const Bytes& input, const std::string& what) {
    g_current = &input;
    const auto start = std::chrono::steady_clock::now();
    ::alarm(10);
    try {
      LLVMFuzzerTestOneInput(input.data(), input.size());
      ::alarm(0);
    } catch (const std::exception& e) {
      std::ofstream(crash, std::ios::binary).write(reinterpret_cast<const char*>(input.data()),
                                                   static_cast<std::streamsize>(input.size()));
      std::cerr << "fuzz: FAIL " << what << ": an exception that is not a switchyard::Error escaped ("
                << (dynamic_cast<const std::bad_alloc*>(&e) ? "std::bad_alloc: memory beyond the limit" : e.what())
                << "); the input is in " << crash << "\n";
      std::exit(1);
    }
    const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (took > 2.0) {
      std::ofstream(crash, std::ios::binary).write(reinterpret_cast<const char*>(input.data()),
                                                   static_cast<std::streamsize>(input.size()));
      std::cerr << "fuzz: FAIL " << what << " took " << took << " s (limit 2 s); the input is in " << crash << "\n";
      std::exit(1);
    }
  };
  for (size_t i = 0; i < pool.size(); ++i) run(pool[i], "replaying " + names[i]);
  std::mt19937_64 rng(seed);
  const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  int64_t runs = 0;
  while (std::chrono::steady_clock::now() < until) {
    const Bytes input = mutate(pool, rng, max_len);
    run(input, "mutated input " + std::to_string(runs));
    ++runs;
  }
  rusage ru{};
  ::getrusage(RUSAGE_SELF, &ru);
  std::cout << "fuzz " << fs::path(argv[0]).filename().string() << ": replayed " << pool.size() << ", then "
            << runs << " mutated inputs in " << seconds << " s (seed " << seed << "), no crash; peak memory "
            << ru.ru_maxrss / 1024 << " MB\n";
  return 0;
}
