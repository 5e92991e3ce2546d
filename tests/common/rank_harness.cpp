#include "tests/common/rank_harness.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <functional>
#include <cstring>
#include <iostream>

#include "comm/backends/threads/threads_backend.h"
#include "core/config.h"
#include "core/rng.h"
#include "parallel/runtime.h"
#if SWITCHYARD_HAS_MPI
#include "comm/backends/mpi/mpi_backend.h"
#endif

namespace switchyard::testing {
namespace {

RankHarnessConfig g_config;
// This process's rank of a multi-process backend (mpi, ucx).
std::shared_ptr<Communicator> g_process_world;

// Reports the first failed assertion of a rank of a multi-process job and ends
// the job (the other ranks would wait in a collective): under mpirun by
// MPI_Abort, under `switchyard launch` by exiting (the launcher stops the rest).
// (gtest holds its lock during OnTestPartResult, so the test name is kept from OnTestStart.)
class EndJobOnFailure : public ::testing::EmptyTestEventListener {
 public:
  explicit EndJobOnFailure(std::function<void(const std::string&)> end) : end_(std::move(end)) {}

 private:
  std::string test_name_;
  std::function<void(const std::string&)> end_;
  void OnTestStart(const ::testing::TestInfo& info) override {
    test_name_ = std::string(info.test_suite_name()) + "." + info.name();
  }
  void OnTestPartResult(const ::testing::TestPartResult& result) override {
    if (!result.failed()) return;
    const std::string where = result.file_name() ? std::string(result.file_name()) + ":" +
                                                       std::to_string(result.line_number())
                                                 : std::string("?");
    end_("test " + test_name_ + " failed at " + where + ": " + result.message());
  }
};

}  // namespace

void init_rank_harness(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--backend=", 0) == 0) {
      g_config.backend = arg.substr(10);
    } else if (arg.rfind("--ranks=", 0) == 0) {
      g_config.ranks = std::atoi(arg.c_str() + 8);
    } else {
      std::cerr << "unknown argument '" << arg << "'; expected --backend=threads|mpi and --ranks=N\n";
      std::exit(2);
    }
  }
  if (g_config.backend == "mpi") {
#if SWITCHYARD_HAS_MPI
    g_process_world = make_mpi_world_communicator();
    g_config.ranks = g_process_world->size();
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    if (g_process_world->rank() != 0) delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new EndJobOnFailure([](const std::string& m) { mpi_abort(m); }));
#else
    std::cerr << "this build has no MPI backend (SWITCHYARD_WITH_MPI=OFF)\n";
    std::exit(2);
#endif
  } else if (g_config.backend == "ucx") {
#if SWITCHYARD_HAS_UCX
    const auto info = discover_rank(process_env);
    if (!info) {
      std::cerr << "--backend=ucx: run under `switchyard launch --nprocs N -- comm_tests --backend=ucx`\n";
      std::exit(2);
    }
    g_process_world = bootstrap_ucx_world(*info, Milliseconds(60000));
    g_config.ranks = g_process_world->size();
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    if (g_process_world->rank() != 0) delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new EndJobOnFailure([](const std::string& m) {
      std::cerr << "rank " << g_process_world->rank() << ": " << m << std::endl;
      std::_Exit(1);
    }));
#else
    std::cerr << "this build has no UCX backend (UCX not found at configure time)\n";
    std::exit(2);
#endif
  } else if (g_config.backend != "threads") {
    std::cerr << "unknown --backend='" << g_config.backend << "', expected threads, mpi or ucx\n";
    std::exit(2);
  }
  if (g_config.ranks < 1) {
    std::cerr << "--ranks must be >= 1\n";
    std::exit(2);
  }
}

const RankHarnessConfig& harness_config() { return g_config; }
bool harness_is_threads() { return g_config.backend == "threads"; }

void for_each_rank(const std::function<void(Communicator&, uint64_t)>& fn, Milliseconds op_timeout) {
  uint64_t seed = fresh_seed();
  if (harness_is_threads()) {
    ::testing::Test::RecordProperty("seed", std::to_string(seed));
    SCOPED_TRACE("seed " + std::to_string(seed) + " (SWITCHYARD_TEST_SEED reproduces it)");
    run_thread_ranks(g_config.ranks, [&](Communicator& comm) { fn(comm, seed); }, {op_timeout});
    return;
  }
  Tensor s = Tensor::empty({1}, DType::i64);
  s.data_as<int64_t>()[0] = static_cast<int64_t>(seed);
  g_process_world->broadcast(s, 0).wait();
  seed = static_cast<uint64_t>(s.data_as<int64_t>()[0]);
  SCOPED_TRACE("seed " + std::to_string(seed) + " (SWITCHYARD_TEST_SEED reproduces it)");
  g_process_world->set_default_timeout(op_timeout);
  fn(*g_process_world, seed);
  g_process_world->barrier().wait();
}

void shutdown_rank_harness() { g_process_world.reset(); }

Tensor random_tensor(uint64_t seed, int64_t rows, int64_t width) {
  Tensor x = Tensor::empty({rows, width}, DType::f32);
  Rng(seed).fill_uniform(x, -1, 1);
  return x;
}

}  // namespace switchyard::testing
