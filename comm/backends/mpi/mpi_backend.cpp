#include "comm/backends/mpi/mpi_backend.h"

#include <unistd.h>

#include <atomic>
#include <algorithm>
#include <climits>
#include <condition_variable>
#include <mutex>
#include <cstdio>
#include <thread>

#include "comm/algorithms/barrier_dissemination.h"
#include "comm/member_transport.h"
#include "core/env.h"
#include "core/logging.h"

namespace switchyard {
namespace {

std::mutex& mpi_mutex() {
  static std::mutex m;
  return m;
}

std::string mpi_error_string(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(code, text, &length);
  return std::string(text, static_cast<size_t>(length));
}

#define SY_MPI_CHECK(call)                                                                  \
  do {                                                                                      \
    const int sy_rc_ = (call);                                                              \
    if (sy_rc_ != MPI_SUCCESS) SY_THROW(IoError, #call " failed: ", mpi_error_string(sy_rc_)); \
  } while (0)

// A pending MPI operation cannot be cancelled (collectives never, point-to-point
// not reliably), and the buffers it writes are released once the op's Work
// fails. Rather than let MPI write into freed memory, end the job with the
// reason, as NCCL's watchdog does; mpirun then stops every rank.
[[noreturn]] void abort_with_pending(const std::string& what, const std::string& reason) {
  mpi_abort(what + ": " + reason + "; MPI cannot cancel the pending operation, so the job is aborted");
}

// Polls requests under the MPI lock until all complete or the deadline passes.
void wait_requests(MPI_Request* requests, int count, MPI_Status* statuses, Deadline deadline, const std::string& what) {
  if (count == 0) return;
  const auto start = Clock::now();
  for (;;) {
    int done = 0;
    {
      std::lock_guard lock(mpi_mutex());
      const int rc = MPI_Testall(count, requests, &done, statuses);
      if (rc != MPI_SUCCESS) {
        std::string detail = mpi_error_string(rc);
        if (rc == MPI_ERR_IN_STATUS && statuses)
          for (int i = 0; i < count; ++i)
            if (statuses[i].MPI_ERROR != MPI_SUCCESS) detail = mpi_error_string(statuses[i].MPI_ERROR);
        abort_with_pending(what, "failed: " + detail);
      }
    }
    if (done) return;
    if (Clock::now() > deadline) {
      const auto waited = std::chrono::duration_cast<Milliseconds>(Clock::now() - start).count();
      abort_with_pending(what, detail::make_string("timed out after ", waited,
                                                   " ms: a peer has not reached the matching op"));
    }
    // MPI progresses a transfer only inside MPI calls (Open MPI's nonblocking
    // collectives advance fragment by fragment), so keep polling while data
    // may be moving; back off to sleeps only once the wait looks like a late peer.
    const auto waited = Clock::now() - start;
    if (waited < std::chrono::microseconds(50))
      continue;  // a small op finishes within microseconds: no system call between polls
    if (waited < std::chrono::milliseconds(50))
      std::this_thread::yield();
    else
      std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

bool fits_int(size_t v) { return v <= static_cast<size_t>(INT_MAX); }

// MPI datatypes for native reductions; nullopt for those MPI has no sum for.
std::optional<MPI_Datatype> reduction_type(DType t) {
  switch (t) {
    case DType::f32: return MPI_FLOAT;
    case DType::f64: return MPI_DOUBLE;
    case DType::i32: return MPI_INT32_T;
    case DType::i64: return MPI_INT64_T;
    default: return std::nullopt;
  }
}

MPI_Op mpi_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum: return MPI_SUM;
    case ReduceOp::max: return MPI_MAX;
    case ReduceOp::min: return MPI_MIN;
  }
  return MPI_SUM;
}

class MpiTransport : public Transport {
 public:
  MpiTransport(MPI_Comm comm, int rank, int size, std::string name)
      : comm_(comm), rank_(rank), size_(size), name_(std::move(name)) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void post_send(int peer, const void* data, size_t bytes, uint32_t tag) override {
    post(peer, const_cast<void*>(data), bytes, tag, /*receive=*/false);
  }
  void post_recv(int peer, void* data, size_t bytes, uint32_t tag) override {
    post(peer, data, bytes, tag, /*receive=*/true);
  }
  void wait_all(Deadline deadline) override {
    auto requests = std::move(requests_);
    auto expected = std::move(expected_);
    requests_.clear();
    expected_.clear();
    std::vector<MPI_Status> statuses(requests.size());
    wait_requests(requests.data(), static_cast<int>(requests.size()), statuses.data(), deadline,
                  "MPI send/recv on '" + name_ + "' rank " + std::to_string(rank_));
    // Everything completed, so throwing here leaves nothing pending.
    for (size_t i = 0; i < expected.size(); ++i) {
      if (expected[i].recv_bytes < 0) continue;
      int got = 0;
      {
        std::lock_guard lock(mpi_mutex());
        MPI_Get_count(&statuses[i], MPI_BYTE, &got);
      }
      if (got != expected[i].recv_bytes)
        SY_THROW(IoError, "message size mismatch: rank ", expected[i].peer, " sent ", got, " bytes, rank ", rank_,
                 " expects ", expected[i].recv_bytes);
    }
  }

 private:
  // MPI counts are int: a larger message travels as several pieces with one
  // tag, which MPI delivers in order (SWITCHYARD_MPI_MAX_MESSAGE_BYTES, 1 GiB).
  void post(int peer, void* data, size_t bytes, uint32_t tag, bool receive) {
    const auto max_piece = static_cast<size_t>(env().mpi_max_message_bytes);
    std::lock_guard lock(mpi_mutex());
    size_t offset = 0;
    do {
      const size_t piece = std::min(max_piece, bytes - offset);
      char* at = static_cast<char*>(data) + offset;
      MPI_Request req;
      const int rc = receive ? MPI_Irecv(at, static_cast<int>(piece), MPI_BYTE, peer, static_cast<int>(tag), comm_, &req)
                             : MPI_Isend(at, static_cast<int>(piece), MPI_BYTE, peer, static_cast<int>(tag), comm_, &req);
      if (rc != MPI_SUCCESS)
        abort_with_pending("MPI " + std::string(receive ? "Irecv" : "Isend") + " on '" + name_ + "'",
                           mpi_error_string(rc));
      requests_.push_back(req);
      expected_.push_back({peer, receive ? static_cast<int64_t>(piece) : -1});
      offset += piece;
    } while (offset < bytes);
  }

  struct Expected {
    int peer;
    int64_t recv_bytes;  // -1 for sends
  };
  MPI_Comm comm_;
  int rank_, size_;
  std::string name_;
  std::vector<MPI_Request> requests_;
  std::vector<Expected> expected_;
};

class MpiCommunicator : public Communicator {
 public:
  // Takes ownership of `comm` (freed on destruction).
  MpiCommunicator(std::shared_ptr<MpiSession> session, MPI_Comm comm, int rank, int size, std::string name)
      : Communicator(rank, size, name), session_(std::move(session)), comm_(comm), transport_(comm, rank, size, name) {}

  ~MpiCommunicator() override {
    shutdown_executor();
    std::lock_guard lock(mpi_mutex());
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Comm_free(&comm_);
  }

  std::string_view backend_name() const override { return "mpi"; }

 protected:
  Transport& transport() override { return transport_; }

  std::shared_ptr<Communicator> do_create_group(const std::vector<int>& members, uint64_t group_key,
                                                const std::string& name, const OpContext& ctx) override {
    // MPI_Comm_create_group blocks while holding the process's MPI lock, which
    // would stall this process's other communicators; a member whose progress
    // needs those would never arrive. Meet first in a polled barrier (lock
    // released between polls, bounded by the deadline), then create.
    const int my_index = static_cast<int>(std::find(members.begin(), members.end(), rank()) - members.begin());
    MemberTransport among_members(counted_transport(), members, my_index);
    algorithms::barrier_dissemination(among_members, ctx.deadline);
    MPI_Comm child = MPI_COMM_NULL;
    {
      std::lock_guard lock(mpi_mutex());
      MPI_Group parent_group, group;
      SY_MPI_CHECK(MPI_Comm_group(comm_, &parent_group));
      SY_MPI_CHECK(MPI_Group_incl(parent_group, static_cast<int>(members.size()), members.data(), &group));
      // Collective over the members only, like create_group; the tag (MPI guarantees
      // 32767) separates it from other creations in flight.
      SY_MPI_CHECK(MPI_Comm_create_group(comm_, group, static_cast<int>(group_key % 32768), &child));
      MPI_Group_free(&group);
      MPI_Group_free(&parent_group);
      SY_MPI_CHECK(MPI_Comm_set_errhandler(child, MPI_ERRORS_RETURN));
    }
    int rank = 0, size = 0;
    {
      std::lock_guard lock(mpi_mutex());
      MPI_Comm_rank(child, &rank);
      MPI_Comm_size(child, &size);
    }
    auto c = std::make_shared<MpiCommunicator>(session_, child, rank, size, name);
    c->set_default_timeout(default_timeout());
    return c;
  }

  void do_allreduce(const TensorView& in, const TensorView& out, ReduceOp op, const OpContext& ctx) override {
    auto type = reduction_type(in.dtype());
    if (ctx.algorithm == Algorithm::generic || !type || !fits_int(static_cast<size_t>(in.numel())))
      return Communicator::do_allreduce(in, out, op, ctx);
    run_native(ctx, [&](MPI_Request* r) {
      return MPI_Iallreduce(in.data() == out.data() ? MPI_IN_PLACE : in.data(), out.data(),
                            static_cast<int>(in.numel()), *type, mpi_op(op), comm_, r);
    });
    count_direct_allreduce(in);
  }

  void do_reduce_scatter(const TensorView& in, const TensorView& out, ReduceOp op, const OpContext& ctx) override {
    auto type = reduction_type(in.dtype());
    if (ctx.algorithm == Algorithm::generic || !type || !fits_int(static_cast<size_t>(in.numel())))
      return Communicator::do_reduce_scatter(in, out, op, ctx);
    run_native(ctx, [&](MPI_Request* r) {
      return MPI_Ireduce_scatter_block(in.data(), out.data(), static_cast<int>(out.numel()), *type, mpi_op(op), comm_, r);
    });
    count_direct_reduce_scatter(out);
  }

  void do_allgather(const TensorView& in, const TensorView& out, const OpContext& ctx) override {
    if (ctx.algorithm == Algorithm::generic || !fits_int(out.nbytes())) return Communicator::do_allgather(in, out, ctx);
    run_native(ctx, [&](MPI_Request* r) {
      return MPI_Iallgather(in.data(), static_cast<int>(in.nbytes()), MPI_BYTE, out.data(),
                            static_cast<int>(in.nbytes()), MPI_BYTE, comm_, r);
    });
    count_direct_allgatherv(in, std::vector<int64_t>(static_cast<size_t>(size()), in.numel()));
  }

  void do_allgatherv(const TensorView& in, const TensorView& out, std::span<const int64_t> counts,
                     const OpContext& ctx) override {
    if (ctx.algorithm == Algorithm::generic || !fits_int(out.nbytes()))
      return Communicator::do_allgatherv(in, out, counts, ctx);
    std::vector<int> bytes, displs;
    byte_layout(counts, in.element_size(), bytes, displs);
    run_native(ctx, [&](MPI_Request* r) {
      return MPI_Iallgatherv(in.data(), static_cast<int>(in.nbytes()), MPI_BYTE, out.data(), bytes.data(),
                             displs.data(), MPI_BYTE, comm_, r);
    });
    count_direct_allgatherv(in, counts);
  }

  void do_alltoall(const TensorView& in, const TensorView& out, const OpContext& ctx) override {
    if (ctx.algorithm == Algorithm::generic || !fits_int(in.nbytes())) return Communicator::do_alltoall(in, out, ctx);
    const int block = static_cast<int>(in.nbytes() / static_cast<size_t>(size()));
    run_native(ctx, [&](MPI_Request* r) {
      return MPI_Ialltoall(in.data(), block, MPI_BYTE, out.data(), block, MPI_BYTE, comm_, r);
    });
    const std::vector<int64_t> blocks(static_cast<size_t>(size()), in.numel() / size());
    count_direct_alltoallv(in.element_size(), blocks, blocks);
  }

  void do_alltoallv(const TensorView& in, std::span<const int64_t> send_counts, const TensorView& out,
                    std::span<const int64_t> recv_counts, const OpContext& ctx) override {
    // The path must not depend on this rank's sizes (they differ per rank in
    // dropless MoE): always native, counted in elements of an element-sized type.
    if (ctx.algorithm == Algorithm::generic) return Communicator::do_alltoallv(in, send_counts, out, recv_counts, ctx);
    std::vector<int> scounts, sdispls, rcounts, rdispls;
    element_layout(send_counts, scounts, sdispls);
    element_layout(recv_counts, rcounts, rdispls);
    MPI_Datatype element;
    {
      std::lock_guard lock(mpi_mutex());
      SY_MPI_CHECK(MPI_Type_contiguous(static_cast<int>(in.element_size()), MPI_BYTE, &element));
      SY_MPI_CHECK(MPI_Type_commit(&element));
    }
    struct FreeType {
      MPI_Datatype* t;
      ~FreeType() {
        std::lock_guard lock(mpi_mutex());
        MPI_Type_free(t);
      }
    } free_type{&element};
    run_native(ctx, [&](MPI_Request* r) {
      return MPI_Ialltoallv(in.data(), scounts.data(), sdispls.data(), element, out.data(), rcounts.data(),
                            rdispls.data(), element, comm_, r);
    });
    count_direct_alltoallv(in.element_size(), send_counts, recv_counts);
  }

  void do_broadcast(const TensorView& buffer, int root, const OpContext& ctx) override {
    if (ctx.algorithm == Algorithm::generic || !fits_int(buffer.nbytes()))
      return Communicator::do_broadcast(buffer, root, ctx);
    run_native(ctx, [&](MPI_Request* r) {
      return MPI_Ibcast(buffer.data(), static_cast<int>(buffer.nbytes()), MPI_BYTE, root, comm_, r);
    });
    count_direct_broadcast(buffer, root);
  }

  void do_barrier(const OpContext& ctx) override {
    if (ctx.algorithm == Algorithm::generic) return Communicator::do_barrier(ctx);
    run_native(ctx, [&](MPI_Request* r) { return MPI_Ibarrier(comm_, r); });
  }

 private:
  template <typename Start>
  void run_native(const OpContext& ctx, Start start) {
    MPI_Request request;
    {
      std::lock_guard lock(mpi_mutex());
      const int rc = start(&request);
      if (rc != MPI_SUCCESS) SY_THROW(IoError, "MPI ", ctx.name, " failed to start: ", mpi_error_string(rc));
    }
    MPI_Status status;
    wait_requests(&request, 1, &status, ctx.deadline,
                  "MPI " + std::string(ctx.name) + " on '" + name() + "' rank " + std::to_string(rank()));
  }

  // Counts and displacements in elements; MPI's int limits them to 2^31-1 elements.
  static void element_layout(std::span<const int64_t> counts, std::vector<int>& out_counts, std::vector<int>& displs) {
    int64_t offset = 0;
    for (int64_t c : counts) {
      if (!fits_int(static_cast<size_t>(offset + c)))
        SY_THROW(NotSupported, "backend mpi does not support alltoallv offsets over 2^31-1 elements (", offset + c,
                 ")");
      out_counts.push_back(static_cast<int>(c));
      displs.push_back(static_cast<int>(offset));
      offset += c;
    }
  }

  static void byte_layout(std::span<const int64_t> counts, size_t element_size, std::vector<int>& bytes,
                          std::vector<int>& displs) {
    int64_t offset = 0;
    for (int64_t c : counts) {
      bytes.push_back(static_cast<int>(c * static_cast<int64_t>(element_size)));
      displs.push_back(static_cast<int>(offset));
      offset += c * static_cast<int64_t>(element_size);
    }
  }

  std::shared_ptr<MpiSession> session_;
  MPI_Comm comm_;
  MpiTransport transport_;
};

}  // namespace

namespace {
std::atomic<bool> mpi_initialized_by_switchyard{false};
}  // namespace

std::shared_ptr<MpiSession> MpiSession::acquire() {
  static std::mutex m;
  static std::weak_ptr<MpiSession> current;
  std::lock_guard lock(m);
  if (auto s = current.lock()) return s;
  std::shared_ptr<MpiSession> s(new MpiSession());
  current = s;
  return s;
}

MpiSession::MpiSession() {
  std::lock_guard lock(mpi_mutex());
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (finalized) SY_THROW(Error, "MPI was already finalized in this process; it cannot be initialised again");
  int provided = 0;
  if (!initialized) {
    // MPI_Init meets every rank of the job; one that never starts, or is
    // stopped, would hold the others in it for good. Bounded like any op:
    // past the timeout this rank says why and exits, and mpirun ends the job.
    const Milliseconds limit(env().comm_timeout_ms);
    std::mutex m;
    std::condition_variable cv;
    bool done = false;
    std::thread watchdog([&] {
      std::unique_lock lock(m);
      if (cv.wait_for(lock, limit, [&] { return done; })) return;
      // write(2), not stdio: a stderr nobody drains must not keep this rank from exiting.
      char text[400];
      const int n = std::snprintf(text, sizeof text,
                                  "switchyard: MPI_Init did not finish within %lld ms: a rank of the job has not "
                                  "started, is stopped or died during start-up; exiting so the job ends (raise "
                                  "SWITCHYARD_COMM_TIMEOUT_MS if start-up is legitimately this slow)\n",
                                  static_cast<long long>(limit.count()));
      if (n > 0) (void)!::write(2, text, static_cast<size_t>(std::min<int>(n, sizeof text - 1)));
      std::_Exit(1);
    });
    struct Disarm {
      std::mutex& m;
      std::condition_variable& cv;
      bool& done;
      std::thread& t;
      ~Disarm() {
        {
          std::lock_guard lock(m);
          done = true;
        }
        cv.notify_all();
        t.join();
      }
    } disarm{m, cv, done, watchdog};
    SY_MPI_CHECK(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided));
    initialized_here_ = true;
    mpi_initialized_by_switchyard.store(true);
  } else {
    MPI_Query_thread(&provided);
  }
  if (provided < MPI_THREAD_SERIALIZED)
    SY_THROW(Error, "MPI provides thread level ", provided,
             "; Switchyard's executors need MPI_THREAD_SERIALIZED or higher (initialise MPI with MPI_Init_thread)");
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &world_size_);
  int* tag_ub = nullptr;
  int flag = 0;
  MPI_Comm_get_attr(MPI_COMM_WORLD, MPI_TAG_UB, &tag_ub, &flag);
  if (flag && *tag_ub < static_cast<int>(kCollectiveTag))
    SY_THROW(NotSupported, "this MPI's MPI_TAG_UB (", *tag_ub, ") is below the tag range Switchyard needs (",
             kCollectiveTag, ")");
}

