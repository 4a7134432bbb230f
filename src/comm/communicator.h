// Communicator: the collective and point-to-point operations Star Attention needs between ranks.
// Implementations: local (one process), MPI (CPU buffers), NCCL (device buffers; CUDA builds).
// Only src/comm includes mpi.h / nccl.h; everything else talks to ranks through this interface.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "common/status.h"

namespace starserve {

// Where this process sits in the job. Built once by the communicator factory.
struct WorldLayout {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;   // rank among the processes on this host (picks the GPU)
  int local_size = 1;
  std::string host;
  bool is_coordinator() const { return rank == 0; }
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual const WorldLayout& layout() const = 0;
  int rank() const { return layout().rank; }
  int world_size() const { return layout().world_size; }
  virtual std::string name() const = 0;

  // In place over n floats on every rank.
  virtual Status all_reduce_max(float* data, size_t n) = 0;
  virtual Status all_reduce_sum(float* data, size_t n) = 0;
  // recv receives world_size * bytes_per_rank bytes, rank r's contribution at offset r * bytes_per_rank.
  virtual Status all_gather(const void* send, void* recv, size_t bytes_per_rank) = 0;
  virtual Status broadcast(void* data, size_t bytes, int root) = 0;
  virtual Status barrier() = 0;
  virtual Status send(const void* data, size_t bytes, int dst, int tag) = 0;
  virtual Status recv(void* data, size_t bytes, int src, int tag) = 0;
  // Stops every rank of the job (used when a rank cannot continue, so others do not hang).
  virtual void abort_job(int code) = 0;
};

// A world of one: every collective is the identity.
std::unique_ptr<Communicator> make_local_communicator();

// Initialises MPI (thread level FUNNELED) and builds the layout. Fails with kUnimplemented when the
// build has no MPI. MPI is finalised when the communicator is destroyed.
Result<std::unique_ptr<Communicator>> make_mpi_communicator(int* argc, char*** argv);

// True when this process was started by mpirun/srun with more than one rank (reads the launcher's
// environment; only the config layer calls it).
bool launched_by_mpi();

}  // namespace starserve
