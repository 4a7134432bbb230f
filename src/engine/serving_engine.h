// The serving engine: continuous batching over MPI ranks.
//
// Rank 0 (ServingEngine::run) owns the request queue and the scheduler. Each iteration it picks
// one step and broadcasts it to the workers (run_worker) through the control protocol, then every
// rank executes the same step:
//   ADMIT   new requests (context tokens and plan) — every rank records them;
//   ENCODE  one phase-1 block per encoding request on each rank (exact mode: the whole context, a
//           collective step) — interleaved with decode steps, so running requests keep streaming;
//   DECODE  one forward over a batch: the query of requests whose context is encoded, and one
//           token for each running request; Phase2Attention merges across ranks once per layer;
//   RELEASE finished or cancelled requests: every rank frees their KV;
//   STOP    shut down.
// KV admission is decided on rank 0 against a mirror of every rank's page pool (all ranks have the
// same pool and deterministic demand), so a request is only started when it fits on every rank;
// otherwise it waits in a bounded queue (RESOURCE_EXHAUSTED beyond it, or when it could never fit).
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>

#include "comm/communicator.h"
#include "common/config.h"
#include "engine/engine.h"
#include "engine/kv_cache.h"
#include "model/model.h"
#include "model/tokenizer.h"
#include "star/context_encoder.h"

namespace starserve {

struct EngineContext {
  Model* model = nullptr;
  KvCache* cache = nullptr;
  Communicator* comm = nullptr;
  const Tokenizer* tokenizer = nullptr;  // rank 0
  std::string model_path;
  int max_context = 0;
  StarConfig star;
  SchedulerConfig scheduler;
  std::vector<std::string> devices;  // per rank
};

class ServingEngine final : public Engine {
 public:
  explicit ServingEngine(const EngineContext& ctx);
  ~ServingEngine() override;

  Result<RequestId> submit(EngineRequest request, EngineEventFn on_event) override;
  void cancel(RequestId id) override;
  EngineInfo info() const override;
  bool ready() const override { return ready_.load(); }

  // Rank 0's scheduler loop; returns after stop() (broadcasting STOP to the workers) or on a
  // communication error (which ends the job).
  Status run();
  void stop();

 private:
  struct Active;
  Status step();
  bool admit_waiting();
  void finish(Active& a, FinishReason reason, Status error = Status());

  EngineContext ctx_;
  std::atomic<bool> ready_{false};
  std::atomic<bool> stopping_{false};
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::unique_ptr<Active>> incoming_;   // submitted, not yet admitted (guarded by mu_)
  std::map<RequestId, std::unique_ptr<Active>> active_;  // engine thread only
  std::vector<RequestId> cancel_requests_;         // guarded by mu_
  RequestId next_id_ = 1;
  int64_t pages_free_ = 0;                         // mirror of each rank's free pages (engine thread)
  std::atomic<int> queue_depth_{0}, running_{0};
  std::atomic<int64_t> pages_free_snapshot_{0};
  std::unique_ptr<class EngineState> state_;
  void publish_stats();
  mutable std::mutex stats_mu_;  // guards the snapshots below, read by info() from other threads
  std::vector<int64_t> pages_used_snapshot_;
  double merge_seconds_snapshot_ = 0;
  int64_t merges_snapshot_ = 0;
};

// Worker ranks: execute rank 0's steps until STOP.
Status run_worker(const EngineContext& ctx);

}  // namespace starserve
