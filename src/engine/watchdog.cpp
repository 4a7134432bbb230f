#include "engine/watchdog.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "common/log.h"

namespace starserve {

namespace {
// How often the watchdog looks: a small fraction of any sensible timeout (seconds).
constexpr std::chrono::milliseconds kCheckInterval{200};

std::string where(const PeerBeat& p) { return fmt::format("rank {} (host {})", p.rank, p.host); }
}  // namespace

std::optional<std::string> diagnose_silent_ranks(const std::vector<PeerBeat>& peers, const StepState& rank0,
                                                 double timeout_s) {
  std::vector<std::string> silent;
  for (const PeerBeat& p : peers) {
    if (p.age_s <= timeout_s) continue;
    silent.push_back(p.heard ? fmt::format("{} has sent no heartbeat for {:.1f} s", where(p), p.age_s)
                             : fmt::format("{} has sent no heartbeat since the watchdog started {:.1f} s ago",
                                           where(p), p.age_s));
  }
  if (!silent.empty()) {
    return fmt::format("{} (watchdog timeout {:g} s)", fmt::join(silent, "; "), timeout_s);
  }
  std::vector<std::string> failed;
  for (const PeerBeat& p : peers) {
    if (p.progress < 0) failed.push_back(fmt::format("{} failed step {} (its log has the error)", where(p), -p.progress));
  }
  if (!failed.empty()) return fmt::format("{}", fmt::join(failed, "; "));
  if (!rank0.in_step() || rank0.running_s <= timeout_s) return std::nullopt;
  // Rank 0 is in step `started` (counted before its broadcast): a rank that has not received it is stuck outside.
  // Only ranks whose heartbeat thread still beats are judged by their progress. A beat older than half the timeout
  // (at least one heartbeat interval: serve refuses a timeout under two) is a rank going silent as a whole, e.g.
  // stopped by a signal; the silence branch above names it once its beat is older than the timeout, so the two
  // diagnoses of one stopped process do not race.
  const auto beating = [&](const PeerBeat& p) { return p.age_s <= timeout_s / 2; };
  std::vector<std::string> lagging;
  for (const PeerBeat& p : peers) {
    if (beating(p) && p.progress < progress_received(rank0.started)) {
      lagging.push_back(fmt::format("{} has not received it ({} steps completed)", where(p), p.progress / 2));
    }
  }
  if (lagging.empty()) {
    // Every rank has the step. One whose main thread stopped running inside it holds the others, which wait for it
    // inside a collective (and run while they wait).
    for (const PeerBeat& p : peers) {
      if (beating(p) && p.main_still_s > timeout_s) {
        lagging.push_back(fmt::format("{} has received it but its main thread has not run for {:.1f} s", where(p),
                                      p.main_still_s));
      }
    }
  }
  if (lagging.empty()) return std::nullopt;
  return fmt::format("step {} has run for {:.1f} s on rank 0 and {} (watchdog timeout {:g} s)", rank0.started,
                     rank0.running_s, fmt::join(lagging, "; "), timeout_s);
}

std::optional<std::string> diagnose_silent_root(double root_silent_s, double timeout_s) {
  if (root_silent_s <= timeout_s) return std::nullopt;
  return fmt::format("rank 0 has answered no heartbeat for {:.1f} s (stopped, frozen or cut off)", root_silent_s);
}

Watchdog::Watchdog(const Heartbeat& heartbeat, double timeout_s, std::function<StepState()> step,
                   std::function<void(const Status&)> on_hang)
    : diagnose_([&heartbeat, timeout_s, step = std::move(step)] {
        return diagnose_silent_ranks(heartbeat.peers(), step(), timeout_s);
      }),
      on_hang_(std::move(on_hang)) {
  thread_ = std::thread([this] { loop(); });
}

Watchdog::Watchdog(const Heartbeat& heartbeat, double timeout_s, std::function<void(const Status&)> on_hang)
    : diagnose_([&heartbeat, timeout_s] { return diagnose_silent_root(heartbeat.root_silent_s(), timeout_s); }),
      on_hang_(std::move(on_hang)) {
  thread_ = std::thread([this] { loop(); });
}

Watchdog::~Watchdog() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Watchdog::loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!cv_.wait_for(lock, kCheckInterval, [this] { return stop_; })) {
    const std::optional<std::string> found = diagnose_();
    if (!found) continue;
    log_error("watchdog: {}", *found);
    lock.unlock();
    on_hang_(unavailable("{}", *found));
    return;
  }
}

}  // namespace starserve
