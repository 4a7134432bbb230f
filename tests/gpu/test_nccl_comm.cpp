// NCCL communicator (src/comm/nccl_communicator.cpp) under mpirun, for any world size with one GPU
// per rank: all_gather_device, all_reduce_sum_device, all_reduce_max_device and broadcast_device on device buffers
// against the values each rank computes on the host for every rank, and the host-pointer operations
// through the wrapper. On a host with more ranks than GPUs NCCL refuses to put two ranks on one GPU:
// there the test checks that make_nccl_communicator answers with a Status on every rank instead.
// Without a CUDA device it prints SKIPPED and exits 77 (SKIP_RETURN_CODE of nccl_comm_np*).
//
// The whole file is compiled only into nccl_comm_tests (STARSERVE_NCCL_COMM_TEST): kernels/CMakeLists.txt
// globs tests/gpu/test_*.cpp into gpu_kernel_tests as well, which has no MPI or NCCL.
#ifdef STARSERVE_NCCL_COMM_TEST

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include <cuda_runtime.h>

#include "comm/communicator.h"
#include "common/cuda_call.h"

namespace starserve {
namespace {

constexpr int kSkipReturnCode = 77;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

Communicator* g_comm = nullptr;  // the NCCL communicator, null when its init failed
Status g_init_status;            // make_nccl_communicator's answer on this rank
bool g_ranks_share_gpu = false;  // more ranks on this host than GPUs: NCCL init must fail

// Owns n elements of device memory (at least one, so a pointer exists for n == 0).
template <typename T>
class DeviceArray {
 public:
  explicit DeviceArray(size_t n) : n_(n) { SS_CHECK_CALL(cudaMalloc(&ptr_, sizeof(T) * (n ? n : 1))); }
  explicit DeviceArray(const std::vector<T>& host) : DeviceArray(host.size()) {
    SS_CHECK_CALL(cudaMemcpy(ptr_, host.data(), sizeof(T) * n_, cudaMemcpyHostToDevice));
  }
  ~DeviceArray() { cudaFree(ptr_); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  T* get() const { return ptr_; }
  std::vector<T> download() const {
    std::vector<T> host(n_);
    SS_CHECK_CALL(cudaMemcpy(host.data(), ptr_, sizeof(T) * n_, cudaMemcpyDeviceToHost));
    return host;
  }

 private:
  T* ptr_ = nullptr;
  size_t n_ = 0;
};

class Stream {
 public:
  Stream() { SS_CHECK_CALL(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
  ~Stream() { cudaStreamDestroy(s_); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  void* handle() const { return s_; }
  void sync() const { SS_CHECK_CALL(cudaStreamSynchronize(s_)); }

 private:
  cudaStream_t s_ = nullptr;
};

#define REQUIRE_NCCL()                                                                             \
  do {                                                                                             \
    if (g_ranks_share_gpu) GTEST_SKIP() << "ranks share a GPU on this host: NCCL init is refused"; \
    ASSERT_NE(g_comm, nullptr) << g_init_status.to_string();                                       \
  } while (0)

// Byte i of rank r's contribution: depends on both, so a block from the wrong rank or offset shows.
uint8_t gather_byte(int r, size_t i) { return static_cast<uint8_t>((r * 131 + i * 7 + (i >> 8)) & 0xff); }

// Rank r's value at i for the reductions. Integers of magnitude < 2^24 are exact in fp32 and so is
// every partial sum of them here, so the reduced values are exact whatever order NCCL adds in.
float sum_input(int r, size_t i) { return static_cast<float>(static_cast<int>(i % 251) - 125 + r); }

// Max inputs, with the -inf rows that the LSE merge produces for ranks holding no keys for a query:
// element 0 is -inf on every rank (result -inf), element 1 only on all but the last rank.
float max_input(int r, int world_size, size_t i) {
  if (i == 0) return kNegInf;
  if (i == 1) return r == world_size - 1 ? 3.0f : kNegInf;
  return static_cast<float>(static_cast<int>((i * 7 + static_cast<size_t>(r) * 13) % 101) - 50);
}

TEST(NcclCommunicator, InitFailsWithStatusWhenRanksShareAGpu) {
  if (!g_ranks_share_gpu) GTEST_SKIP() << "one GPU per rank on this host";
  EXPECT_FALSE(g_init_status.ok()) << "NCCL accepted two ranks on one GPU";
  EXPECT_FALSE(g_init_status.message().empty());
  std::printf("make_nccl_communicator refused as expected: %s\n", g_init_status.to_string().c_str());
}

TEST(NcclCommunicator, NameLayoutAndHostOperations) {
  REQUIRE_NCCL();
  EXPECT_EQ(g_comm->name(), "nccl+mpi");
  EXPECT_TRUE(g_comm->has_device_collectives());
  const int world = g_comm->world_size();
  ASSERT_GE(g_comm->rank(), 0);
  ASSERT_LT(g_comm->rank(), world);
  // The host-pointer collectives still go through MPI.
  float v = static_cast<float>(g_comm->rank() + 1);
  ASSERT_TRUE(g_comm->all_reduce_sum(&v, 1).ok());
  EXPECT_EQ(v, static_cast<float>(world * (world + 1) / 2));
  ASSERT_TRUE(g_comm->barrier().ok());
}

TEST(NcclCommunicator, AllGatherDevice) {
  REQUIRE_NCCL();
  const int rank = g_comm->rank();
  const int world = g_comm->world_size();
  Stream stream;
  // 1 byte, an odd size, and one well past NCCL's chunk sizes.
  for (size_t bytes : {size_t{1}, size_t{1237}, (size_t{4} << 20) + 5}) {
    std::vector<uint8_t> mine(bytes);
    for (size_t i = 0; i < bytes; ++i) mine[i] = gather_byte(rank, i);
    DeviceArray<uint8_t> send(mine);
    DeviceArray<uint8_t> recv(bytes * world);
    SS_CHECK_CALL(cudaMemset(recv.get(), 0, bytes * world));
    ASSERT_TRUE(g_comm->all_gather_device(send.get(), recv.get(), bytes, stream.handle()).ok());
    stream.sync();
    const std::vector<uint8_t> got = recv.download();
    size_t bad = 0;
    for (int r = 0; r < world; ++r) {
      for (size_t i = 0; i < bytes; ++i) {
        if (got[r * bytes + i] != gather_byte(r, i) && bad++ < 5) {
          ADD_FAILURE() << "bytes_per_rank " << bytes << ": byte " << i << " of rank " << r << " is "
                        << int(got[r * bytes + i]) << ", expected " << int(gather_byte(r, i));
        }
      }
    }
    EXPECT_EQ(bad, 0u) << "bytes_per_rank " << bytes;
  }
}

TEST(NcclCommunicator, AllGatherDeviceInPlace) {
  REQUIRE_NCCL();
  const int rank = g_comm->rank();
  const int world = g_comm->world_size();
  const size_t bytes = 4099;
  // In place: this rank's block already sits at its offset in recv.
  std::vector<uint8_t> buffer(bytes * world, 0);
  for (size_t i = 0; i < bytes; ++i) buffer[rank * bytes + i] = gather_byte(rank, i);
  DeviceArray<uint8_t> recv(buffer);
  Stream stream;
  ASSERT_TRUE(g_comm->all_gather_device(recv.get() + rank * bytes, recv.get(), bytes, stream.handle()).ok());
  stream.sync();
  const std::vector<uint8_t> got = recv.download();
  size_t bad = 0;
  for (int r = 0; r < world; ++r) {
    for (size_t i = 0; i < bytes; ++i) bad += got[r * bytes + i] != gather_byte(r, i);
  }
  EXPECT_EQ(bad, 0u);
}

TEST(NcclCommunicator, AllReduceSumDevice) {
  REQUIRE_NCCL();
  const int rank = g_comm->rank();
  const int world = g_comm->world_size();
  Stream stream;
  for (size_t n : {size_t{1}, size_t{1000}, (size_t{1} << 20) + 3}) {
    std::vector<float> mine(n);
    for (size_t i = 0; i < n; ++i) mine[i] = sum_input(rank, i);
    DeviceArray<float> data(mine);
    ASSERT_TRUE(g_comm->all_reduce_sum_device(data.get(), n, stream.handle()).ok());
    stream.sync();
    const std::vector<float> got = data.download();
    size_t bad = 0;
    for (size_t i = 0; i < n; ++i) {
      float expected = 0.0f;
      for (int r = 0; r < world; ++r) expected += sum_input(r, i);
      if (got[i] != expected && bad++ < 5) {
        ADD_FAILURE() << "n " << n << ": element " << i << " is " << got[i] << ", expected " << expected;
      }
    }
    EXPECT_EQ(bad, 0u) << "n " << n;
  }
}

TEST(NcclCommunicator, AllReduceMaxDevice) {
  REQUIRE_NCCL();
  const int rank = g_comm->rank();
  const int world = g_comm->world_size();
  Stream stream;
  for (size_t n : {size_t{2}, size_t{1000}, (size_t{1} << 20) + 3}) {
    std::vector<float> mine(n);
    for (size_t i = 0; i < n; ++i) mine[i] = max_input(rank, world, i);
    DeviceArray<float> data(mine);
    ASSERT_TRUE(g_comm->all_reduce_max_device(data.get(), n, stream.handle()).ok());
    stream.sync();
    const std::vector<float> got = data.download();
    size_t bad = 0;
    for (size_t i = 0; i < n; ++i) {
      float expected = kNegInf;
      for (int r = 0; r < world; ++r) expected = std::max(expected, max_input(r, world, i));
      if (got[i] != expected && bad++ < 5) {
        ADD_FAILURE() << "n " << n << ": element " << i << " is " << got[i] << ", expected " << expected;
      }
    }
    EXPECT_EQ(bad, 0u) << "n " << n;
  }
}

TEST(NcclCommunicator, BroadcastDeviceFromEveryRoot) {
  REQUIRE_NCCL();
  const int rank = g_comm->rank();
  const int world = g_comm->world_size();
  Stream stream;
  for (int root = 0; root < world; ++root) {
    for (size_t bytes : {size_t{1}, size_t{4099}, (size_t{4} << 20) + 5}) {
      std::vector<uint8_t> mine(bytes);
      for (size_t i = 0; i < bytes; ++i) mine[i] = gather_byte(rank, i);
      DeviceArray<uint8_t> data(mine);
      ASSERT_TRUE(g_comm->broadcast_device(data.get(), bytes, root, stream.handle()).ok());
      stream.sync();
      const std::vector<uint8_t> got = data.download();
      size_t bad = 0;
      for (size_t i = 0; i < bytes; ++i) bad += got[i] != gather_byte(root, i);
      EXPECT_EQ(bad, 0u) << "root " << root << ", bytes " << bytes;
    }
  }
}

TEST(NcclCommunicator, ZeroCountsAreNoOps) {
  REQUIRE_NCCL();
  Stream stream;
  EXPECT_TRUE(g_comm->all_gather_device(nullptr, nullptr, 0, stream.handle()).ok());
  EXPECT_TRUE(g_comm->all_reduce_sum_device(nullptr, 0, stream.handle()).ok());
  EXPECT_TRUE(g_comm->all_reduce_max_device(nullptr, 0, stream.handle()).ok());
  EXPECT_TRUE(g_comm->broadcast_device(nullptr, 0, 0, stream.handle()).ok());
  stream.sync();
}

TEST(NcclCommunicator, HostOnlyCommunicatorsHaveNoDeviceCollectives) {
  auto local = make_local_communicator();
  EXPECT_FALSE(local->has_device_collectives());
  float x = 1.0f;
  EXPECT_EQ(local->all_reduce_sum_device(&x, 1, nullptr).code(), StatusCode::kUnimplemented);
  EXPECT_EQ(local->all_reduce_max_device(&x, 1, nullptr).code(), StatusCode::kUnimplemented);
  EXPECT_EQ(local->all_gather_device(&x, &x, sizeof(x), nullptr).code(), StatusCode::kUnimplemented);
  EXPECT_EQ(local->broadcast_device(&x, sizeof(x), 0, nullptr).code(), StatusCode::kUnimplemented);
}

TEST(NcclCommunicator, PickLocalDevice) {
  WorldLayout layout;
  layout.local_rank = 5;
  EXPECT_EQ(pick_local_device(layout, 8), 5);
  EXPECT_EQ(pick_local_device(layout, 4), 1);
  EXPECT_EQ(pick_local_device(layout, 1), 0);
  EXPECT_EQ(pick_local_device(layout, 0), -1);
}

}  // namespace
}  // namespace starserve

int main(int argc, char** argv) {
  using namespace starserve;
  auto host = make_mpi_communicator(&argc, &argv);
  if (!host.ok()) {
    std::fprintf(stderr, "%s\n", host.status().to_string().c_str());
    return 1;
  }
  const WorldLayout layout = (*host)->layout();
  int n_devices = 0;
  if (cudaGetDeviceCount(&n_devices) != cudaSuccess) n_devices = 0;
  // Every rank skips when any rank has no GPU, so none is left waiting in a collective.
  float no_device = n_devices == 0 ? 1.0f : 0.0f;
  if (!(*host)->all_reduce_max(&no_device, 1).ok()) return 1;
  if (no_device > 0.0f) {
    if (layout.rank == 0) std::printf("SKIPPED: no CUDA device (nccl_comm_tests, %d rank(s))\n", layout.world_size);
    std::fflush(stdout);
    return kSkipReturnCode;
  }

  g_ranks_share_gpu = layout.local_size > n_devices;
  auto nccl = make_nccl_communicator(std::move(*host), pick_local_device(layout, n_devices));
  std::unique_ptr<Communicator> comm;
  if (nccl.ok()) {
    comm = std::move(*nccl);
    g_comm = comm.get();
  } else {
    g_init_status = nccl.status();  // the MPI communicator went with it: no more collectives below
  }

  ::testing::InitGoogleTest(&argc, argv);
  if (layout.rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  int rc = RUN_ALL_TESTS();
  if (comm != nullptr) {
    float failed = rc != 0 ? 1.0f : 0.0f;
    if (!comm->all_reduce_max(&failed, 1).ok()) failed = 1.0f;
    rc = failed > 0.0f ? 1 : 0;
  }
  g_comm = nullptr;
  return rc;
}

#endif  // STARSERVE_NCCL_COMM_TEST
