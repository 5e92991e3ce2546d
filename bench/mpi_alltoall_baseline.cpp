// Bare-MPI MPI_Alltoall bandwidth sweep: the baseline that `switchyard bench comm
// --backend mpi --op alltoall` is compared against (bench/compare_alltoall.sh).
// Plain MPI + the standard library only; no Switchyard code.
//
// Build by hand:
//   mpicxx -O2 -std=c++17 bench/mpi_alltoall_baseline.cpp -o build/bin/mpi_alltoall_baseline
// Run:
//   mpirun -np 2 --oversubscribe --bind-to none build/bin/mpi_alltoall_baseline -b 64K -e 64M -f 2
//
// Flags (nccl-tests style): -b MIN -e MAX bytes per rank (K/M/G suffixes are
// binary), -f FACTOR (size multiplier), -n iters (20), -w warmup (5).
// A size S is the total send bytes of one rank: S/4 float32 elements split in
// equal blocks per peer (sizes are rounded down to a multiple of 4*nranks).
// time = max over ranks of the per-rank average time of one MPI_Alltoall;
// algbw = S / time, busbw = algbw * (n-1)/n (GB/s = 1e9 B/s).
// #wrong = mismatching output elements of the last iteration, summed over ranks.
// Keep the deprecated MPI C++ bindings out (they warn under -Wextra).
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

// Input element i of rank r: exactly representable in float32 (< 2^24).
inline float pattern(int rank, int64_t i) {
  const int64_t v = (static_cast<int64_t>(rank) * 1000003 + i) % (int64_t{1} << 23);
  return static_cast<float>(v);
}

bool parse_size(const char* s, int64_t* out) {
  errno = 0;
  char* end = nullptr;
  const double v = std::strtod(s, &end);
  if (end == s || errno != 0 || v < 0) return false;
  double mult = 1;
  if (*end != '\0') {
    switch (*end) {
      case 'k': case 'K': mult = 1024.0; break;
      case 'm': case 'M': mult = 1024.0 * 1024; break;
      case 'g': case 'G': mult = 1024.0 * 1024 * 1024; break;
      default: return false;
    }
    ++end;
    if (*end == 'B' || *end == 'b') ++end;
    if (*end != '\0') return false;
  }
  *out = static_cast<int64_t>(v * mult);
  return true;
}

bool parse_int(const char* s, int64_t* out) {
  errno = 0;
  char* end = nullptr;
  const long long v = std::strtoll(s, &end, 10);
  if (end == s || *end != '\0' || errno != 0) return false;
  *out = v;
  return true;
}

