// The Open MPI backend: native nonblocking collectives (MPI_I*) polled on the
// communicator's executor against the op's deadline, and MPI_Isend/Irecv for
// the generic algorithms (reductions of bf16/f16, Algorithm::generic, and
// buffers beyond MPI's int counts, which travel in 1 GiB pieces).
// An op that times out or fails inside MPI aborts the job with its reason
// (MPI_Abort): MPI cannot cancel a pending operation, and its buffers are
// released when the Work fails.
// Every MPI call of the process is serialised by one lock, so
// MPI_THREAD_SERIALIZED suffices.
#pragma once

#include <mpi.h>

#include <memory>
#include <string>

#include "comm/communicator.h"

namespace switchyard {

// Initialises MPI (MPI_THREAD_SERIALIZED) on first acquire unless the embedder
// already did; finalises when the last holder goes, if we initialised it.
class MpiSession {
 public:
  static std::shared_ptr<MpiSession> acquire();
  ~MpiSession();
  int world_rank() const { return world_rank_; }
  int world_size() const { return world_size_; }

 private:
  MpiSession();
  bool initialized_here_ = false;
  int world_rank_ = 0;
  int world_size_ = 1;
};

// Finalises MPI now if Switchyard initialised it: for embedders whose objects
// may never be destroyed before exit (Python). Communicators destroyed later
// skip their MPI calls; no op may be in flight.
void finalize_mpi_now();

// A communicator over a duplicate of MPI_COMM_WORLD.
std::shared_ptr<Communicator> make_mpi_world_communicator();
// A communicator over a duplicate of `comm` (the caller keeps its own).
std::shared_ptr<Communicator> make_mpi_communicator(MPI_Comm comm, std::string name);

// MPI_Abort(MPI_COMM_WORLD) after printing `message` to stderr: the whole job
// exits non-zero with the message instead of hanging.
[[noreturn]] void mpi_abort(const std::string& message, int code = 1);

}  // namespace switchyard
