#include "app/options.h"

#include <cmath>
#include <cstdlib>
#include <limits>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

namespace starserve {

const char* attention_mode_name(AttentionMode mode) {
  switch (mode) {
    case AttentionMode::kGlobal: return "global";
    case AttentionMode::kExact: return "exact";
    case AttentionMode::kStar: return "star";
  }
  return "?";
}

const char* exact_layout_name(ExactLayout layout) {
  switch (layout) {
    case ExactLayout::kAuto: return "auto";
    case ExactLayout::kContiguous: return "contiguous";
    case ExactLayout::kZigzag: return "zigzag";
  }
  return "?";
}

namespace {

const std::map<std::string, ExactLayout> kExactLayouts = {
    {"auto", ExactLayout::kAuto}, {"contiguous", ExactLayout::kContiguous}, {"zigzag", ExactLayout::kZigzag}};

const std::map<std::string, AttentionMode> kModes = {
    {"global", AttentionMode::kGlobal}, {"exact", AttentionMode::kExact}, {"star", AttentionMode::kStar}};

// Options shared by `generate` and `serve`: model, parallelism, star, scheduler, log.
void add_common(CLI::App* app, Config& c) {
  app->add_option("--model,-m", c.model.path, "GGUF file or Hugging Face directory")->required();
  auto* builtin_template = app->add_option(
      "--chat-template", c.model.chat_template,
      "built-in chat template to use instead of the model's (chatml, llama3, llama2, mistral, gemma, qwen)");
  app->add_option("--chat-template-file", c.model.chat_template_file,
                  "Jinja chat template file to use instead of the model's")
      ->check(CLI::ExistingFile)
      ->excludes(builtin_template);
  app->add_option("--max-context", c.model.max_context, "tokens per request; 0 = the model's trained context");
  app->add_option("--backend", c.parallel.backend, "cpu | cuda | auto")->check(CLI::IsMember({"cpu", "cuda", "auto"}));
  app->add_option("--threads", c.parallel.cpu_threads, "BLAS threads per rank (0 = library default)");
  app->add_option("--prefill-kernel", c.parallel.prefill_kernel,
                  "CUDA prefill attention kernel: auto (the default: wgmma on sm_90, else mma) | wgmma | mma")
      ->check(CLI::IsMember({"auto", "wgmma", "mma"}));
  app->add_option("--cuda-graphs", c.parallel.cuda_graphs,
                  "CUDA backend, one rank: run decode steps as CUDA graphs (on | off; default on)");
  app->add_option("--attention", c.star.mode, "global | exact | star")
      ->transform(CLI::CheckedTransformer(kModes, CLI::ignore_case));
  app->add_option("--exact-layout", c.star.exact_layout,
                  "exact mode's token assignment: zigzag (2W chunks, rank r holds r and 2W-1-r: balanced) | "
                  "contiguous (one span per rank) | auto (the default: zigzag, contiguous for KV-shifting and "
                  "Attamba models)")
      ->transform(CLI::CheckedTransformer(kExactLayouts, CLI::ignore_case));
  app->add_option("--block-size", c.star.block_size, "context tokens per block (0 = one block per rank)");
  app->add_option("--n-blocks", c.star.n_blocks, "split the context into N blocks (overrides --block-size)");
  app->add_option("--anchor-size", c.star.anchor_size, "anchor tokens (-1 = block size, 0 = no anchor)");
  app->add_option("--query-tail", c.star.query_tail, "plain prompts: tokens treated as the query (0 = default rule)");
  app->add_option("--prefill-chunk-tokens", c.scheduler.prefill_chunk_tokens,
                  "chunked prefill: a phase-1 step does about this many tokens' work (0 = off)");
  app->add_option("--max-batch-tokens", c.scheduler.max_batch_tokens,
                  "tokens of work per step, shared by the decodes and the phase-1 steps of several prompts "
                  "(0 = no budget: every prompt still encoding takes a step)");
  app->add_option("--kv-page-size", c.scheduler.kv_page_size, "tokens per KV page");
  app->add_option("--kv-memory-mb", c.scheduler.kv_memory_mb, "KV cache budget per rank, MiB");
  app->add_option("--log-level", c.log.level, "trace | debug | info | warn | error");
}

}  // namespace

std::optional<CommandLine> parse_command_line(int argc, char** argv, int* exit_code) {
  CommandLine cl;
  CLI::App app{"starserve: long-context LLM inference with Star Attention"};
  app.require_subcommand(1);
  // Defaults from a TOML/INI file: keys are the flag names, under [generate] or [serve].
  app.set_config("--config", "", "file with option defaults (TOML/INI; keys are flag names)");

  CLI::App* gen = app.add_subcommand("generate", "generate text from a prompt (streams to stdout)");
  add_common(gen, cl.config);
  GenerateInputs& g = cl.generate;
  SamplingParams& s = g.sampling;
  gen->add_option("--prompt,-p", g.prompt, "prompt text");
  gen->add_option("--context-file", g.context_file, "file whose text is the context (encoded in phase 1)");
  gen->add_option("--query,-q", g.query, "question asked about the context (phase 2)");
  gen->add_option("--system", g.system, "system message (with --chat)");
  gen->add_flag("--chat", g.chat, "wrap the prompt in the model's chat template");
  gen->add_flag("--entropy", g.print_entropy, "print per-layer mean attention entropy of the query/generated tokens");
  gen->add_option("--max-tokens,-n", s.max_tokens, "tokens to generate");
  gen->add_option("--temperature,-t", s.temperature, "0 = greedy");
  gen->add_option("--top-k", s.top_k, "0 = off");
  gen->add_option("--top-p", s.top_p, "1 = off");
  gen->add_option("--min-p", s.min_p, "0 = off");
  gen->add_option("--repetition-penalty", s.repetition_penalty, "1 = off");
  gen->add_option("--frequency-penalty", s.frequency_penalty, "0 = off");
  gen->add_option("--presence-penalty", s.presence_penalty, "0 = off");
  gen->add_option("--seed", s.seed, "sampling seed (same seed, same text)");
  gen->add_option("--stop", s.stop, "stop string (repeatable)");
  gen->add_option("--stop-token-id", s.stop_token_ids, "stop token id (repeatable)");
  gen->add_flag("--ignore-eos", s.ignore_eos, "keep generating after end-of-sequence tokens");
  gen->add_option("--logprobs", s.logprobs, "print the top-N log-probabilities of each generated token");

  CLI::App* srv = app.add_subcommand("serve", "serve the gRPC CompletionService (rank 0) with every rank computing");
  add_common(srv, cl.config);
  ServerConfig& sv = cl.config.server;
  SchedulerConfig& sc = cl.config.scheduler;
  srv->add_option("--host", sv.host, "address to listen on");
  srv->add_option("--port", sv.port, "gRPC port (0 = pick a free one)");
  srv->add_option("--metrics-port", sv.metrics_port, "Prometheus text endpoint port (0 = off)");
  srv->add_option("--http-port", sv.http_port, "OpenAI-compatible HTTP API port (0 = off)");
  srv->add_option("--http-threads", sv.http_threads, "HTTP API worker threads (one per open connection)");
  srv->add_option("--tls-cert", sv.tls_cert, "server certificate (PEM)");
  srv->add_option("--tls-key", sv.tls_key, "server private key (PEM)");
  srv->add_option("--tls-client-ca", sv.tls_client_ca, "CA that client certificates must chain to (mutual TLS)");
  srv->add_option("--api-key", sv.api_key, "require 'authorization: Bearer <key>' on every RPC");
  srv->add_flag("--health-without-key", sv.health_without_key,
                "with --api-key: health checks answer without the key (for orchestrator probes)");
  srv->add_option("--watchdog-timeout", sv.watchdog_timeout_s,
                  "seconds without a heartbeat from a rank before the job is failed and ended (0 = off)")
      ->check(CLI::NonNegativeNumber);
  srv->add_option("--shutdown-grace", sv.shutdown_grace_s,
                  "seconds running requests get to finish after SIGTERM/SIGINT, then they end as cancelled")
      ->check(CLI::NonNegativeNumber);
  srv->add_option("--entropy-overload-ratio", sv.entropy_overload_ratio,
                  "attention health: a head is overloaded when its mean entropy > RATIO x the uniform maximum "
                  "(in (0, 1]; requests may override it)")
      ->check(CLI::Validator(
          [](std::string& v) {
            const double r = std::strtod(v.c_str(), nullptr);
            return r > 0.0 && r <= 1.0 ? std::string() : fmt::format("--entropy-overload-ratio {} must be in (0, 1]", v);
          },
          "(0, 1]"));
  srv->add_option("--entropy-collapse-nats", sv.entropy_collapse_nats,
                  "attention health: a head is collapsed when its mean entropy < NATS (finite, >= 0; requests may "
                  "override it)")
      ->check(CLI::Validator(
          [](std::string& v) {
            const double n = std::strtod(v.c_str(), nullptr);
            return std::isfinite(n) && n >= 0.0
                       ? std::string()
                       : fmt::format("--entropy-collapse-nats {} must be a finite number >= 0", v);
          },
          ">= 0"));
  srv->add_option("--max-message-bytes", sv.max_message_bytes, "gRPC message size limit");
  srv->add_option("--max-prompt-tokens", sv.max_prompt_tokens, "prompt token limit (0 = max context)");
  srv->add_option("--max-tokens-limit", sv.max_tokens_limit, "upper bound for a request's max_tokens");
  srv->add_option("--max-running", sc.max_running, "sequences decoded together");
  srv->add_option("--max-queue", sc.max_queue, "requests waiting before RESOURCE_EXHAUSTED");
  srv->add_option("--context-cache-pages", sc.context_cache_pages,
                  "context reuse: KV pages per rank that encoded contexts may keep for later requests with the "
                  "same context (-1 = whatever the pool leaves free, evicted least recently used first when "
                  "admissions need the pages; 0 = off)")
      ->check(CLI::Range(int64_t{-1}, std::numeric_limits<int64_t>::max()));

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    *exit_code = app.exit(e);
    return std::nullopt;
  }
  if (gen->parsed()) cl.command = "generate";
  if (srv->parsed()) cl.command = "serve";
  *exit_code = 0;
  return cl;
}

