// Exact merge of partial attention across ranks (star-attention.md phase 2 step 3, entropy.md).
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

enum class MergeAlgo { kAllReduce, kAllGather };

// Most ranks the device merge handles in one launch (kernels/attention.h kMergeMaxParts).
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

 private:
  Communicator& comm_;
  MergeAlgo algo_;
  std::vector<float> buf_, gathered_, max_lse_, host_out_, host_lse_, host_ent_;
  Scratch dev_send_, dev_recv_, dev_max_;
};

}  // namespace starserve
