// What every rank sets up before serving or generating: communicator, logging, backend, model,
// KV cache. Built once from Config.
#pragma once

#include <memory>

#include "backend/backend.h"
#include "comm/communicator.h"
#include "common/config.h"
#include "engine/serving_engine.h"
#include "kv/kv_cache.h"
#include "model/loader.h"
#include "model/model.h"

namespace starserve {

struct Runtime {
  std::unique_ptr<Communicator> comm;
  std::unique_ptr<Backend> backend;
  ModelFiles files;
  std::unique_ptr<Model> model;
  std::unique_ptr<KvCache> cache;
  int max_context = 0;  // tokens per request in force (config or the model's)
};

// MPI when started by a launcher, else a world of one. Errors are already logged.
Result<std::unique_ptr<Communicator>> start_communicator(int* argc, char*** argv);
// start_logging (logging, then the config line from rank 0) and load_runtime (backend, model, KV cache).
Status start_runtime(const Config& config, Runtime& rt);
Status start_logging(const Config& config, const Runtime& rt);
Status load_runtime(const Config& config, Runtime& rt);
// What the serving engine (rank 0) and run_worker (the others) need of the runtime.
EngineContext engine_context(const Config& config, const Runtime& rt);

}  // namespace starserve
