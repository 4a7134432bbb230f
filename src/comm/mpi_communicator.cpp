// MPI communicator over host buffers. Collectives run on the thread that created it (FUNNELED).
#include <algorithm>

#include "comm/communicator.h"
#include "common/check.h"

#ifdef STARSERVE_HAVE_MPI
#include <mpi.h>
#endif

namespace starserve {

#ifdef STARSERVE_HAVE_MPI
namespace {

// MPI's part in the checking family (common/check.h): MPI returns plain ints, so they travel
// wrapped, as mpi(MPI_Bcast(...)).
struct MpiCode {
  int rc;
};
MpiCode mpi(int rc) { return MpiCode{rc}; }

}  // namespace

bool call_ok(MpiCode c) { return c.rc == MPI_SUCCESS; }
std::string call_message(MpiCode c) {
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(c.rc, msg, &len);
  return std::string(msg, len);
}

namespace {

// MPI counts are ints: element-wise operations on more than this many elements go in pieces, so a
// large message (an anchor's KV at long contexts) is never cut short by a narrowing cast.
constexpr size_t kMaxCount = size_t{1} << 30;

template <typename Fn>
Status in_pieces(size_t n, Fn&& fn) {
  for (size_t off = 0; off < n || off == 0; off += kMaxCount) {
    SS_RETURN_IF_ERROR(fn(off, static_cast<int>(std::min(kMaxCount, n - off))));
    if (n == 0) break;
  }
  return Status();
}

class MpiCommunicator final : public Communicator {
 public:
  explicit MpiCommunicator(WorldLayout layout) : layout_(std::move(layout)) {}
  ~MpiCommunicator() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Finalize();
  }
  const WorldLayout& layout() const override { return layout_; }
  std::string name() const override { return "mpi"; }

  Status all_reduce_max(float* data, size_t n) override {
    return in_pieces(n, [&](size_t off, int count) {
      return SS_CALL_STATUS(mpi(MPI_Allreduce(MPI_IN_PLACE, data + off, count, MPI_FLOAT, MPI_MAX, MPI_COMM_WORLD)),
                        "MPI_Allreduce(max)");
    });
  }
  Status all_reduce_sum(float* data, size_t n) override {
    return in_pieces(n, [&](size_t off, int count) {
      return SS_CALL_STATUS(mpi(MPI_Allreduce(MPI_IN_PLACE, data + off, count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD)),
                        "MPI_Allreduce(sum)");
    });
  }
  Status all_gather(const void* send, void* recv, size_t bytes) override {
    // One contribution per rank at a fixed stride: no piecewise form, so a too-large one is refused.
    if (bytes > kMaxCount) {
      return invalid_argument("all_gather of {} bytes per rank: MPI takes at most {} in one call", bytes, kMaxCount);
    }
    SS_RETURN_IF_CALL_FAILED(mpi(MPI_Allgather(send, static_cast<int>(bytes), MPI_BYTE, recv, static_cast<int>(bytes), MPI_BYTE,
                         MPI_COMM_WORLD)));
    return Status();
  }
  Status broadcast(void* data, size_t bytes, int root) override {
    char* p = static_cast<char*>(data);
    return in_pieces(bytes, [&](size_t off, int count) {
      return SS_CALL_STATUS(mpi(MPI_Bcast(p + off, count, MPI_BYTE, root, MPI_COMM_WORLD)), "MPI_Bcast");
    });
  }
  Status barrier() override {
    SS_RETURN_IF_CALL_FAILED(mpi(MPI_Barrier(MPI_COMM_WORLD)));
    return Status();
  }
  Status send(const void* data, size_t bytes, int dst, int tag) override {
    const char* p = static_cast<const char*>(data);
    return in_pieces(bytes, [&](size_t off, int count) {
      return SS_CALL_STATUS(mpi(MPI_Send(p + off, count, MPI_BYTE, dst, tag, MPI_COMM_WORLD)), "MPI_Send");
    });
  }
  Status recv(void* data, size_t bytes, int src, int tag) override {
    char* p = static_cast<char*>(data);
    return in_pieces(bytes, [&](size_t off, int count) {
      return SS_CALL_STATUS(mpi(MPI_Recv(p + off, count, MPI_BYTE, src, tag, MPI_COMM_WORLD, MPI_STATUS_IGNORE)), "MPI_Recv");
    });
  }
  void abort_job(int code) override { MPI_Abort(MPI_COMM_WORLD, code); }

 private:
  WorldLayout layout_;
};

}  // namespace

Result<std::unique_ptr<Communicator>> make_mpi_communicator(int* argc, char*** argv) {
  int provided = 0;
  SS_RETURN_IF_CALL_FAILED(mpi(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided)));
  // Errors come back as codes so they become Status values with a message, not a silent abort.
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  WorldLayout layout;
  SS_RETURN_IF_CALL_FAILED(mpi(MPI_Comm_rank(MPI_COMM_WORLD, &layout.rank)));
  SS_RETURN_IF_CALL_FAILED(mpi(MPI_Comm_size(MPI_COMM_WORLD, &layout.world_size)));
  MPI_Comm local;
  SS_RETURN_IF_CALL_FAILED(mpi(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, layout.rank, MPI_INFO_NULL, &local)));
  SS_RETURN_IF_CALL_FAILED(mpi(MPI_Comm_rank(local, &layout.local_rank)));
  SS_RETURN_IF_CALL_FAILED(mpi(MPI_Comm_size(local, &layout.local_size)));
  MPI_Comm_free(&local);
  char host[MPI_MAX_PROCESSOR_NAME];
  int len = 0;
  SS_RETURN_IF_CALL_FAILED(mpi(MPI_Get_processor_name(host, &len)));
  layout.host.assign(host, len);
  return std::unique_ptr<Communicator>(std::make_unique<MpiCommunicator>(std::move(layout)));
}

#else

Result<std::unique_ptr<Communicator>> make_mpi_communicator(int*, char***) {
  return unimplemented("this build has no MPI (configure found none); rebuild with Open MPI installed");
}

#endif

}  // namespace starserve
