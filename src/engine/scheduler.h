// The scheduler: which requests wait, which run, the KV pages they hold, and which of them take
// part in the next step. Plain bookkeeping on rank 0 — no threads, no ranks, no model — so it is
// unit-tested alone (tests/unit/test_scheduler.cpp).
//
// KV admission works against a mirror of every rank's page pool: all ranks have the same pool and
// a request's demand on each rank follows from its layout, so the busiest rank's demand decides.
// A request is admitted only when that many pages are free (FIFO: no overtaking, so a large
// request is not starved by small ones) and fewer than max_running requests run; otherwise it
// waits in a bounded queue.
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <optional>
#include <utility>
#include <vector>

#include "common/config.h"
#include "common/status.h"
#include "star/partition.h"

namespace starserve {

using RequestId = uint64_t;

// What a request asks of the ranks.
struct KvDemand {
  int64_t pages = 0;     // KV pages on the rank that needs most
  int encode_steps = 0;  // phase-1 steps: the most blocks any rank encodes (exact: 1 with context)
  int64_t step_tokens = 0;  // the work of one of its phase-1 steps, in tokens (prefill_step_tokens)
  int slots = 1;            // sequences it decodes (n choices: n), of max_running
};

// The peak pages on the busiest rank. A rank holds its context share throughout; during phase 1 a
// star rank without c1 also holds the anchor's scratch, during phase 2 the query host also holds
// the query and the generated tokens; the scratch is freed before the query arrives, so a rank's
// peak is the larger of the two phases, not their sum. Hence N ranks admit every request one rank
// admits when the blocks are whole pages (a rank's share + anchor <= the context); with blocks that
// end inside a page, the scratch's own pages can cost a rank at most one page more than the one
// rank would need. page_size: tokens per KV page. chunks_per_block: phase-1 steps per block
// (chunked prefill), 1 when unchunked. compressed_chunk: KvCacheShape::compressed_chunk (Attamba's
// P: a sequence of n tokens takes rows_for(n) = ceil(n / P) + 1 rows, not n; 0 = n).
KvDemand kv_demand(const StarLayout& layout, AttentionMode mode, int64_t query_and_generated, int64_t page_size,
                   int chunks_per_block = 1, int compressed_chunk = 0);

// Context reuse (engine/context_cache.h). The pages a cached context holds on the busiest rank: its
// share of the context, as the request that encoded it held. And the demand of a request that forks
// its sequence from a cached context: only the pages it owns on each rank, the copy of the rank's
// last, partly filled context page plus, on the query host, the query and generated tokens; no
// phase-1 steps. The whole pages stay the entry's, which is pinned meanwhile.
int64_t context_entry_pages(const StarLayout& layout, int64_t page_size, int compressed_chunk = 0);
KvDemand kv_demand_cached(const StarLayout& layout, int64_t query_and_generated, int64_t page_size,
                          int compressed_chunk = 0);
// n > 1 choices: a choice forked from the first after its query (KvCache::fork) owns, on each rank, the copy
// of the last, partly filled page of what was there (the share, plus the query on the query host) and, on the
// query host, the pages of its generated tokens.
KvDemand kv_demand_fork(const StarLayout& layout, int64_t query, int64_t generated, int64_t page_size,
                        int compressed_chunk = 0);

// Chunked prefill: a block's forward is split by layers, so that each phase-1 step does about
// chunk_tokens x n_layers token-layers of work, the work of a chunk_tokens-token forward. Chunks
// are layer ranges rather than token ranges because every block of star's phase 1 must see the
// whole anchor from its first token, and the anchor travels layer by layer with the owner of c1's
// forward (a token chunk of a later block would wait for the whole anchor); exact mode's span
// likewise needs every earlier rank's whole span in every layer. By layers, every mode chunks the
// same way and keeps its exchanges. The layers per chunk come from the request's longest block:
// ceil(n_layers x chunk_tokens / block_tokens), at least 1; 0 = unchunked (block_tokens <=
// chunk_tokens, or chunk_tokens 0).
int prefill_layers_per_chunk(int n_layers, int64_t chunk_tokens, int64_t block_tokens);

// The work of one phase-1 step in tokens (a token through every layer counts 1): the longest block's tokens times
// the share of the layers a step runs, block_tokens x layers_per_chunk / n_layers, rounded up (about
// chunk_tokens); the whole block when unchunked (layers_per_chunk 0).
int64_t prefill_step_tokens(int n_layers, int layers_per_chunk, int64_t block_tokens);

class Scheduler {
 public:
  Scheduler(const SchedulerConfig& config, int64_t pages_total);

