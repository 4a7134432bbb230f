// The serving engine: continuous batching over MPI ranks, the one path every front end uses
// (`starserve generate` submits one request and stops; `serve` submits from gRPC threads).
//
// Rank 0 (ServingEngine::run) owns the requests and the Scheduler (engine/scheduler.h). Each
// iteration it releases what finished, admits what fits, then runs the phase-1 steps that the
// iteration's token budget leaves after the running decodes (Scheduler::encode_batch) and one decode
// forward over every request whose context is encoded, so running requests keep streaming while new
// contexts are encoded. Each step goes to the workers
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
#include "engine/context_cache.h"
#include "engine/control.h"
#include "engine/engine.h"
#include "engine/scheduler.h"
#include "engine/watchdog.h"
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
  Heartbeat* heartbeat = nullptr;    // workers: where they report the steps they completed (null = none)
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

  // Rank 0's scheduler loop. Starts with a barrier of every rank (ready() turns true once every rank
  // has loaded the model and reached it); returns after stop() or drain() (broadcasting STOP to the
  // workers) or on a communication error (which ends the job).
  Status run();
  // Stops at the next step: requests left end with kError UNAVAILABLE "the server is shutting down".
  void stop();
  // Graceful stop, thread-safe: new requests are refused (UNAVAILABLE "the server is shutting down");
  // queued and running ones go on for `grace`; those left then end with FinishReason::kCancelled and
  // the output they had (an answer, not an error). run() returns once none is left. Only the first
  // call's grace counts.
  void drain(std::chrono::milliseconds grace);
  // Ends every queued and running request now with kError `error`, and refuses new ones with it.
  // Thread-safe, and callable while the engine's thread is blocked inside a step (the watchdog): the
  // events go straight to the requests' callbacks, and whatever the engine thread produces for them
  // afterwards is dropped.
  void fail_all(const Status& error);
  // Rank 0's control steps, for the watchdog. Thread-safe.
  StepState step_state() const;

 private:
  struct Active;
  // One request's callback; closed once its kFinished event went out (by the engine thread or fail_all).
  // Shared by a request's n choices; closed once each choice's kFinished went out.
  struct Sink {
    std::mutex mu;
    bool closed = false;     // guarded by mu
    std::vector<char> done;  // guarded by mu: per choice, its kFinished went out
    EngineEventFn fn;
    void deliver(const EngineEvent& ev);
    // kFinished with `ev` for every choice still open (fail_all).
    void finish_open(EngineEvent ev);
  };
  // n > 1: the choices after the first, forked from it after its query went through (the DECODE whose
  // logits they sample their first token from); their FORK goes to every rank.
  void spawn_choices(Active& first, std::span<const float> logits, ControlMessage* fork);
  void make_controller(Active& a);
  Status broadcast_step(std::vector<int64_t>& words);  // broadcast_control + the step counters
  void end_step() { ++steps_completed_; }
  Status step();
  void admit_waiting();
  void finish(Active& a, FinishReason reason, Status error = Status());
  Status release_finished();
  // Context reuse, under mu_: drops a cached context (its RELEASE goes out with flush_evictions) ...
  void evict_locked(SeqId entry);
  // ... or as many idle ones as it takes for a new one of `pages` pages (false when that is not possible).
  bool make_room_locked(int64_t pages);
  Status flush_evictions();
  void publish_stats();

  EngineContext ctx_;
  std::atomic<bool> ready_{false};
  std::atomic<bool> stopping_{false};
  std::atomic<bool> draining_{false};
  std::atomic<bool> failed_{false};
  Status failure_;                                   // guarded by mu_: fail_all's error
  std::chrono::steady_clock::time_point drain_deadline_;  // guarded by mu_
  bool drain_cancelled_ = false;                     // engine thread: the requests left were cancelled
  std::map<RequestId, std::shared_ptr<Sink>> sinks_;  // guarded by mu_: requests not yet finished
  std::atomic<int64_t> steps_started_{0}, steps_completed_{0};
  // EngineInfo's engine_*_s (nanoseconds) and decode counts, written by the engine thread.
  std::atomic<int64_t> schedule_ns_{0}, prefill_ns_{0}, forward_ns_{0}, tokens_ns_{0};
  std::atomic<double> forward_wait_s_{0};
  std::atomic<int64_t> decode_steps_{0}, decoded_sequences_{0};
  std::atomic<int64_t> step_since_ns_{0};             // steady clock, when the current step was broadcast
  mutable std::mutex mu_;
  std::condition_variable cv_;
  Scheduler scheduler_;                               // guarded by mu_
  ContextCache context_cache_;                        // guarded by mu_
  std::vector<SeqId> evicted_;                        // guarded by mu_: cached contexts to release on every rank
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
