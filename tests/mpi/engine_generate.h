// Greedy generation through the serving engine on a communicator's ranks, for the SPMD tests: rank
// 0 runs the scheduler with one request, the other ranks follow its steps through run_worker.
// Every rank gets rank 0's tokens (broadcast), so every rank can check them, and checks that its
// KV pages all came back.
#pragma once

#include <gtest/gtest.h>

#include <span>
#include <vector>

#include "../unit/serve_requests.h"
#include "comm/communicator.h"
#include "engine/serving_engine.h"
#include "star/partition.h"

namespace starserve::testing_engine {

inline std::vector<int32_t> generate_greedy(Model& model, KvCache& cache, Communicator& comm,
                                            const Tokenizer& tokenizer, std::span<const int32_t> ctx,
                                            std::span<const int32_t> qry, const ContextPlan& plan, int n_new,
                                            int max_context) {
  EngineContext ec;
  ec.model = &model;
  ec.cache = &cache;
  ec.comm = &comm;
  ec.tokenizer = &tokenizer;
  ec.max_context = max_context;
  std::vector<int32_t> tokens;
  if (comm.rank() == 0) {
    EngineRequest r;
    r.context.assign(ctx.begin(), ctx.end());
    r.query.assign(qry.begin(), qry.end());
    r.mode = plan.mode;
    r.block_size = plan.block_size;
    r.anchor_size = plan.anchor_size;
    r.exact_layout = plan.exact_layout;
    r.sampling.temperature = 0.0f;
    r.sampling.max_tokens = n_new;
    r.sampling.ignore_eos = true;
    ServingEngine engine(ec);
    std::vector<ServedRequest> out;
    EXPECT_TRUE(serve_requests(engine, {r}, &out).ok());
    EXPECT_TRUE(out[0].error.ok()) << out[0].error.to_string();
    tokens = out[0].tokens;
  } else {
    EXPECT_TRUE(run_worker(ec).ok());
  }
  int64_t n = static_cast<int64_t>(tokens.size());
  EXPECT_TRUE(comm.broadcast(&n, sizeof(n), 0).ok());
  tokens.resize(n);
  if (n > 0) {
    EXPECT_TRUE(comm.broadcast(tokens.data(), n * sizeof(int32_t), 0).ok());
  }
  EXPECT_EQ(cache.pages_free(), cache.pages_total()) << "KV pages leaked on rank " << comm.rank();
  return tokens;
}

}  // namespace starserve::testing_engine
