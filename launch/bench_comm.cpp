#include "launch/bench_comm.h"

#include <algorithm>
#include <cstdio>
#include <fstream>

#include "core/error.h"
#include "core/rng.h"

namespace switchyard {
namespace {

// The element every rank puts at index i: small integers, exact in every dtype
// (fp8 included) and in sums over up to 40 ranks of bf16.
double pattern(int rank, int64_t i) { return static_cast<double>((rank * 7 + i) % 13) - 6.0; }

void fill_pattern(const Tensor& t, int rank, int64_t first_index = 0) {
  for (int64_t i = 0; i < t.numel(); ++i) store_from_double(t.data(), t.dtype(), i, pattern(rank, first_index + i));
}

const char* nccl_type_name(DType t) {
  switch (t) {
    case DType::f32: return "float";
    case DType::f64: return "double";
    case DType::bf16: return "bfloat16";
    case DType::f16: return "half";
    case DType::fp8_e4m3: return "fp8e4m3";
    case DType::i32: return "int32";
    case DType::i64: return "int64";
    case DType::u8: return "uint8";
  }
  return "?";
}

ReduceOp parse_redop(const std::string& s) {
  if (s == "sum") return ReduceOp::sum;
  if (s == "max") return ReduceOp::max;
  if (s == "min") return ReduceOp::min;
  SY_THROW(ConfigError, "bench.redop: got '", s, "', expected sum, max or min");
}

bool is_reduction(const std::string& op) { return op == "allreduce" || op == "reduce_scatter"; }

// Buffers and the call for one op at one size.
struct Case {
  Tensor in, out;
  int64_t count = 0;  // elements, nccl-tests' count column
  std::function<Work()> issue;
  std::function<double(int64_t)> expected;  // expected out[i] on this rank
};

Case make_case(Communicator& comm, const std::string& op, int64_t bytes, DType dtype, ReduceOp redop, int root,
               Algorithm algorithm) {
  OpOptions opts;
  opts.algorithm = algorithm;
  ReduceOptions ropts;
  ropts.algorithm = algorithm;
  ropts.op = redop;
  const int n = comm.size(), me = comm.rank();
  const auto esize = static_cast<int64_t>(dtype_size(dtype));
  Case c;
  c.count = bytes / esize;
  auto reduce_all = [n, redop](int64_t index) {
    double acc = pattern(0, index);
    for (int r = 1; r < n; ++r) {
      const double v = pattern(r, index);
      acc = redop == ReduceOp::sum ? acc + v : redop == ReduceOp::max ? std::max(acc, v) : std::min(acc, v);
    }
    return acc;
  };
  if (op == "allreduce") {
    c.in = Tensor::empty({c.count}, dtype), c.out = Tensor::empty({c.count}, dtype);
    fill_pattern(c.in, me);
    c.issue = [&comm, in = c.in, out = c.out, ropts] { return comm.allreduce(in, out, ropts); };
    c.expected = reduce_all;
  } else if (op == "reduce_scatter") {
    const int64_t block = c.count / n;
    c.count = block * n;
    c.in = Tensor::empty({block * n}, dtype), c.out = Tensor::empty({block}, dtype);
    fill_pattern(c.in, me);
    c.issue = [&comm, in = c.in, out = c.out, ropts] { return comm.reduce_scatter(in, out, ropts); };
    c.expected = [reduce_all, block, me](int64_t i) { return reduce_all(me * block + i); };
  } else if (op == "allgather") {
    const int64_t block = c.count / n;
    c.count = block * n;
    c.in = Tensor::empty({block}, dtype), c.out = Tensor::empty({block * n}, dtype);
    fill_pattern(c.in, me);
    c.issue = [&comm, in = c.in, out = c.out, opts] { return comm.allgather(in, out, opts); };
    c.expected = [block](int64_t i) { return pattern(static_cast<int>(i / block), i % block); };
  } else if (op == "alltoall") {
    const int64_t block = c.count / n;
    c.count = block * n;
    c.in = Tensor::empty({block * n}, dtype), c.out = Tensor::empty({block * n}, dtype);
    fill_pattern(c.in, me);
    c.issue = [&comm, in = c.in, out = c.out, opts] { return comm.alltoall(in, out, opts); };
    // Block p of out is block `me` of rank p's input.
    c.expected = [block, me](int64_t i) { return pattern(static_cast<int>(i / block), me * block + i % block); };
  } else if (op == "broadcast") {
    c.in = Tensor::empty({c.count}, dtype);
    c.out = c.in;  // in place, as the op is
    c.issue = [&comm, buf = c.in, root, opts] { return comm.broadcast(buf, root, opts); };
    c.expected = [root](int64_t i) { return pattern(root, i); };
  } else if (op == "sendrecv") {
    c.in = Tensor::empty({c.count}, dtype), c.out = Tensor::empty({c.count}, dtype);
    fill_pattern(c.in, me);
    c.issue = [&comm, in = c.in, out = c.out, n, me, opts] {
      return comm.sendrecv(in, (me + 1) % n, out, (me + n - 1) % n, opts);
    };
    c.expected = [n, me](int64_t i) { return pattern((me + n - 1) % n, i); };
  } else {
    SY_THROW(ConfigError, "bench op '", op, "' is not one of allreduce, reduce_scatter, allgather, alltoall, "
             "broadcast, sendrecv");
  }
  return c;
}

int64_t count_wrong(const Case& c) {
  int64_t wrong = 0;
  const DType t = c.out.dtype();
  double rounded = 0;
  alignas(8) unsigned char one[8];
  for (int64_t i = 0; i < c.out.numel(); ++i) {
    store_from_double(one, t, 0, c.expected(i));  // the expected value as the dtype holds it
    rounded = load_as_double(one, t, 0);
    if (load_as_double(c.out.data(), t, i) != rounded) ++wrong;
  }
  return wrong;
}

void print_header(std::ostream& out, const std::string& op, Communicator& comm, const BenchCommSection& cfg) {
  out << "# switchyard bench comm: " << op << " on " << comm.size() << " ranks, backend " << comm.backend_name()
      << ", algorithm " << cfg.algorithm << ", " << cfg.iters << " iters, " << cfg.warmup
      << " warmup, out-of-place\n"
      << "#\n"
      << "#       size         count      type   redop    root     time   algbw   busbw #wrong\n"
      << "#        (B)    (elements)                               (us)  (GB/s)  (GB/s)\n";
}

void print_row(std::ostream& out, const BenchRow& r) {
  char line[256];
  std::snprintf(line, sizeof line, "%12lld  %12lld  %8s  %6s  %6d  %7.2f  %6.2f  %6.2f  %5s\n",
                static_cast<long long>(r.bytes), static_cast<long long>(r.count), nccl_type_name(r.dtype),
                r.redop.c_str(), r.root, r.time_us, r.algbw, r.busbw,
                r.wrong < 0 ? "N/A" : std::to_string(r.wrong).c_str());
  out << line << std::flush;
}

}  // namespace

const std::vector<std::string>& bench_ops() {
  static const std::vector<std::string> ops = {"allreduce", "reduce_scatter", "allgather",
                                               "alltoall",  "broadcast",      "sendrecv"};
  return ops;
}

double bus_factor(const std::string& op, int ranks) {
  const double n = ranks;
  if (op == "allreduce") return 2.0 * (n - 1) / n;
  if (op == "reduce_scatter" || op == "allgather" || op == "alltoall") return (n - 1) / n;
  return 1.0;  // broadcast, sendrecv
}

std::vector<BenchRow> run_bench_comm(Communicator& comm, const BenchCommSection& cfg, std::ostream* out) {
  const ReduceOp redop = parse_redop(cfg.redop);
  const Algorithm algorithm = cfg.algorithm == "native"    ? Algorithm::native
                              : cfg.algorithm == "generic" ? Algorithm::generic
                                                           : Algorithm::automatic;
  if (cfg.root >= comm.size())
    SY_THROW(ConfigError, "bench.root: got ", cfg.root, ", expected a rank below the world size ", comm.size());
  std::vector<BenchRow> rows;
  for (const std::string& op : cfg.ops) {
    if (is_reduction(op) && !is_reducible(cfg.dtype))
      SY_THROW(ConfigError, "bench.dtype: ", dtype_name(cfg.dtype), " cannot be reduced by ", op,
               "; expected one of f32, f64, bf16, f16, i32, i64");
    if (out) print_header(*out, op, comm, cfg);
    // The fake backend moves no data (its outputs are a world of copies of this rank): nothing to check.
    const bool check = cfg.check && comm.backend_name() != "fake";
    if (out && cfg.check && !check) *out << "# backend fake: no data moves, so results are not checked (#wrong N/A)\n";
    double busbw_sum = 0;
    int measured = 0;
    int64_t wrong_total = 0;
    for (int64_t bytes = cfg.min_bytes; bytes <= cfg.max_bytes; bytes *= cfg.step_factor) {
      const int root = op == "broadcast" ? cfg.root : -1;
      Case c = make_case(comm, op, bytes, cfg.dtype, redop, cfg.root, algorithm);
      BenchRow row{op, c.count * static_cast<int64_t>(dtype_size(cfg.dtype)), c.count, cfg.dtype,
                   is_reduction(op) ? cfg.redop : "none", root};
      if (check) {
        if (op == "broadcast") {
          if (comm.rank() == cfg.root) fill_pattern(c.in, cfg.root);
          else poison(c.in);
        } else {
          poison(c.out);
        }
        c.issue().wait();
        row.wrong = static_cast<int64_t>(allreduce_scalar(comm, static_cast<double>(count_wrong(c)), ReduceOp::sum));
        wrong_total += row.wrong;
      } else {
        row.wrong = -1;
      }
      for (int i = 0; i < cfg.warmup; ++i) c.issue().wait();
      comm.barrier().wait();
      // Issue every timed op back to back (they queue on the executor), then wait
      // for the last, as nccl-tests syncs its stream once: ops complete in issue
      // order, and waking the caller for each would steal the executor's core.
      const auto start = Clock::now();
      std::vector<Work> works;
      for (int i = 0; i < cfg.iters; ++i) works.push_back(c.issue());
      works.back().wait();
      for (Work& w : works) w.wait();  // already complete; rethrows any error
      const double mine = std::chrono::duration<double, std::micro>(Clock::now() - start).count() / cfg.iters;
      row.time_us = allreduce_scalar(comm, mine, ReduceOp::max);
      row.algbw = row.time_us > 0 ? static_cast<double>(row.bytes) / (row.time_us * 1e3) : 0.0;
      row.busbw = row.algbw * bus_factor(op, comm.size());
      busbw_sum += row.busbw;
      ++measured;
      if (out) print_row(*out, row);
      rows.push_back(row);
      if (bytes == 0) break;  // 0 * factor stays 0
    }
    if (out) {
      if (check)
        *out << "# Out of bounds values : " << wrong_total << (wrong_total == 0 ? " OK" : " FAILED") << "\n";
      else
        *out << "# Out of bounds values : N/A (not checked)\n";
      *out << "# Avg bus bandwidth    : " << (measured ? busbw_sum / measured : 0.0) << "\n#\n" << std::flush;
    }
  }
  return rows;
}

void write_bench_csv(const std::string& path, const std::vector<BenchRow>& rows, const std::string& backend, int ranks) {
  std::ofstream f(path);
  if (!f) SY_THROW(IoError, "cannot write CSV file '", path, "'");
  f << "op,backend,ranks,size_bytes,count,type,redop,root,time_us,algbw_gbps,busbw_gbps,wrong\n";
  for (const BenchRow& r : rows)
    f << r.op << ',' << backend << ',' << ranks << ',' << r.bytes << ',' << r.count << ',' << dtype_name(r.dtype)
      << ',' << r.redop << ',' << r.root << ',' << r.time_us << ',' << r.algbw << ',' << r.busbw << ',' << r.wrong
      << '\n';
}

}  // namespace switchyard
