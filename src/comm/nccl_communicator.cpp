// NCCL communicator: the device-buffer collectives go through NCCL on this rank's GPU; every
// host-pointer operation goes to the wrapped host communicator (MPI), which also carries the NCCL
// unique id at start-up. Compiled only when CMake found NCCL (STARSERVE_HAVE_NCCL); device_comm.cpp
// holds the kUnimplemented factory for builds without it.
// Threading: like the MPI communicator, one thread (the one that built it) issues all operations.
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <utility>

#include <cuda_runtime.h>
#include <nccl.h>

#include "comm/communicator.h"
#include "common/check.h"
#include "common/cuda_call.h"
#include "common/config.h"

namespace starserve {
namespace {

}  // namespace

// NCCL's part in the checking family (common/check.h); CUDA's is common/cuda_call.h.
bool call_ok(ncclResult_t rc) { return rc == ncclSuccess; }
// ncclGetLastError keeps the text of NCCL's last warning (e.g. "Duplicate GPU detected : rank 1 and
// rank 0 both on CUDA device ..."), which says far more than the result code alone.
std::string call_message(ncclResult_t rc) {
  const char* detail = ncclGetLastError(nullptr);
  const bool has_detail = detail != nullptr && detail[0] != '\0';
  return std::string(ncclGetErrorString(rc)) + (has_detail ? ": " : "") + (has_detail ? detail : "");
}

namespace {

cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

class NcclCommunicator final : public Communicator {
 public:
  // comm is bound to the device that was current at ncclCommInitRank: NCCL launches there whatever
  // device is current later, so the streams passed in must belong to that device.
  NcclCommunicator(std::unique_ptr<Communicator> host, ncclComm_t comm) : host_(std::move(host)), comm_(comm) {}
  // NCCL goes before the host communicator (members are destroyed after this body), so MPI is still
  // up while NCCL tears down. Errors here have nowhere to go and are dropped.
  ~NcclCommunicator() override { (void)ncclCommDestroy(comm_); }
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  const WorldLayout& layout() const override { return host_->layout(); }
  std::string name() const override { return "nccl+" + host_->name(); }

  Status all_reduce_max(float* data, size_t n) override { return host_->all_reduce_max(data, n); }
  Status all_reduce_sum(float* data, size_t n) override { return host_->all_reduce_sum(data, n); }
  Status all_gather(const void* send, void* recv, size_t bytes_per_rank) override {
    return host_->all_gather(send, recv, bytes_per_rank);
  }
  Status broadcast(void* data, size_t bytes, int root) override { return host_->broadcast(data, bytes, root); }
  Status barrier() override { return host_->barrier(); }
  Status send(const void* data, size_t bytes, int dst, int tag) override { return host_->send(data, bytes, dst, tag); }
  Status recv(void* data, size_t bytes, int src, int tag) override { return host_->recv(data, bytes, src, tag); }
  void abort_job(int code) override { host_->abort_job(code); }
  Status broadcast_idle(void* data, size_t bytes, int root) override { return host_->broadcast_idle(data, bytes, root); }
  Status barrier_idle() override { return host_->barrier_idle(); }
  Result<std::unique_ptr<Heartbeat>> start_heartbeat(std::chrono::milliseconds interval) override {
    return host_->start_heartbeat(interval);
  }

  bool has_device_collectives() const override { return true; }

  // Byte-wise (ncclInt8), so any element type gathers; NCCL counts are size_t, no 2^31 limit here.
  Status all_gather_device(const void* send, void* recv, size_t bytes_per_rank, void* stream) override {
    if (bytes_per_rank == 0) return Status();
    SS_RETURN_IF_CALL_FAILED(ncclAllGather(send, recv, bytes_per_rank, ncclInt8, comm_, as_stream(stream)));
    return Status();
  }
  Status all_reduce_sum_device(float* data, size_t n, void* stream) override {
    if (n == 0) return Status();
    SS_RETURN_IF_CALL_FAILED(ncclAllReduce(data, data, n, ncclFloat32, ncclSum, comm_, as_stream(stream)));
    return Status();
  }
  Status all_reduce_max_device(float* data, size_t n, void* stream) override {
    if (n == 0) return Status();
    SS_RETURN_IF_CALL_FAILED(ncclAllReduce(data, data, n, ncclFloat32, ncclMax, comm_, as_stream(stream)));
    return Status();
  }
  Status broadcast_device(void* data, size_t bytes, int root, void* stream) override {
    if (bytes == 0) return Status();
    SS_RETURN_IF_CALL_FAILED(ncclBroadcast(data, data, bytes, ncclInt8, root, comm_, as_stream(stream)));
    return Status();
  }

