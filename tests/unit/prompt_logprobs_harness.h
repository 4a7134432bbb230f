// Requests with prompt log-probabilities through a ServingEngine, and the comparison of two sets of
// log-probabilities, shared by test_prompt_logprobs.cpp and tests/mpi/prompt_logprobs_mpi_test.cpp.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "engine/serving_engine.h"

namespace starserve::testing_engine {

struct ScoredRequest {
  std::vector<int32_t> tokens;                 // generated
  std::vector<TokenLogprobs> token_logprobs;   // one per generated token, when asked
  std::vector<TokenLogprobs> prompt_logprobs;  // the finish event's
  Status error;
};

// Submits every request, runs the engine on this thread until all have ended, then stops it.
inline Status serve_scored(ServingEngine& engine, const std::vector<EngineRequest>& requests,
                           std::vector<ScoredRequest>* out) {
  struct Slot {
    std::mutex mu;
    std::condition_variable cv;
    ScoredRequest result;
    bool done = false;
  };
  std::vector<Slot> slots(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    Slot* s = &slots[i];
    auto id = engine.submit(requests[i], [s](const EngineEvent& ev) {
      std::lock_guard<std::mutex> lock(s->mu);
      if (ev.kind == EngineEvent::Kind::kToken) {
        if (ev.token.token < 0) return;
        s->result.tokens.push_back(ev.token.token);
        if (ev.token.logprobs) s->result.token_logprobs.push_back(*ev.token.logprobs);
      } else {
        s->result.error = ev.error;
        s->result.prompt_logprobs = ev.prompt_logprobs;
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

// A request over prompt ids as they are (context, query), greedy, with prompt logprobs of top_k.
inline EngineRequest scored_request(std::vector<int32_t> context, std::vector<int32_t> query, AttentionMode mode,
                                    int block_size, int anchor_size, int top_k, int max_tokens = 1) {
  EngineRequest r;
  r.context = std::move(context);
  r.query = std::move(query);
  r.mode = mode;
  r.block_size = block_size;
  r.anchor_size = anchor_size;
  r.prompt_logprobs = top_k;
  r.sampling.temperature = 0.0f;
  r.sampling.max_tokens = max_tokens;
  r.sampling.ignore_eos = true;
  return r;
}

// a and b agree entry by entry: the same scored token, its logprob within tol, and the same
// alternatives with logprobs within tol (ids may swap only between alternatives closer than 2 tol).
inline void expect_same_logprobs(const TokenLogprobs& a, const TokenLogprobs& b, float tol, const std::string& where) {
  EXPECT_EQ(a.token, b.token) << where;
  EXPECT_NEAR(a.logprob, b.logprob, tol) << where;
  ASSERT_EQ(a.top.size(), b.top.size()) << where;
  for (size_t j = 0; j < a.top.size(); ++j) {
    EXPECT_NEAR(a.top[j].logprob, b.top[j].logprob, tol) << where << " alternative " << j;
    if (a.top[j].token == b.top[j].token) continue;
    const bool close_above = j > 0 && a.top[j - 1].logprob - a.top[j].logprob < 2 * tol;
    const bool close_below = j + 1 < a.top.size() && a.top[j].logprob - a.top[j + 1].logprob < 2 * tol;
    EXPECT_TRUE(close_above || close_below) << where << " alternative " << j << ": token " << a.top[j].token
                                            << " vs " << b.top[j].token;
  }
}

inline void expect_same_prompt_logprobs(const std::vector<TokenLogprobs>& a, const std::vector<TokenLogprobs>& b,
                                        float tol, const std::string& what, size_t first = 0,
                                        size_t last = SIZE_MAX) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = first; i < std::min(last, a.size()); ++i) {
    expect_same_logprobs(a[i], b[i], tol, what + " entry " + std::to_string(i));
  }
}

}  // namespace starserve::testing_engine