  // RESOURCE_EXHAUSTED when the request could never fit a rank's pool, or the queue is full.
  Status enqueue(RequestId id, const KvDemand& demand);
  // Removes a request that is still waiting; false when it is not waiting.
  bool drop_waiting(RequestId id);
  // Moves waiting requests into the running set while they fit; returns them in admission order.
  std::vector<RequestId> admit();
  // The same one request at a time, for a caller that decides each demand at admission (context
  // reuse: a cached context, if still there, lowers it): the oldest waiting request, its demand
  // replaced (set_front_demand), admitted when it fits (admit_front).
  std::optional<RequestId> front() const;
  void set_front_demand(const KvDemand& demand);
  // Pages the front request lacks (0 when it fits); -1 when none waits or max_running requests run.
  int64_t front_shortfall() const;
  std::optional<RequestId> admit_front();
  // Pages held apart from requests (cached contexts): taken when that many are free, given back.
  bool hold_pages(int64_t pages);
  void return_pages(int64_t pages);
  // n > 1: `child`, forked from the running `parent`, runs from now on with `demand` (pages and slots that
  // parent's demand held for it, phase 1 done).
  void split(RequestId parent, RequestId child, const KvDemand& demand);
  // A step's work over the running requests that have not finished, in increasing request id:
  // first phase-1 steps, as (request, its k-th step), at most one per request still encoding; then,
  // once encoded() has recorded those, one decode forward over every request whose phase 1 is
  // complete (a request whose last phase-1 step just ran takes its query in the same step).
  // The phase-1 steps share the step's token budget (SchedulerConfig::max_batch_tokens, as vLLM's
  // max_num_batched_tokens) with the decodes: decode_tokens (what the running decodes will forward) come
  // first, then requests in admission order take a step while its step_tokens fit what is left; one that
  // does not fit waits while later, smaller ones may still fill the budget. The oldest request still
  // encoding always takes its step, so phase 1 progresses whatever the decodes take. Requests that arrive
  // together are thus encoded together in about total / budget steps, and a long one, cut into chunks of
  // about prefill_chunk_tokens, takes one chunk per step: a running stream waits at most about one budget's
  // worth of prefill between two tokens. max_batch_tokens <= 0: no budget (every request takes its step).
  std::vector<std::pair<RequestId, int>> encode_batch(int64_t decode_tokens = 0) const;
  std::vector<RequestId> decode_batch() const;
  // After a step ran: one phase-1 step of `id` is done; returns true when its phase 1 is complete.
  bool encoded(RequestId id);
  // The request will take no further steps (finished, cancelled, failed); its pages stay held
  // until release.
  void finish(RequestId id);
  // A running request leaves: its pages return to the pool.
  void release(RequestId id);

  bool running(RequestId id) const { return running_.count(id) != 0; }
  bool phase1_done(RequestId id) const;
  int64_t pages_total() const { return pages_total_; }
  int64_t pages_free() const { return pages_free_; }
  int waiting_count() const { return static_cast<int>(waiting_.size()); }
  int running_count() const { return static_cast<int>(running_.size()); }

 private:
  struct Running {
    KvDemand demand;
    int encode_done = 0;
    bool finished = false;
  };
  SchedulerConfig config_;
  int64_t pages_total_ = 0;
  int64_t pages_free_ = 0;
  std::deque<std::pair<RequestId, KvDemand>> waiting_;
  std::map<RequestId, Running> running_;
  int running_slots_ = 0;
};

}  // namespace starserve