void finalize_mpi_now() {
  std::lock_guard lock(mpi_mutex());
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized && mpi_initialized_by_switchyard.load()) MPI_Finalize();
}

MpiSession::~MpiSession() {
  if (!initialized_here_) return;
  std::lock_guard lock(mpi_mutex());
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

std::shared_ptr<Communicator> make_mpi_communicator(MPI_Comm comm, std::string name) {
  auto session = MpiSession::acquire();
  MPI_Comm dup = MPI_COMM_NULL;
  int rank = 0, size = 0;
  // Nonblocking dup, polled like any op, so other communicators keep progressing.
  MPI_Request request;
  {
    std::lock_guard lock(mpi_mutex());
    SY_MPI_CHECK(MPI_Comm_idup(comm, &dup, &request));
  }
  MPI_Status status;
  wait_requests(&request, 1, &status, Clock::now() + Milliseconds(env().comm_timeout_ms),
                "MPI_Comm_idup for '" + name + "'");
  {
    std::lock_guard lock(mpi_mutex());
    SY_MPI_CHECK(MPI_Comm_set_errhandler(dup, MPI_ERRORS_RETURN));
    MPI_Comm_rank(dup, &rank);
    MPI_Comm_size(dup, &size);
  }
  return std::make_shared<MpiCommunicator>(std::move(session), dup, rank, size, std::move(name));
}

std::shared_ptr<Communicator> make_mpi_world_communicator() {
  auto session = MpiSession::acquire();  // initialises MPI before MPI_COMM_WORLD is used
  return make_mpi_communicator(MPI_COMM_WORLD, "world");
}

void mpi_abort(const std::string& message, int code) {
  int rank = -1, initialized = 0;
  MPI_Initialized(&initialized);
  if (initialized) MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  std::fprintf(stderr, "switchyard: rank %d aborting the MPI job: %s\n", rank, message.c_str());
  std::fflush(stderr);
  if (initialized) MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

}  // namespace switchyard
