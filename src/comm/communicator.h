// Communicator: the collective and point-to-point operations Star Attention needs between ranks.
// Implementations: local (one process), MPI (CPU buffers), NCCL (device buffers; CUDA builds).
// Only src/comm includes mpi.h / nccl.h; everything else talks to ranks through this interface.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

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

// What rank 0 last heard from another rank's heartbeat (Communicator::start_heartbeat).
struct PeerBeat {
  int rank = 0;
  std::string host;
  bool heard = false;    // at least one beat arrived
  double age_s = 0;      // seconds since its last beat (since start_heartbeat when none arrived yet)
  int64_t progress = 0;  // the value it last reported through Heartbeat::set_progress
  // Seconds since the rank's main thread (the one that started the heartbeat) last ran, as its beats tell: each
  // beat carries that thread's CPU time, and this counts from the beat where it last grew (from start_heartbeat
  // when it never did). A main thread waiting inside a collective still runs (MPI spins or polls); one stopped
  // (SIGSTOP, a debugger) or stuck in the kernel does not.
  double main_still_s = 0;
};

// Liveness reports: every rank other than 0 sends rank 0 a beat (its progress value and its main thread's CPU time)
// every interval from a thread of its own, on a communicator of its own, so beats flow while the main threads are
// blocked inside collectives.
// Destroying it stops the thread (before the communicator is destroyed).
class Heartbeat {
 public:
  virtual ~Heartbeat() = default;
  // Thread-safe; sent with this rank's next beat (the serving engine reports the control steps it completed).
  virtual void set_progress(int64_t value) = 0;
  // Rank 0: every other rank, in rank order. Other ranks: empty. Thread-safe.
  virtual std::vector<PeerBeat> peers() const = 0;
  // Other ranks: seconds since rank 0 last answered a beat (rank 0's heartbeat thread replies to each one), since
  // start_heartbeat while none was answered. A stopped rank 0 (SIGSTOP, a frozen host) answers none. Rank 0: -1.
  // Thread-safe.
  virtual double root_silent_s() const { return -1; }
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
  // Stops every rank of the job (used when a rank cannot continue, so others do not hang). Callable from any
  // thread.
  virtual void abort_job(int code) = 0;

  // Broadcast and barrier for waits that may be long (a worker waiting for rank 0's next step, every rank waiting
  // for the slowest to load the model): the same results as broadcast()/barrier(), but the wait does not spin
  // (MPI: the nonblocking collective, tested in a short spin and then between sleeps that grow to 1 ms), so an idle
  // rank uses no CPU while a busy one sees no added latency. Blocking and nonblocking collectives do not match:
  // every rank must call the _idle form for the same operation.
  virtual Status broadcast_idle(void* data, size_t bytes, int root) { return broadcast(data, bytes, root); }
  virtual Status barrier_idle() { return barrier(); }

  // Collective, on the main thread (whose CPU time the beats carry): starts this rank's heartbeat (see Heartbeat), a
  // beat every `interval`. kUnimplemented where the
  // communicator cannot run one (one process; an MPI library without MPI_THREAD_MULTIPLE).
  virtual Result<std::unique_ptr<Heartbeat>> start_heartbeat(std::chrono::milliseconds /*interval*/) {
    return unimplemented("communicator '{}' has no heartbeat", name());
  }

  // Device-buffer collectives (the NCCL communicator; host-only communicators answer kUnimplemented).
  // Pointers are device memory on this rank's GPU; `stream` is a cudaStream_t passed as void* (nullptr
  // = the legacy default stream) so this header stays free of CUDA. Each call only enqueues the
  // operation on `stream`: the result is there once the stream reaches it, so synchronise the stream
  // (or wait on an event recorded after the call) before reading it from another stream or the host.
  // Every rank must issue the same sequence of device collectives.
  virtual bool has_device_collectives() const { return false; }
  // recv (device) receives world_size * bytes_per_rank bytes, rank r's send at offset r * bytes_per_rank.
  virtual Status all_gather_device(const void* /*send*/, void* /*recv*/, size_t /*bytes_per_rank*/,
                                   void* /*stream*/) {
    return unimplemented("communicator '{}' has no device collectives (all_gather_device)", name());
  }
  // In place over n floats (device) on every rank.
  virtual Status all_reduce_sum_device(float* /*data*/, size_t /*n*/, void* /*stream*/) {
    return unimplemented("communicator '{}' has no device collectives (all_reduce_sum_device)", name());
  }
  virtual Status all_reduce_max_device(float* /*data*/, size_t /*n*/, void* /*stream*/) {
    return unimplemented("communicator '{}' has no device collectives (all_reduce_max_device)", name());
  }
  // bytes (device) from rank root to every rank, in place.
  virtual Status broadcast_device(void* /*data*/, size_t /*bytes*/, int /*root*/, void* /*stream*/) {
    return unimplemented("communicator '{}' has no device collectives (broadcast_device)", name());
  }
};

// A world of one: every collective is the identity.
std::unique_ptr<Communicator> make_local_communicator();

// Initialises MPI (asking for MPI_THREAD_MULTIPLE: the heartbeat thread communicates while the main thread is in
// a collective; every other MPI call stays on the main thread) and builds the layout. Fails with kUnimplemented when the
// build has no MPI. MPI is finalised when the communicator is destroyed.
Result<std::unique_ptr<Communicator>> make_mpi_communicator(int* argc, char*** argv);

// Wraps `host` (typically MPI) with an NCCL communicator on CUDA device `device` for the device-buffer
// collectives; every host-pointer operation, layout() and abort_job() still go to `host`, which the
// result owns. Collective over the host communicator: rank 0 makes the NCCL unique id and broadcasts
// it, every rank selects `device` and joins (ncclCommInitRank). Sets NCCL_NVLS_ENABLE=0 unless the
// environment already sets it. Failures on any rank (bad device, two ranks on one GPU, which NCCL
// refuses, NCCL errors) come back as a Status on every rank; `host` is then destroyed with the
// attempt (for MPI that finalises it), so decide before calling whether NCCL is wanted, e.g. only when
// layout.local_size <= the number of GPUs. kUnimplemented when the build has no NCCL.
// name() is "nccl+" + host->name().
Result<std::unique_ptr<Communicator>> make_nccl_communicator(std::unique_ptr<Communicator> host, int device);

// The GPU this rank drives: local_rank % n_devices (one rank per GPU when local_size <= n_devices).
// -1 when n_devices < 1.
int pick_local_device(const WorldLayout& layout, int n_devices);

}  // namespace starserve
