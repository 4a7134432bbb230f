// Config: every user setting, in slices handed to the module that owns them. Parsed once from CLI
// flags (and an optional TOML/INI file of flag defaults) by src/app/options.cpp, validated, logged
// at start-up, then immutable. Hyper-parameters read from the weights are not here
// (model/hparams.h). The process environment is read and written here only (config.cpp).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace starserve {

enum class AttentionMode { kGlobal, kExact, kStar };

// How exact mode assigns context tokens to ranks (docs/design.md, "Exact mode's layouts"):
//   kContiguous: rank r encodes one span [r n/W, (r+1) n/W); the last rank attends over (2W - 1)/W^2 of the
//                causal pairs, the first over 1/W^2 of them (the spec's baseline, kept for measurement);
//   kZigzag:     the context cut into 2W chunks, rank r encodes chunks r and 2W-1-r, so every rank attends
//                over about n^2 / (2W) pairs;
//   kAuto:       kZigzag, except for models whose exact mode hands a halo across every rank boundary (KV
//                shifting's previous token, Attamba's carry), which take kContiguous.
enum class ExactLayout { kAuto, kContiguous, kZigzag };

struct ModelConfig {
  std::string path;                 // GGUF file, or a Hugging Face directory (config.json + *.safetensors)
  std::string chat_template;        // empty: the model's own; else a built-in name (chatml, llama3, ...)
  std::string chat_template_file;   // a Jinja chat template file used instead of the model's; empty: none
  int max_context = 0;              // tokens per request (context + query + generated); 0 = the model's
};

struct ParallelConfig {
  std::string backend = "auto";     // cpu | cuda | auto (cuda when a GPU is visible)
  int cpu_threads = 0;              // BLAS threads per rank; 0 = library default
  std::string prefill_kernel = "auto";  // CUDA prefill attention: auto (wgmma on sm_90, else mma) | wgmma | mma
  bool cuda_graphs = true;          // CUDA: decode steps as CUDA graphs when running on one rank
};

struct StarConfig {
  AttentionMode mode = AttentionMode::kStar;  // default for requests that do not choose
  int block_size = 0;               // tokens per context block; 0 = one block per rank
  int n_blocks = 0;                 // split each context into this many blocks (overrides block_size); 0 = off
  int anchor_size = -1;             // tokens of the anchor; -1 = block_size; 0 = no anchor
  int query_tail = 0;               // plain prompts: tokens kept as the query; 0 = the rule in star/partition.h
  ExactLayout exact_layout = ExactLayout::kAuto;  // exact mode's token assignment for requests that do not choose
};

struct SchedulerConfig {
  int max_batch_tokens = 2048;      // tokens of work per step: the running decodes, then the phase-1 steps of
                                    // several prompts in admission order (engine/scheduler.h); 0 = no budget
  int prefill_chunk_tokens = 512;   // chunked prefill: a phase-1 step does about this many tokens' work
                                    // (longer blocks split by layers, engine/scheduler.h); 0 = off
  int max_running = 16;             // sequences decoded together
  int max_queue = 64;               // requests waiting beyond that -> RESOURCE_EXHAUSTED
  int kv_page_size = 256;           // tokens per KV page
  int64_t kv_pages = 0;             // pages per rank; 0 = derive from kv_memory_mb
  int64_t kv_memory_mb = 1024;      // KV budget per rank, MiB
  // Context reuse (engine/context_cache.h): KV pages per rank that cached contexts may keep after their
  // requests; -1 = as many as the pool leaves free (they are evicted, least recently used first, whenever an
  // admission needs their pages), 0 = off.
  int64_t context_cache_pages = -1;
};

struct ServerConfig {
  std::string host = "0.0.0.0";
  int port = 50051;
  int metrics_port = 0;             // 0 = no Prometheus endpoint
  int http_port = 0;                // OpenAI-compatible HTTP API (server/openai_http.h); 0 = off
  int http_threads = 64;            // HTTP worker threads; each open connection (a stream, a keep-alive) holds one
  std::string tls_cert, tls_key;    // PEM files; both set = TLS
  std::string tls_client_ca;        // PEM; set = mutual TLS
  std::string api_key;              // non-empty: every RPC needs "authorization: Bearer <key>"
  bool health_without_key = false;  // with an api_key: health answers without it (orchestrator probes)
  int max_message_bytes = 16 << 20; // gRPC message size limit
  int max_prompt_tokens = 0;        // 0 = max_context
  int max_tokens_limit = 4096;      // upper bound for a request's max_tokens
  int max_stop_strings = 16;
  int max_stop_string_bytes = 256;
  // Seconds without a heartbeat from a rank (or a step stuck behind lagging ranks) before rank 0 fails the
  // requests and ends the job; 0 = off. Beats come every second from a thread of their own, whatever the
  // steps do, so 30 missed beats means a stopped or cut-off rank, not a slow one, while brief stalls of an
  // overloaded host or network pass.
  double watchdog_timeout_s = 30;
  // Seconds that running requests get to finish after SIGTERM/SIGINT before they end as cancelled.
  double shutdown_grace_s = 30;
  // Attention health of requests that ask for entropy (server/attention_health.h); a request may override both.
  double entropy_overload_ratio = 0.9;  // overload: mean entropy > this x its uniform maximum; in (0, 1]
  double entropy_collapse_nats = 0.1;   // collapse: mean entropy < this many nats; >= 0
};

struct LogConfig {
  std::string level = "info";       // trace | debug | info | warn | error
};

struct Config {
  ModelConfig model;
  ParallelConfig parallel;
  StarConfig star;
  SchedulerConfig scheduler;
  ServerConfig server;
  LogConfig log;
};

// True when a launcher (mpirun, srun) started this process as one rank of a job (its variables are
// in the environment).
bool launched_by_mpi();

// True when output to file descriptor fd may carry ANSI colours: fd is a terminal, TERM is not "dumb" and NO_COLOR
// is unset or empty (https://no-color.org). For the command-line tools' terminal views.
bool terminal_wants_colour(int fd);

// Fault injection for the end-to-end test of a failed worker step (tests/e2e/failed_step_e2e.sh):
// STARSERVE_FAIL_STEP=R:N names worker rank R's N-th step, which run_worker then fails the way a failed forward
// does. Unset (always, outside that test): nullopt.
std::optional<int64_t> injected_failure_step(int rank);

// Settings that libraries read from the environment, applied before any NCCL communicator exists
// (make_nccl_communicator calls it too): NCCL_NVLS_ENABLE=0 unless the environment sets it.
void apply_library_environment();

}  // namespace starserve