 private:
  std::unique_ptr<Communicator> host_;
  ncclComm_t comm_;
};

// Checks `device` against this host's devices and makes it current.
Status select_device(int device, int rank, int* n_devices) {
  *n_devices = 0;
  SS_RETURN_IF_ERROR(SS_CALL_STATUS(cudaGetDeviceCount(n_devices), "cudaGetDeviceCount"));
  if (device < 0 || device >= *n_devices) {
    return invalid_argument("rank {}: CUDA device {} is out of range: this host has {} device(s)", rank, device,
                            *n_devices);
  }
  return SS_CALL_STATUS(cudaSetDevice(device), "cudaSetDevice");
}

// Every rank learns whether any rank failed a step, so that none goes on into a collective (NCCL init)
// that a failed rank will never join. A failed rank returns its own error; the others name the
// highest failed rank (rank + 1 travels as a float: exact below 2^24).
Status agree_on(Communicator& host, const Status& local, const char* step) {
  const int rank = host.layout().rank;
  float failed_rank_plus_1 = local.ok() ? 0.0f : static_cast<float>(rank + 1);
  SS_RETURN_IF_ERROR(host.all_reduce_max(&failed_rank_plus_1, 1));
  if (!local.ok()) return local;
  if (failed_rank_plus_1 > 0.0f) {
    return unavailable("rank {} failed {} (its own error says why); rank {} stops too",
                       static_cast<int>(failed_rank_plus_1) - 1, step, rank);
  }
  return Status();
}

}  // namespace

Result<std::unique_ptr<Communicator>> make_nccl_communicator(std::unique_ptr<Communicator> host, int device) {
  if (host == nullptr) return invalid_argument("make_nccl_communicator: the host communicator is null");
  const WorldLayout layout = host->layout();

  // Rank 0's unique id travels with a flag, so a failure there reaches every rank through the
  // broadcast instead of leaving them blocked in ncclCommInitRank.
  struct IdMessage {
    int32_t ok = 0;
    ncclUniqueId id{};
  };
  IdMessage message;
  Status local;
  if (layout.rank == 0) {
    local = SS_CALL_STATUS(ncclGetUniqueId(&message.id), "ncclGetUniqueId");
    message.ok = local.ok() ? 1 : 0;
  }
  SS_RETURN_IF_ERROR(host->broadcast(&message, sizeof(message), 0));
  if (layout.rank != 0 && message.ok == 0) {
    local = unavailable("rank 0 could not create the NCCL unique id");
  }
  int n_devices = 0;
  if (local.ok()) local = select_device(device, layout.rank, &n_devices);
  SS_RETURN_IF_ERROR(agree_on(*host, local, "to select its CUDA device before NCCL init"));

  apply_library_environment();  // NVLink multicast off (common/config.h)

  ncclComm_t comm = nullptr;
  Status init =
      SS_CALL_STATUS(ncclCommInitRank(&comm, layout.world_size, message.id, layout.rank), "ncclCommInitRank");
  if (!init.ok() && layout.local_size > n_devices) {
    // The usual cause: NCCL refuses two ranks on one GPU.
    init = Status(init.code(),
                  fmt::format("{} [rank {} on CUDA device {}: {} ranks on host '{}' share {} device(s); "
                              "NCCL needs one GPU per rank]",
                              init.message(), layout.rank, device, layout.local_size, layout.host, n_devices));
  }
  Status agreed = agree_on(*host, init, "in ncclCommInitRank");
  if (!agreed.ok()) {
    // This rank joined but a peer did not: the communicator is unusable, release it without waiting on peers.
    if (init.ok() && comm != nullptr) (void)ncclCommAbort(comm);
    return agreed;
  }
  return std::unique_ptr<Communicator>(std::make_unique<NcclCommunicator>(std::move(host), comm));
}

}  // namespace starserve
