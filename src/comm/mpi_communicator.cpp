// MPI communicator over host buffers. Collectives run on the thread that created it; the heartbeat thread
// (start_heartbeat) uses a duplicate of the world of its own, which needs MPI_THREAD_MULTIPLE.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <thread>

#include <pthread.h>
#include <time.h>

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

using Clock = std::chrono::steady_clock;

// Waits for a nonblocking operation without spinning for long: MPI_Test in a tight loop for kSpin (a busy rank's
// next message is usually there by then), then between sleeps that double from kFirstSleep up to kMaxSleep. The
// added latency is at most about the time already waited, and never above kMaxSleep; an idle rank wakes about
// 1000 times a second, which costs no measurable CPU.
constexpr auto kSpin = std::chrono::microseconds(100);
constexpr auto kFirstSleep = std::chrono::microseconds(10);
constexpr auto kMaxSleep = std::chrono::microseconds(1000);

Status wait_without_spinning(MPI_Request* request, const char* what) {
  const Clock::time_point start = Clock::now();
  auto sleep = kFirstSleep;
  for (;;) {
    int done = 0;
    SS_RETURN_IF_ERROR(SS_CALL_STATUS(mpi(MPI_Test(request, &done, MPI_STATUS_IGNORE)), what));
    if (done) return Status();
    if (Clock::now() - start < kSpin) continue;
    std::this_thread::sleep_for(sleep);
    sleep = std::min<std::chrono::microseconds>(sleep * 2, kMaxSleep);
  }
}

constexpr int kHeartbeatTag = 1;
constexpr int kHeartbeatReplyTag = 2;
constexpr int kHostChars = 256;  // host names as gathered for the heartbeat, cut to this length

// Workers send rank 0 {progress, main thread's CPU ns} every interval on a duplicate of the world; rank 0's thread
// receives them (any source) and keeps the time and value of each rank's last one, and when its CPU time last grew,
// and answers each with a reply, whose arrival the worker's thread times (root_silent_s).
// Constructed on the main thread (the one whose CPU time is reported).
class MpiHeartbeat final : public Heartbeat {
 public:
  MpiHeartbeat(MPI_Comm comm, int rank, std::vector<std::string> hosts, std::chrono::milliseconds interval)
      : comm_(comm), rank_(rank), interval_(interval), start_(Clock::now()) {
    has_main_clock_ = pthread_getcpuclockid(pthread_self(), &main_clock_) == 0;
    peers_.resize(hosts.size());
    last_.assign(hosts.size(), start_);
    ran_.assign(hosts.size(), start_);
    cpu_ns_.assign(hosts.size(), -1);
    for (size_t r = 0; r < hosts.size(); ++r) {
      peers_[r].rank = static_cast<int>(r);
      peers_[r].host = std::move(hosts[r]);
    }
    last_reply_ns_ = now_ns();
    replies_.assign(hosts.size(), MPI_REQUEST_NULL);
    thread_ = std::thread([this] { rank_ == 0 ? receive_loop() : send_loop(); });
  }
  ~MpiHeartbeat() override {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }
  void set_progress(int64_t value) override { progress_ = value; }
  double root_silent_s() const override {
    if (rank_ == 0) return -1;
    return static_cast<double>(now_ns() - last_reply_ns_.load()) * 1e-9;
  }
  std::vector<PeerBeat> peers() const override {
    if (rank_ != 0) return {};
    std::lock_guard<std::mutex> lock(mu_);
    const Clock::time_point now = Clock::now();
    std::vector<PeerBeat> out(peers_.begin() + 1, peers_.end());
    for (PeerBeat& p : out) {
      p.age_s = std::chrono::duration<double>(now - last_[p.rank]).count();
      p.main_still_s = std::chrono::duration<double>(now - ran_[p.rank]).count();
    }
    return out;
  }

