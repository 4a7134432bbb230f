#include "app/runtime.h"

#include <algorithm>
#include <chrono>
#include <thread>

#include "common/log.h"

#include "app/options.h"
#include "common/config.h"
#include "common/log.h"

namespace starserve {

Result<std::unique_ptr<Communicator>> start_communicator(int* argc, char*** argv) {
  if (launched_by_mpi()) return make_mpi_communicator(argc, argv);
  return make_local_communicator();
}

Status start_logging(const Config& config, const Runtime& rt) {
  SS_RETURN_IF_ERROR(setup_logging(config.log.level, rt.comm->rank(), rt.comm->world_size()));
  if (rt.comm->rank() == 0) {
    log_info("starserve {} ranks ({}), config: {}", rt.comm->world_size(), rt.comm->name(), describe_config(config));
  }
  return Status();
}

Status start_runtime(const Config& config, Runtime& rt) {
  SS_RETURN_IF_ERROR(start_logging(config, rt));
  return load_runtime(config, rt);
}

Status load_runtime(const Config& config, Runtime& rt) {
  const int n_gpus = config.parallel.backend == "cpu" ? 0 : cuda_device_count();
  if (config.parallel.backend == "cuda" || (config.parallel.backend == "auto" && n_gpus > 0)) {
    // One GPU per rank by local rank; ranks beyond the GPU count share devices round-robin.
    const WorldLayout& lay = rt.comm->layout();
    const int device = pick_local_device(lay, std::max(1, n_gpus));
    CudaBackendOptions cuda;
    SS_ASSIGN_OR_RETURN(cuda.prefill, parse_prefill_kernel(config.parallel.prefill_kernel));
    // Graphs hold the ops of one process; several ranks' steps keep their collectives eager.
    cuda.decode_graphs = config.parallel.cuda_graphs && rt.comm->world_size() == 1;
    SS_ASSIGN_OR_RETURN(rt.backend, make_cuda_backend(device, cuda));
    if (rt.comm->world_size() > 1) {
      if (lay.local_size <= n_gpus) {
        // Phase-2 merges and exact-mode KV exchange then run on device buffers over NCCL.
        SS_ASSIGN_OR_RETURN(rt.comm, make_nccl_communicator(std::move(rt.comm), device));
        if (lay.rank == 0) {
          log_info("{} ranks, one GPU each ({} per host): device collectives over {}", lay.world_size,
                       lay.local_size, rt.comm->name());
        }
      } else if (lay.rank == 0) {
        log_warn("{} ranks per host share {} GPU(s): collectives go through {} on host memory (NCCL needs one "
                     "GPU per rank)",
                     lay.local_size, n_gpus, rt.comm->name());
      }
    }
  } else {
    // Ranks sharing a host share its cores: by default each gets an equal slice, so BLAS threads of
    // several ranks do not oversubscribe the CPU.
    int threads = config.parallel.cpu_threads;
    if (threads == 0 && rt.comm->layout().local_size > 1) {
      threads = std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / rt.comm->layout().local_size);
    }
    rt.backend = make_cpu_backend(threads);
  }
  const auto t0 = std::chrono::steady_clock::now();
  SS_ASSIGN_OR_RETURN(rt.files, open_model_files(config.model.path));
  SS_ASSIGN_OR_RETURN(rt.model, create_model(*rt.files.weights, *rt.backend));
  const ModelHParams& hp = rt.model->hparams();
  const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (rt.comm->rank() == 0) {
    log_info("model {} ({}): {} layers, hidden {}, heads {}/{}, vocab {}, context {}; loaded in {:.2f} s on {}",
                 hp.name, rt.files.weights->describe(), hp.n_layers, hp.hidden, hp.n_heads, hp.n_kv_heads,
                 hp.n_vocab, hp.max_context, load_s, rt.backend->name());
  }
  rt.max_context = config.model.max_context > 0 ? config.model.max_context : hp.max_context;
  if (rt.max_context <= 0) return data_loss("the model does not state its context length; pass --max-context");
  if (hp.learned_positions && rt.max_context > hp.max_context) {
    return invalid_argument("--max-context {} exceeds the {} learned positions of {} (its n_positions)",
                            rt.max_context, hp.max_context, hp.name.empty() ? hp.arch_name : hp.name);
  }

  // KV budget: bytes per page = page_size tokens x layers x (K + V) x kv heads x head_dim x dtype.
  const int64_t page_bytes = static_cast<int64_t>(config.scheduler.kv_page_size) * hp.n_layers * 2 * hp.n_kv_heads *
                             hp.head_dim * static_cast<int64_t>(dtype_size(rt.backend->compute_dtype()));
  // A sequence's fixed decode state (Model::sequence_state_bytes: Attamba's carry, KV shifting's
  // previous k/v) lives beside the pages: the budget holds it for as many sequences as run at once,
  // and the pages take the rest.
  const int64_t state_bytes = rt.model->sequence_state_bytes() * config.scheduler.max_running;
  int64_t pages = config.scheduler.kv_pages;
  if (pages == 0) pages = (config.scheduler.kv_memory_mb * (int64_t{1} << 20) - state_bytes) / page_bytes;
  if (pages < 1) {
    return invalid_argument("kv_memory_mb = {} holds no page of {} tokens ({} bytes per page) beside the decode "
                            "state of {} sequences ({} bytes)",
                            config.scheduler.kv_memory_mb, config.scheduler.kv_page_size, page_bytes,
                            config.scheduler.max_running, state_bytes);
  }
  KvCacheShape shape{hp.n_layers, hp.n_kv_heads, hp.head_dim, config.scheduler.kv_page_size, pages};
  shape.compressed_chunk = hp.attamba.chunk;  // Attamba stores only chunk boundaries' k/v
  rt.cache = std::make_unique<KvCache>(*rt.backend, shape);
  if (rt.comm->rank() == 0 && hp.attamba.enabled()) {
    log_info("Attamba: chunk size P = {}, leading tokens L = {}, cyclic offsets {}: each layer stores 1 KV entry "
             "per {} tokens (plus position 0) and a band of {} tokens; carry {} floats per layer and sequence",
             hp.attamba.chunk, hp.attamba.leading, hp.attamba.cyclic_offsets ? "on" : "off", hp.attamba.chunk,
             hp.attamba.leading + 1, AttambaCarryLayout::of(hp.attamba, hp.hidden).floats());
  }
  if (rt.comm->rank() == 0) {
    log_info("KV cache per rank: {} pages x {} tokens = {} tokens ({} MiB), decode state {} MiB ({} sequences)",
             pages, config.scheduler.kv_page_size, pages * config.scheduler.kv_page_size, pages * page_bytes >> 20,
             state_bytes >> 20, config.scheduler.max_running);
  }
  return Status();
}

EngineContext engine_context(const Config& config, const Runtime& rt) {
  EngineContext ctx;
  ctx.model = rt.model.get();
  ctx.cache = rt.cache.get();
  ctx.comm = rt.comm.get();
  ctx.tokenizer = rt.files.tokenizer.get();
  ctx.model_path = config.model.path;
  ctx.max_context = rt.max_context;
  ctx.star = config.star;
  ctx.scheduler = config.scheduler;
  ctx.devices.assign(rt.comm->world_size(), rt.backend->name());
  return ctx;
}

}  // namespace starserve