void usage(const char* argv0) {
  std::fprintf(stderr,
               "usage: %s [-b MIN] [-e MAX] [-f FACTOR] [-n ITERS] [-w WARMUP]\n"
               "  sizes are total bytes per rank, with optional K/M/G (binary) suffix\n",
               argv0);
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, nranks = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &nranks);

  int64_t min_bytes = 64 * 1024, max_bytes = 64 * 1024 * 1024, factor = 2, iters = 20, warmup = 5;
  bool ok = true;
  for (int a = 1; a < argc && ok; ++a) {
    const std::string flag = argv[a];
    if (flag == "-h" || flag == "--help") {
      if (rank == 0) usage(argv[0]);
      MPI_Finalize();
      return 0;
    }
    if (a + 1 >= argc) { ok = false; break; }
    const char* val = argv[++a];
    if (flag == "-b") ok = parse_size(val, &min_bytes);
    else if (flag == "-e") ok = parse_size(val, &max_bytes);
    else if (flag == "-f") ok = parse_int(val, &factor) && factor >= 2;
    else if (flag == "-n") ok = parse_int(val, &iters) && iters >= 1;
    else if (flag == "-w") ok = parse_int(val, &warmup) && warmup >= 0;
    else ok = false;
  }
  if (!ok || min_bytes <= 0 || max_bytes < min_bytes) {
    if (rank == 0) usage(argv[0]);
    MPI_Finalize();
    return 2;
  }

  // Element counts per peer block must fit an int for MPI_Alltoall.
  const int64_t unit = 4 * static_cast<int64_t>(nranks);
  const int64_t max_count = max_bytes / 4;
  std::vector<float> send(static_cast<size_t>(std::max<int64_t>(max_count, 1)));
  std::vector<float> recv(send.size());

  if (rank == 0) {
    std::printf("# mpi_alltoall_baseline: nranks %d iters %" PRId64 " warmup %" PRId64 "\n", nranks, iters,
                warmup);
    std::printf("#\n");
    std::printf("#       size         count      type   redop    root     time   algbw   busbw #wrong\n");
    std::printf("#        (B)    (elements)                               (us)  (GB/s)  (GB/s)\n");
    std::fflush(stdout);
  }

  double busbw_sum = 0;
  int nsizes = 0;
  int64_t total_wrong = 0;
  int64_t prev = -1;
  for (int64_t size = min_bytes; size <= max_bytes; size *= factor) {
    const int64_t bytes = size / unit * unit;
    if (bytes <= 0 || bytes == prev) continue;
    prev = bytes;
    const int64_t count = bytes / 4;
    const int64_t block = count / nranks;

    for (int64_t i = 0; i < count; ++i) send[i] = pattern(rank, i);
    std::fill(recv.begin(), recv.begin() + count, -1.0f);

    for (int64_t w = 0; w < warmup; ++w)
      MPI_Alltoall(send.data(), static_cast<int>(block), MPI_FLOAT, recv.data(), static_cast<int>(block), MPI_FLOAT,
                   MPI_COMM_WORLD);
    MPI_Barrier(MPI_COMM_WORLD);
    const double t0 = MPI_Wtime();
    for (int64_t it = 0; it < iters; ++it)
      MPI_Alltoall(send.data(), static_cast<int>(block), MPI_FLOAT, recv.data(), static_cast<int>(block), MPI_FLOAT,
                   MPI_COMM_WORLD);
    const double local = (MPI_Wtime() - t0) / static_cast<double>(iters);
    double elapsed = 0;
    MPI_Allreduce(&local, &elapsed, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);

    // Block p of recv came from rank p: elements [rank*block, (rank+1)*block) of p's input.
    int64_t wrong = 0;
    for (int p = 0; p < nranks; ++p) {
      const float* got = recv.data() + p * block;
      const int64_t base = static_cast<int64_t>(rank) * block;
      for (int64_t j = 0; j < block; ++j)
        if (got[j] != pattern(p, base + j)) ++wrong;
    }
    int64_t wrong_all = 0;
    MPI_Allreduce(&wrong, &wrong_all, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
    total_wrong += wrong_all;

    const double algbw = static_cast<double>(bytes) / 1e9 / elapsed;
    const double busbw = algbw * (nranks - 1) / static_cast<double>(nranks);
    busbw_sum += busbw;
    ++nsizes;
    if (rank == 0) {
      std::printf("%12" PRId64 "  %12" PRId64 "  %8s  %6s  %6d  %7.2f  %6.2f  %6.2f %6" PRId64 "\n", bytes, count,
                  "float", "none", -1, elapsed * 1e6, algbw, busbw, wrong_all);
      std::fflush(stdout);
    }
    if (size > max_bytes / factor) break;  // avoid overflow of size *= factor
  }

  if (rank == 0) {
    std::printf("# Out of bounds values : %" PRId64 " %s\n", total_wrong, total_wrong == 0 ? "OK" : "FAILED");
    std::printf("# Avg bus bandwidth    : %g\n", nsizes > 0 ? busbw_sum / nsizes : 0.0);
    std::printf("#\n");
  }
  MPI_Finalize();
  return total_wrong == 0 ? 0 : 1;
}