std::string describe_config(const Config& c) {
  return fmt::format(
      "model.path={} model.chat_template={} model.max_context={} parallel.backend={} parallel.prefill_kernel={} "
      "parallel.cuda_graphs={} star.mode={} star.exact_layout={} "
      "star.block_size={} star.n_blocks={} star.anchor_size={} star.query_tail={} scheduler.prefill_chunk_tokens={} "
      "scheduler.max_batch_tokens={} scheduler.kv_page_size={} scheduler.context_cache_pages={} "
      "scheduler.kv_memory_mb={} server.watchdog_timeout_s={} server.shutdown_grace_s={} "
      "server.entropy_overload_ratio={} server.entropy_collapse_nats={} log.level={}",
      c.model.path,
      !c.model.chat_template_file.empty() ? c.model.chat_template_file
      : c.model.chat_template.empty()     ? std::string("(model's)")
                                          : c.model.chat_template,
      c.model.max_context,
      c.parallel.backend, c.parallel.prefill_kernel, c.parallel.cuda_graphs ? "on" : "off", attention_mode_name(c.star.mode),
      exact_layout_name(c.star.exact_layout), c.star.block_size, c.star.n_blocks, c.star.anchor_size, c.star.query_tail,
      c.scheduler.prefill_chunk_tokens, c.scheduler.max_batch_tokens,
      c.scheduler.kv_page_size, c.scheduler.context_cache_pages, c.scheduler.kv_memory_mb, c.server.watchdog_timeout_s, c.server.shutdown_grace_s,
      c.server.entropy_overload_ratio, c.server.entropy_collapse_nats, c.log.level);
}

}  // namespace starserve
