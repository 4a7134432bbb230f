// Engine: what the server (and any other front end) sees of inference. Requests arrive as token
// ids with their settings; results leave as events. The engine runs on rank 0 and drives the
// worker ranks through the control protocol (engine/control.h); `starserve generate` and `serve`
// both submit to it; it never sees protobuf types.
// Thread-safety: submit/cancel/info may be called from any thread; events are delivered on the
// engine's own thread, in order per request, and must not block.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "common/config.h"
#include "common/status.h"
#include "star/attention_stats.h"
#include "engine/decode_controller.h"
#include "engine/scheduler.h"
#include "engine/sampling.h"
#include "engine/text_controller.h"

namespace starserve {

// Choices per request (EngineRequest::n), at most.
constexpr int kMaxChoices = 16;

struct EngineRequest {
  std::vector<int32_t> context;  // encoded in phase 1 (may be empty)
  std::vector<int32_t> query;    // phase 2; at least one token
  // A plain prompt with no context/query split of its own: `query` holds the whole prompt (context
  // empty) and the engine splits it, keeping the last StarConfig::query_tail tokens as the query
  // (split_plain_prompt's rule when 0). Front ends never decide the split themselves.
  bool split_prompt = false;
  SamplingParams sampling;       // validated by the engine
  AttentionMode mode = AttentionMode::kStar;
  int block_size = 0;            // 0 = server default
  int anchor_size = -1;          // -1 = server default
  int n_blocks = 0;              // > 0: blocks of ceil(n_context / n_blocks) tokens, overriding block_size
  ExactLayout exact_layout = ExactLayout::kAuto;  // exact mode's token assignment; kAuto = server default
  bool return_entropy = false;   // per-layer/head mean entropy of the query and generated tokens
  // Prompt log-probabilities with this many alternatives per token, in [0, kMaxLogprobs] (unset:
  // none): for every prompt token after the first, its logprob given the tokens before it, from
  // the model's own distribution (no penalties, no temperature). Context tokens are scored where
  // phase 1 encodes them (star: under block-local attention with the anchor), the query in phase 2.
  std::optional<int> prompt_logprobs;
  std::optional<std::chrono::steady_clock::time_point> deadline;
  // Context reuse: the id a finished request returned (EngineEvent::context_id) instead of the context
  // itself (context empty, split_prompt false); kNotFound once no cached context has it.
  std::string context_id;
  // Choices: n samples of the same prompt. The prompt is encoded once: after its query went through, the
  // sequence is forked n - 1 times (sharing the context's and the query's KV) and each choice samples from the
  // same logits on. Events carry their choice; each choice ends with a kFinished of its own. Choice c > 0
  // samples with seed + c when a seed is set. In [1, kMaxChoices], and at most max_running.
  int n = 1;
};

struct EngineUsage {
  int64_t context_tokens = 0;
  int64_t query_tokens = 0;
  int64_t completion_tokens = 0;
  int64_t cached_context_tokens = 0;  // context tokens whose KV came from a cached context (no phase 1)
};

struct EngineTiming {
  double queue_ms = 0;           // submit -> phase 1 start
  double phase1_ms = 0;          // context encoding (slowest rank)
  double time_to_first_token_ms = 0;  // submit -> first token
  double tokens_per_second = 0;  // decode rate after the first token
  double decode_ms = 0;          // first token -> finish
  int phase1_steps = 0;          // phase-1 steps (prefill chunks) it ran
};

struct EngineEvent {
  enum class Kind { kToken, kFinished };
  Kind kind = Kind::kToken;
  int choice = 0;                    // which of the request's n choices (EngineRequest::n)
  TokenEvent token;                  // kToken: the token and its new text
  FinishReason finish = FinishReason::kUnspecified;  // kFinished
  Status error;                      // kFinished with FinishReason::kError
  EngineUsage usage;                 // kFinished: completion_tokens are this choice's
  EngineTiming timing;               // kFinished
  std::optional<EntropyStats> entropy;  // kFinished, when requested (choice 0: its query and tokens)
  // kFinished, when requested (EngineRequest::prompt_logprobs) and the prompt went through the
  // model: one per prompt token after the first, in order (token = that prompt token).
  std::vector<TokenLogprobs> prompt_logprobs;
  // kFinished: the context's id when its KV is cached for later requests (EngineRequest::context_id);
  // empty when it was not (no context, context reuse off, prompt log-probabilities asked for, no room).
  std::string context_id;
};

using EngineEventFn = std::function<void(const EngineEvent&)>;

struct EngineInfo {
  std::string model_name;
  std::string model_path;
  std::string architecture;
  int n_layers = 0, n_heads = 0, n_kv_heads = 0, hidden = 0, n_vocab = 0;
  int max_context = 0;
  int world_size = 1;
  std::string communicator;          // Communicator::name(): "local", "mpi", "nccl+mpi"
  std::vector<std::string> devices;  // one per rank: "cpu" or the GPU name
  StarConfig star_defaults;
  // Per rank: the pool's size; the pages neither reserved by admitted requests nor held by cached contexts (which
  // give theirs up to an admission that needs them, so kv_pages_free + context_cache_pages are admittable).
  int64_t kv_pages_total = 0, kv_pages_free = 0;
  std::vector<int64_t> kv_pages_used;  // per rank: pages actually holding KV, as of the last step
  double merge_seconds_total = 0;      // rank 0: time in the cross-rank attention merge
  int64_t merges_total = 0;            // rank 0: merges (one per layer per decode step)
  int64_t phase1_steps = 0;            // rank 0: phase-1 steps (prefill chunks) run, all requests
  // Rank 0's engine thread, seconds in each part of its steps: schedule (cancels, releases, admission, the
  // context cache's steps, building the decode), prefill (phase-1 steps), forward (the decode step's broadcast and
  // forward, until its tokens or logits are back) and tokens (sampling on the host, stop checks, detokenizing,
  // the events); with the decode steps run and the sequences they decoded. Where a step's time goes under load.
  // forward_wait: the part of forward the host spent blocked on its device (Backend::wait_seconds), so forward
  // minus forward_wait is the host's own work (broadcast, building and enqueueing the step).
  double engine_schedule_s = 0, engine_prefill_s = 0, engine_forward_s = 0, engine_tokens_s = 0;
  double engine_forward_wait_s = 0;
  int64_t decode_steps = 0, decoded_sequences = 0;
  int queue_depth = 0, running = 0;
  // Context reuse (engine/context_cache.h): cached contexts, the KV pages they hold (busiest rank), and
  // admissions of requests with a context that found it cached (hits) or encoded it (misses).
  int64_t context_cache_max_pages = 0;  // SchedulerConfig::context_cache_pages (-1: the pool, 0: off)
  int64_t context_cache_entries = 0, context_cache_pages = 0;
  int64_t context_cache_hits = 0, context_cache_misses = 0, context_cache_evictions = 0;
  // The KV cache's layout (GetModelInfo's KvCacheInfo): n tokens take rows(n) rows of
  // kv_bytes_per_row bytes (rows(n) = n, or ceil(n / kv_compressed_chunk) + 1), plus
  // kv_state_bytes_per_sequence beside the pages.
  int64_t kv_bytes_per_row = 0;
  std::string kv_dtype;
  int kv_page_size = 0;
  int kv_compressed_chunk = 0, kv_leading_tokens = 0;
  int64_t kv_state_bytes_per_sequence = 0;
};

class Engine {
 public:
  virtual ~Engine() = default;
  // Rejects at once (INVALID_ARGUMENT with the numbers, RESOURCE_EXHAUSTED when the queue is full,
  // UNAVAILABLE when shutting down); otherwise the request is queued and its events follow.
  virtual Result<RequestId> submit(EngineRequest request, EngineEventFn on_event) = 0;
  // Ends the request at the next block or decode step on every rank (FinishReason::kCancelled).
  virtual void cancel(RequestId id) = 0;
  virtual EngineInfo info() const = 0;
  // How the engine splits a plain prompt of n_prompt tokens (EngineRequest::split_prompt): the
  // number of context tokens; the rest is the query. For front ends that report the split ahead.
  virtual int64_t plain_prompt_context_tokens(int64_t n_prompt) const = 0;
  // True once every rank has loaded the model.
  virtual bool ready() const = 0;
};

}  // namespace starserve
