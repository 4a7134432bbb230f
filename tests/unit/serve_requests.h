// Drives a ServingEngine through a set of requests submitted together, so they decode in the same
// steps (one row each), for tests that compare what a batch produces under different settings.
#pragma once

#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "engine/serving_engine.h"

namespace starserve::testing_engine {

// A global-attention request over prompt ids, split into context and query by the engine as any
// plain prompt is (EngineRequest::split_prompt).
inline EngineRequest global_request(const std::vector<int32_t>& ids, const SamplingParams& params) {
  EngineRequest r;
  r.query = ids;
  r.split_prompt = true;
  r.sampling = params;
  r.mode = AttentionMode::kGlobal;
  return r;
}

struct ServedRequest {
  std::vector<int32_t> tokens;  // every token the request emitted
  Status error;                 // the final event's status (a refused submit lands here too)
};

// Submits every request, runs the engine on this thread until all of them have ended, then stops
// it. Returns the engine loop's status; each request's outcome goes to (*out)[i].
inline Status serve_requests(ServingEngine& engine, const std::vector<EngineRequest>& requests,
                             std::vector<ServedRequest>* out) {
  struct Slot {
    std::mutex mu;
    std::condition_variable cv;
    ServedRequest result;
    bool done = false;
  };
  std::vector<Slot> slots(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    Slot* s = &slots[i];
    auto id = engine.submit(requests[i], [s](const EngineEvent& ev) {
      std::lock_guard<std::mutex> lock(s->mu);
      if (ev.kind == EngineEvent::Kind::kToken) {
        if (ev.token.token >= 0) s->result.tokens.push_back(ev.token.token);
      } else {
        s->result.error = ev.error;
        s->done = true;
        s->cv.notify_all();
      }
    });
    if (!id.ok()) {
      s->result.error = id.status();
      s->done = true;
    }
  }
  std::thread waiter([&] {
    for (Slot& s : slots) {
      std::unique_lock<std::mutex> lock(s.mu);
      s.cv.wait(lock, [&] { return s.done; });
    }
    engine.stop();
  });
  const Status st = engine.run();
  waiter.join();
  out->clear();
  for (Slot& s : slots) out->push_back(std::move(s.result));
  return st;
}

}  // namespace starserve::testing_engine
