// Rank 0's watchdog: notices a rank that stopped answering (and the other ranks' one, a stopped rank 0: see below). Its thread reads the heartbeats the other ranks send
// (comm/communicator.h, Heartbeat) and rank 0's own step progress, and names
//   - a rank whose last beat is older than the timeout (stopped, frozen, cut off: its heartbeat thread is silent),
//   - a rank that reports it failed a step (progress_failed: its forward returned an error, so it cannot stay in
//     step with the others), at once,
//   - or, when rank 0 has been inside one control step longer than the timeout, the ranks that have not received
//     that step (their heartbeat thread lives but their main thread is stuck outside it), else the ranks whose
//     main thread has not run for the timeout (PeerBeat::main_still_s: stopped inside the step, while the others
//     wait for it inside a collective, where their main threads still run).
// A step that runs long while every rank's main thread runs (a long forward) is no hang and is not reported. On a
// diagnosis the watchdog logs it and calls on_hang once, on its own thread (the main thread may be blocked inside
// MPI).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "comm/communicator.h"
#include "common/status.h"

namespace starserve {

// Rank 0's control steps (ServingEngine::step_state).
struct StepState {
  int64_t started = 0;    // steps broadcast so far; the current one is number `started` when in_step
  int64_t completed = 0;  // steps rank 0 has finished executing
  double running_s = 0;   // how long the current step has run (0 when not in a step)
  bool in_step() const { return started > completed; }
};

// A worker's heartbeat progress: 2·s − 1 once it has received control step s (1-based), 2·s once it has
// completed it. Rank 0 can then tell a rank that never took the current step (stuck between steps, its
// heartbeat thread alive) from ranks that are all inside it.
inline int64_t progress_received(int64_t step) { return 2 * step - 1; }
inline int64_t progress_completed(int64_t step) { return 2 * step; }
// A worker whose step s failed reports −s (negative: no step count is).
inline int64_t progress_failed(int64_t step) { return -step; }

// The diagnosis, or nullopt when every rank answers. timeout_s > 0.
std::optional<std::string> diagnose_silent_ranks(const std::vector<PeerBeat>& peers, const StepState& rank0,
                                                 double timeout_s);
// Another rank's diagnosis of rank 0 (Heartbeat::root_silent_s): nullopt while it answered within timeout_s.
std::optional<std::string> diagnose_silent_root(double root_silent_s, double timeout_s);

class Watchdog {
 public:
  // heartbeat and the callables must outlive the watchdog; `step` is called from the watchdog's thread.
  Watchdog(const Heartbeat& heartbeat, double timeout_s, std::function<StepState()> step,
           std::function<void(const Status&)> on_hang);
  // The other ranks' watchdog: rank 0 stopped (its heartbeat thread answers no beat), so nobody else would end
  // the job; on_hang is called once with the diagnosis.
  Watchdog(const Heartbeat& heartbeat, double timeout_s, std::function<void(const Status&)> on_hang);
  ~Watchdog();  // stops the thread (waits for on_hang if it is running)
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

 private:
  void loop();

  const std::function<std::optional<std::string>()> diagnose_;
  const std::function<void(const Status&)> on_hang_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;  // guarded by mu_
  std::thread thread_;
};

}  // namespace starserve
