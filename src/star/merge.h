// Exact merge of partial attention across ranks (docs/specs/star-attention.md phase 2 step 3, docs/specs/entropy.md).
// Two implementations with identical results (up to summation order):
//   kAllReduce: all-reduce max of LSE, then one all-reduce sum of [e*O | e | e*H | e*(LSE-M)];
//   kAllGather: all-gather (O, LSE, H) from every rank, then merge locally.
// The all-reduce moves (head_dim + 3) floats per row whatever the world size; the all-gather moves
// world_size * (head_dim + 2) but needs one collective instead of two. bench/ measures both.
#pragma once

#include <vector>

#include "backend/backend.h"
#include "comm/communicator.h"

namespace starserve {

// kAuto picks per call on the device path (NCCL): all-gather for small merges, where its one
// collective beats the all-reduce's two, and all-reduce for large ones, where moving world_size
// copies costs more (device_merge_algo). Through host memory it is the all-reduce.
enum class MergeAlgo { kAllReduce, kAllGather, kAuto };

// kAuto's crossover: all-gather while n_rows * world_size <= this. On 2 and 4 H200s
// (docs/data/h200x2_merge_summary_2026-11-29.txt, docs/data/h200x4_merge_summary_2026-11-29.txt) all-gather was faster at 1, 4 and 32 query
// tokens (32 heads: up to 4,096 rows x ranks) and at 256 tokens on 2 GPUs (16,384), all-reduce at
// 256 tokens on 4 GPUs (32,768) and at 2,048 tokens on both.
constexpr int64_t kAutoAllGatherRows = 16384;

// The algorithm a merge of n_rows over world_size ranks runs on the device path (kAuto: always the
// all-reduce beyond kMaxDeviceMergeParts ranks, which the device all-gather merge does not take).
MergeAlgo device_merge_algo(MergeAlgo algo, int64_t n_rows, int world_size);

// Most ranks the device merge handles in one launch (kernels/attention/attention.h kMergeMaxParts).
constexpr int kMaxDeviceMergeParts = 16;

class RankMerger {
 public:
  RankMerger(Communicator& comm, MergeAlgo algo) : comm_(comm), algo_(algo) {}
  // In place: out (n_rows, head_dim), lse (n_rows), entropy (n_rows) hold this rank's partials on
  // entry and the merged global values on return, identical on every rank.
  Status merge(float* out, float* lse, float* entropy, int64_t n_rows, int head_dim);
  // The same merge on fp32 buffers in a backend's memory. On a GPU with a communicator that has
  // device collectives (NCCL) both algorithms stay on the device: all-reduce max and sum around the
  // backend's merge_sum_terms / merge_sum_finish, or an all-gather and the backend's merge of the
  // world's partials (up to kMaxDeviceMergeParts ranks). Otherwise they travel through host memory.
  Status merge_on(Backend& backend, float* out, float* lse, float* entropy, int64_t n_rows, int head_dim);
  MergeAlgo algo() const { return algo_; }
  int world_size() const { return comm_.world_size(); }
  // After a merge (merge or merge_on, the same backend): for rows [first_row, first_row + n) of it, the entropy
  // (nats) of the row's attention mass over the ranks, -sum_r w_r ln w_r with w_r = exp(LSE_r - LSE): 0 when one
  // rank holds all of it, ln W when W ranks hold equal shares. Read from what the merge keeps (the summed terms'
  // e and e*(LSE_r - M) columns, or the gathered LSEs), so no collective; on a GPU it waits for the stream. One
  // rank: zeros. out: n floats in host memory.
  void rank_entropy(Backend& backend, int64_t first_row, int64_t n, float* out);

 private:
  // Where the last merge left what rank_entropy reads.
  enum class Kept { kNone, kHostSum, kHostGather, kDeviceSum, kDeviceGather };
  Communicator& comm_;
  MergeAlgo algo_;
  Kept kept_ = Kept::kNone;
  int64_t kept_rows_ = 0;
  int kept_dim_ = 0;
  const float* kept_device_ = nullptr;  // kDeviceSum: the summed terms; kDeviceGather: the gathered partials
  std::vector<float> rank_host_;
  void keep(Kept kept, int64_t n_rows, int head_dim, const float* device);
  std::vector<float> buf_, gathered_, max_lse_, host_out_, host_lse_, host_ent_;
  Scratch dev_send_, dev_recv_, dev_max_;
};

}  // namespace starserve
