// The control protocol between rank 0 and the worker ranks. Rank 0 decides each step, encodes it
// as one message of int64 words and broadcasts it; then every rank, rank 0 included, executes the
// same message with its StepExecutor (SPMD: ranks never decide on their own, so they stay in step).
//
// Commands (first word), then the entry count, then the entries:
//   ADMIT   (id, mode, block_size, anchor_size, n_blocks, exact_layout, layers_per_chunk, prompt_logprobs,
//           after_context, from, n_context, context tokens...) per request: every rank records the request and
//           derives the same layout; prompt_logprobs >= 0 asks for prompt log-probabilities with that many alternatives
//           (-1: none), after_context is the token after the context (the query's first); from >= 0 names a
//           cached context (engine/context_cache.h) whose KV the request forks instead of running phase 1 (its
//           context tokens are then not sent: n_context 0, the layout is the entry's);
//   RETAIN  (id, entry) per request whose phase 1 is complete and whose query has not gone through: every rank
//           forks the request's KV as it stands, its context share, into the cached context `entry`;
//   ENCODE  (id, s) per request: its s-th phase-1 step on every rank: chunk s % C of block s / C,
//           where C = chunks per block (ContextEncoder::chunks_per_block of layers_per_chunk; a
//           chunk is a range of layers, see engine/scheduler.h); exact mode: chunk s of the one
//           collective forward;
//   DECODE  (id, first position, n, tokens...) per request: one forward over the batch, the query of
//           requests just encoded and one token for each running request; Phase2Attention merges
//           across ranks once per layer. A request's first DECODE also gathers its phase-1 prompt
//           log-probabilities (each rank scored its own blocks) on rank 0, which scores the query;
//   FORK    (id, child) per choice of an n > 1 request, after the DECODE that took the request's query: every
//           rank forks the request's KV and phase-2 placement into `child`, which decodes on its own from then;
//   RELEASE (id) per request or cached context: every rank frees its KV;
//   STOP    no entries: the workers return.
#pragma once

#include <cstdint>
#include <map>
#include <span>
#include <vector>

#include "comm/communicator.h"
#include "kv/kv_cache.h"
#include "model/model.h"
#include "star/context_encoder.h"

namespace starserve {

enum class ControlCommand : int64_t { kStop = 1, kAdmit, kEncode, kDecode, kRelease, kRetain, kFork };

// One step's message, built on rank 0.
class ControlMessage {
 public:
  explicit ControlMessage(ControlCommand cmd) : words_{static_cast<int64_t>(cmd), 0} {}
  void add_admit(SeqId id, const ContextPlan& plan, int layers_per_chunk, std::span<const int32_t> context,
                 int prompt_logprobs = -1, int32_t after_context = -1, SeqId from = -1);
  void add_retain(SeqId id, SeqId entry);
  void add_fork(SeqId id, SeqId child);
  void add_encode(SeqId id, int k);
  void add_decode(SeqId id, int64_t first_position, std::span<const int32_t> tokens);
  void add_release(SeqId id);
  bool empty() const { return words_[1] == 0; }
  std::vector<int64_t>& words() { return words_; }

 private:
  void begin_entry() { ++words_[1]; }
  std::vector<int64_t> words_;
};

// Rank 0 sends (length, words); the workers receive into msg. Waits without spinning
// (Communicator::broadcast_idle), so every rank must take part through this function.
Status broadcast_control(Communicator& comm, std::vector<int64_t>& msg);

// What every rank keeps per request, and how it executes a step.
class StepExecutor {
 public:
  StepExecutor(Model& model, KvCache& cache, Communicator& comm);

  // Executes one message, then every rank reports the KV pages it holds (one small all-gather) for
  // the per-rank metrics. On rank 0 a DECODE step returns one logits row per entry in *logits, or,
  // when `rows` is not empty, one token per entry picked on the device (Model::forward_sample) in
  // `sampled`.
  Status execute(const std::vector<int64_t>& msg, std::vector<float>* logits, std::span<const SampleRow> rows = {},
                 std::span<int32_t> sampled = {});
  const std::vector<int64_t>& pages_used() const { return pages_used_; }
  // Phase-1 steps (chunks) this rank has executed, over all requests.
  int64_t phase1_steps() const { return phase1_steps_; }
  // Chunks of each block's forward for a request admitted with layers_per_chunk.
  int chunks_per_block(int layers_per_chunk) const { return encoder_.chunks_per_block(layers_per_chunk); }
  // The layout every rank will compute for this context, with the model's own limits checked
  // (ContextEncoder::layout_for), so that rank 0 refuses a request before any rank runs it.
  Result<StarLayout> layout_for(int64_t n_context, const ContextPlan& plan) const {
    return encoder_.layout_for(n_context, plan);
  }
  Phase2Attention& phase2() { return phase2_; }
  // Rank 0, after a request's first DECODE: its prompt log-probabilities, one per prompt token after
  // the first, in order (position p scores token p + 1); empty when it asked for none. Moves them out.
  std::vector<ScoredToken> take_prompt_scores(SeqId id);

 private:
  struct Seq {
    AttentionMode mode = AttentionMode::kStar;
    StarLayout layout;
    std::vector<int32_t> context;
    int layers_per_chunk = 0;  // 0: each block's forward in one step
    bool registered = false;
    int prompt_top_k = -1;            // prompt log-probabilities: alternatives per token; -1 = none
    std::vector<int32_t> next;        // the token after each context position (ContextScoring::next)
    std::vector<ScoredToken> scores;  // this rank's phase-1 scores; rank 0 after the first DECODE: all
  };
  // Every rank's phase-1 scores of s to rank 0, in position order (a collective of every rank).
  Status gather_scores(Seq& s);
  Status execute_command(const std::vector<int64_t>& msg, std::vector<float>* logits, std::span<const SampleRow> rows,
                         std::span<int32_t> sampled);

  Model& model_;
  KvCache& cache_;
  Communicator& comm_;
  ContextEncoder encoder_;
  Phase2Attention phase2_;
  std::map<SeqId, Seq> seqs_;
  std::vector<int64_t> pages_used_;
  int64_t phase1_steps_ = 0;
};

}  // namespace starserve