 private:
  // The main thread's CPU time in ns; -1 where the clock cannot be read (then it never counts as still).
  int64_t main_cpu_ns() const {
    timespec ts{};
    if (!has_main_clock_ || clock_gettime(main_clock_, &ts) != 0) return -1;
    return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
  }
  static int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
  }
  void send_loop() {
    MPI_Request pending = MPI_REQUEST_NULL;
    MPI_Request reply = MPI_REQUEST_NULL;
    MPI_Irecv(&reply_in_, 1, MPI_INT64_T, 0, kHeartbeatReplyTag, comm_, &reply);
    while (!stop_) {
      int got = 0;
      if (MPI_Test(&reply, &got, MPI_STATUS_IGNORE) == MPI_SUCCESS && got) {
        last_reply_ns_ = now_ns();
        MPI_Irecv(&reply_in_, 1, MPI_INT64_T, 0, kHeartbeatReplyTag, comm_, &reply);
      }
      int done = 1;
      if (pending != MPI_REQUEST_NULL) MPI_Test(&pending, &done, MPI_STATUS_IGNORE);
      // A beat still in flight (rank 0 not receiving) is not stacked with another.
      if (done) {
        out_[0] = progress_.load();
        out_[1] = main_cpu_ns();
        MPI_Isend(out_, 2, MPI_INT64_T, 0, kHeartbeatTag, comm_, &pending);
      }
      for (auto slept = std::chrono::milliseconds(0); slept < interval_ && !stop_; slept += kPoll) {
        std::this_thread::sleep_for(kPoll);
      }
    }
    // An unreceived beat is dropped with the duplicate communicator when MPI is finalised.
    if (pending != MPI_REQUEST_NULL) MPI_Request_free(&pending);
    if (reply != MPI_REQUEST_NULL) {
      MPI_Cancel(&reply);
      MPI_Wait(&reply, MPI_STATUS_IGNORE);
    }
  }
  void receive_loop() {
    int64_t in[2] = {0, 0};
    MPI_Request request = MPI_REQUEST_NULL;
    MPI_Irecv(in, 2, MPI_INT64_T, MPI_ANY_SOURCE, kHeartbeatTag, comm_, &request);
    while (!stop_) {
      int done = 0;
      MPI_Status status;
      if (MPI_Test(&request, &done, &status) != MPI_SUCCESS) break;
      if (!done) {
        std::this_thread::sleep_for(kPoll);
        continue;
      }
      {
        std::lock_guard<std::mutex> lock(mu_);
        const int src = status.MPI_SOURCE;
        if (src > 0 && src < static_cast<int>(peers_.size())) {
          peers_[src].heard = true;
          peers_[src].progress = in[0];
          last_[src] = Clock::now();
          // An unreadable clock (-1) keeps the rank counted as running.
          if (in[1] < 0 || in[1] != cpu_ns_[src]) ran_[src] = last_[src];
          cpu_ns_[src] = in[1];
          // The reply: one in flight per rank at most (a worker that does not receive gets no stack of them).
          int sent = 1;
          if (replies_[src] != MPI_REQUEST_NULL) MPI_Test(&replies_[src], &sent, MPI_STATUS_IGNORE);
          if (sent) MPI_Isend(&reply_out_, 1, MPI_INT64_T, src, kHeartbeatReplyTag, comm_, &replies_[src]);
        }
      }
      MPI_Irecv(in, 2, MPI_INT64_T, MPI_ANY_SOURCE, kHeartbeatTag, comm_, &request);
    }
    if (request != MPI_REQUEST_NULL) {
      MPI_Cancel(&request);
      MPI_Wait(&request, MPI_STATUS_IGNORE);
    }
    for (MPI_Request& r : replies_) {
      if (r != MPI_REQUEST_NULL) MPI_Request_free(&r);
    }
  }

  static constexpr std::chrono::milliseconds kPoll{20};
  const MPI_Comm comm_;
  const int rank_;
  const std::chrono::milliseconds interval_;
  const Clock::time_point start_;
  std::atomic<bool> stop_{false};
  std::atomic<int64_t> progress_{0};
  clockid_t main_clock_{};
  bool has_main_clock_ = false;
  int64_t out_[2] = {0, 0};  // the beat being sent (send thread): progress, main thread's CPU ns
  int64_t reply_in_ = 0;      // a reply being received (send thread)
  int64_t reply_out_ = 0;     // the reply's payload (receive thread; its arrival is what counts)
  std::vector<MPI_Request> replies_;             // receive thread: the reply in flight to each rank
  std::atomic<int64_t> last_reply_ns_{0};        // send thread: when rank 0's last reply arrived (steady clock)
  mutable std::mutex mu_;
  std::vector<PeerBeat> peers_;         // guarded by mu_; index = rank
  std::vector<Clock::time_point> last_;  // guarded by mu_: each rank's last beat (start_ until one arrives)
  std::vector<Clock::time_point> ran_;   // guarded by mu_: the beat where its main thread's CPU time last grew
  std::vector<int64_t> cpu_ns_;          // guarded by mu_: that CPU time, ns (-1 before the first beat)
  std::thread thread_;
};

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(WorldLayout layout, int thread_level) : layout_(std::move(layout)), thread_level_(thread_level) {}
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

  Status broadcast_idle(void* data, size_t bytes, int root) override {
    char* p = static_cast<char*>(data);
    return in_pieces(bytes, [&](size_t off, int count) {
      MPI_Request request;
      SS_RETURN_IF_ERROR(
          SS_CALL_STATUS(mpi(MPI_Ibcast(p + off, count, MPI_BYTE, root, MPI_COMM_WORLD, &request)), "MPI_Ibcast"));
      return wait_without_spinning(&request, "MPI_Ibcast (test)");
    });
  }
  Status barrier_idle() override {
    MPI_Request request;
    SS_RETURN_IF_ERROR(SS_CALL_STATUS(mpi(MPI_Ibarrier(MPI_COMM_WORLD, &request)), "MPI_Ibarrier"));
    return wait_without_spinning(&request, "MPI_Ibarrier (test)");
  }

  Result<std::unique_ptr<Heartbeat>> start_heartbeat(std::chrono::milliseconds interval) override {
    if (thread_level_ < MPI_THREAD_MULTIPLE) {
      return unimplemented("the MPI library gives thread level {} (MPI_THREAD_MULTIPLE = {} is needed for the "
                           "heartbeat thread)",
                           thread_level_, static_cast<int>(MPI_THREAD_MULTIPLE));
    }
    MPI_Comm dup;
    SS_RETURN_IF_CALL_FAILED(mpi(MPI_Comm_dup(MPI_COMM_WORLD, &dup)));
    MPI_Comm_set_errhandler(dup, MPI_ERRORS_RETURN);
    // Every rank's host, so that rank 0 can name where a silent rank runs.
    std::vector<char> mine(kHostChars, '\0'), all(static_cast<size_t>(kHostChars) * layout_.world_size);
    std::memcpy(mine.data(), layout_.host.data(), std::min<size_t>(layout_.host.size(), kHostChars - 1));
    SS_RETURN_IF_CALL_FAILED(mpi(MPI_Allgather(mine.data(), kHostChars, MPI_CHAR, all.data(), kHostChars, MPI_CHAR, dup)));
    std::vector<std::string> hosts(layout_.world_size);
    for (int r = 0; r < layout_.world_size; ++r) hosts[r] = std::string(all.data() + static_cast<size_t>(r) * kHostChars);
    return std::unique_ptr<Heartbeat>(std::make_unique<MpiHeartbeat>(dup, layout_.rank, std::move(hosts), interval));
  }

 private:
  WorldLayout layout_;
  const int thread_level_;
};

}  // namespace

Result<std::unique_ptr<Communicator>> make_mpi_communicator(int* argc, char*** argv) {
  int provided = 0;
  SS_RETURN_IF_CALL_FAILED(mpi(MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided)));
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
  return std::unique_ptr<Communicator>(std::make_unique<MpiCommunicator>(std::move(layout), provided));
}

#else

Result<std::unique_ptr<Communicator>> make_mpi_communicator(int*, char***) {
  return unimplemented("this build has no MPI (configure found none); rebuild with Open MPI installed");
}

#endif

}  // namespace starserve
