// Embedding test: an installed Switchyard, found with find_package and linked
// as switchyard::comm, runs an allreduce over 3 thread-ranks.
#include <switchyard/comm/backends/threads/threads_backend.h>
#include <switchyard/core/tensor.h>

#include <atomic>
#include <cstdio>
#include <exception>

int main() {
  constexpr int kRanks = 3;
  constexpr int64_t kN = 5;
  std::atomic<int> mismatches{0};
  try {
    switchyard::run_thread_ranks(kRanks, [&](switchyard::Communicator& comm) {
      auto t = switchyard::Tensor::empty({kN}, switchyard::DType::f64);
      double* p = t.data_as<double>();
      for (int64_t i = 0; i < kN; ++i) p[i] = comm.rank() + static_cast<double>(i);
      comm.allreduce(t, t).wait();
      // sum over r of (r + i) = R(R-1)/2 + R*i
      for (int64_t i = 0; i < kN; ++i) {
        const double want = kRanks * (kRanks - 1) / 2.0 + kRanks * static_cast<double>(i);
        if (p[i] != want) {
          std::fprintf(stderr, "rank %d: element %lld = %g, want %g\n", comm.rank(), static_cast<long long>(i), p[i],
                       want);
          ++mismatches;
        }
      }
    });
  } catch (const std::exception& e) {
    std::fprintf(stderr, "consumer failed: %s\n", e.what());
    return 1;
  }
  if (mismatches != 0) {
    std::fprintf(stderr, "consumer: %d mismatches\n", mismatches.load());
    return 1;
  }
  std::printf("consumer ok\n");
  return 0;
}
