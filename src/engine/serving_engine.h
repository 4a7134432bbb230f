// The serving engine: continuous batching over MPI ranks, the one path every front end uses
// (`starserve generate` submits one request and stops; `serve` submits from gRPC threads).
//
// Rank 0 (ServingEngine::run) owns the requests and the Scheduler (engine/scheduler.h). Each
// iteration it releases what finished, admits what fits, then runs one phase-1 step for every
// request still encoding and one decode forward over every request whose context is encoded, so
// running requests keep streaming while new contexts are encoded. Each step goes to the workers
// (run_worker) through the control protocol (engine/control.h) and every rank executes it.
// Requests that do not fit wait in a bounded queue (RESOURCE_EXHAUSTED beyond it, or when they
// could never fit).
#pragma once

#include <atomic>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>

#include "comm/communicator.h"
#include "common/config.h"
#include "engine/control.h"
#include "engine/engine.h"
#include "engine/scheduler.h"
#include "kv/kv_cache.h"
#include "model/model.h"
#include "model/tokenizer.h"

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
  int64_t plain_prompt_context_tokens(int64_t n_prompt) const override;

  // Rank 0's scheduler loop; returns after stop() (broadcasting STOP to the workers) or on a
  // communication error (which ends the job).
  Status run();
  void stop();

 private:
  struct Active;
  Status step();
  void admit_waiting();
  void finish(Active& a, FinishReason reason, Status error = Status());
  Status release_finished();
  void publish_stats();

  EngineContext ctx_;
  std::atomic<bool> ready_{false};
  std::atomic<bool> stopping_{false};
  mutable std::mutex mu_;
  std::condition_variable cv_;
  Scheduler scheduler_;                               // guarded by mu_
  std::map<RequestId, std::unique_ptr<Active>> waiting_;  // submitted, not yet admitted (guarded by mu_)
  std::map<RequestId, std::unique_ptr<Active>> active_;   // engine thread only
  std::vector<RequestId> cancel_requests_;            // guarded by mu_
  RequestId next_id_ = 1;                             // guarded by mu_
  std::atomic<int> queue_depth_{0}, running_{0};
  std::atomic<int64_t> pages_free_snapshot_{0};
  std::unique_ptr<StepExecutor> executor_;
  mutable std::mutex stats_mu_;  // guards the snapshots below, read by info() from other threads
  std::vector<int64_t> pages_used_snapshot_;
  double merge_seconds_snapshot_ = 0;
  int64_t merges_snapshot_ = 0;
  int64_t phase1_steps_snapshot_ = 0;
};

// Worker ranks: execute rank 0's steps until STOP.
Status run_worker(const EngineContext& ctx);

}  // namespace starserve
