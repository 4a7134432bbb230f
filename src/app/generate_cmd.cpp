// `starserve generate`: one request, start to end, on every rank of the job.
#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>

#include <spdlog/spdlog.h>

#include "app/commands.h"
#include "app/runtime.h"
#include "engine/text_controller.h"
#include "model/chat_template.h"
#include "star/context_encoder.h"

namespace starserve {

namespace {

struct PromptTokens {
  std::vector<int32_t> context;
  std::vector<int32_t> query;
};

Result<std::string> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return not_found("cannot open context file {}", path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Rank 0: text -> (context tokens, query tokens).
Result<PromptTokens> build_prompt(const CommandLine& cl, const Tokenizer& tok, int query_tail) {
  const GenerateInputs& g = cl.generate;
  const bool split = !g.context_file.empty();
  if (split && g.query.empty()) return invalid_argument("--context-file needs --query");
  if (!split && g.prompt.empty()) return invalid_argument("give --prompt, or --context-file with --query");
  if (split && !g.prompt.empty()) return invalid_argument("--prompt cannot be combined with --context-file");
  std::string context_text;
  if (split) {
    SS_ASSIGN_OR_RETURN(context_text, read_file(g.context_file));
  }
  PromptTokens out;
  if (g.chat) {
    Result<ChatTemplate> tmpl = cl.config.model.chat_template.empty()
                                    ? ChatTemplate::detect(tok.chat_template())
                                    : ChatTemplate::builtin(cl.config.model.chat_template);
    if (!tmpl.ok()) return tmpl.status();
    std::vector<ChatMessage> msgs;
    if (!g.system.empty()) msgs.push_back({"system", g.system});
    msgs.push_back({"user", split ? context_text + "\n\n" + g.query : g.prompt});
    const std::string rendered = tmpl->apply(msgs, /*add_generation_prompt=*/true);
    if (split) {
      // Context = the rendered text up to the end of the document; query = the question and the
      // rest of the template (end of turn, assistant header).
      const size_t at = rendered.find(context_text);
      SS_CHECK(at != std::string::npos, "chat template dropped the context text");
      const size_t cut = at + context_text.size();
      out.context = tok.encode(std::string_view(rendered).substr(0, cut), false, true);
      out.query = tok.encode(std::string_view(rendered).substr(cut), false, true);
      return out;
    }
    std::vector<int32_t> all = tok.encode(rendered, false, true);
    const int64_t n_ctx = split_plain_prompt(static_cast<int64_t>(all.size()), query_tail);
    out.context.assign(all.begin(), all.begin() + n_ctx);
    out.query.assign(all.begin() + n_ctx, all.end());
    return out;
  }
  if (split) {
    out.context = tok.encode(context_text, true, false);
    out.query = tok.encode(g.query, false, false);
    return out;
  }
  std::vector<int32_t> all = tok.encode(g.prompt, true, false);
  const int64_t n_ctx = split_plain_prompt(static_cast<int64_t>(all.size()), query_tail);
  out.context.assign(all.begin(), all.begin() + n_ctx);
  out.query.assign(all.begin() + n_ctx, all.end());
  return out;
}

// Rank 0's prompt, checked and broadcast to every rank. An error is broadcast too (as size -1)
// so that no rank waits for tokens that will never come.
Result<PromptTokens> share_prompt(Communicator& comm, Result<PromptTokens> mine) {
  int64_t sizes[2] = {-1, -1};
  if (comm.rank() == 0 && mine.ok()) {
    sizes[0] = static_cast<int64_t>(mine->context.size());
    sizes[1] = static_cast<int64_t>(mine->query.size());
  }
  SS_RETURN_IF_ERROR(comm.broadcast(sizes, sizeof(sizes), 0));
  if (sizes[0] < 0) return comm.rank() == 0 ? mine.status() : unavailable("rank 0 could not build the prompt");
  PromptTokens p;
  if (comm.rank() == 0) p = std::move(mine).value();
  p.context.resize(sizes[0]);
  p.query.resize(sizes[1]);
  if (sizes[0] > 0) SS_RETURN_IF_ERROR(comm.broadcast(p.context.data(), sizes[0] * sizeof(int32_t), 0));
  if (sizes[1] > 0) SS_RETURN_IF_ERROR(comm.broadcast(p.query.data(), sizes[1] * sizeof(int32_t), 0));
  return p;
}

Status generate(const CommandLine& cl, Runtime& rt) {
  using Clock = std::chrono::steady_clock;
  Communicator& comm = *rt.comm;
  const bool coord = comm.rank() == 0;
  const GenerateInputs& g = cl.generate;
  const ModelHParams& hp = rt.model->hparams();

  Result<PromptTokens> local = invalid_argument("not the coordinator");
  if (coord) {
    SS_RETURN_IF_ERROR(g.sampling.validate(hp.n_vocab));
    local = build_prompt(cl, *rt.files.tokenizer, cl.config.star.query_tail);
    if (local.ok()) {
      const int64_t total = static_cast<int64_t>(local->context.size() + local->query.size()) + g.sampling.max_tokens;
      if (local->query.empty()) {
        local = invalid_argument("the query is empty after tokenization");
      } else if (total > rt.max_context) {
        local = out_of_range("prompt of {} tokens + max_tokens {} = {} exceeds the maximum context of {} tokens",
                             local->context.size() + local->query.size(), g.sampling.max_tokens, total,
                             rt.max_context);
      }
    }
  }
  SS_ASSIGN_OR_RETURN(PromptTokens prompt, share_prompt(comm, std::move(local)));
  const int64_t n_ctx = static_cast<int64_t>(prompt.context.size());

  // Phase 1 (or the global / exact context encoding).
  const SeqId seq = 1;
  ContextEncoder encoder(*rt.model, *rt.cache, comm);
  const ContextPlan plan{cl.config.star.mode, cl.config.star.block_size, cl.config.star.anchor_size,
                         cl.config.star.n_blocks};
  SS_ASSIGN_OR_RETURN(StarLayout layout, encoder.layout_for(n_ctx, plan));
  if (coord) {
    spdlog::info("prompt: {} context + {} query tokens; attention {} with {} blocks of {} tokens, anchor {}",
                 n_ctx, prompt.query.size(), attention_mode_name(plan.mode), layout.blocks.size(), layout.block_size,
                 layout.anchor_size);
  }
  const auto t0 = Clock::now();
  SS_RETURN_IF_ERROR(encoder.encode(seq, prompt.context, layout, plan.mode, [&](int done, int total) {
    spdlog::info("phase 1: block {}/{} encoded on this rank", done, total);
  }));
  float phase1_s = std::chrono::duration<float>(Clock::now() - t0).count();
  SS_RETURN_IF_ERROR(comm.all_reduce_max(&phase1_s, 1));  // the slowest rank sets the pace

  // Phase 2: query and generation.
  Phase2Attention phase2(rt.model->backend(), *rt.cache, hp, comm, MergeAlgo::kAuto);
  phase2.register_sequence(seq, comm.rank() == layout.query_host, n_ctx);
  EntropyStats entropy;
  if (g.print_entropy) {
    entropy.reset(hp.n_layers, hp.n_heads);
    phase2.track_entropy(seq, &entropy);
  }
  std::unique_ptr<TextController> controller;
  if (coord) {
    std::vector<int32_t> all = prompt.context;
    all.insert(all.end(), prompt.query.begin(), prompt.query.end());
    controller = std::make_unique<TextController>(
        *rt.files.tokenizer, g.sampling, std::move(all), [&](const TokenEvent& ev) {
          std::fwrite(ev.text.data(), 1, ev.text.size(), stdout);
          std::fflush(stdout);
          if (ev.logprobs) {
            std::string top;
            for (const auto& [id, lp] : ev.logprobs->top) top += fmt::format(" {}:{:.3f}", id, lp);
            std::fprintf(stderr, "[logprobs] token %d %.4f top%s\n", ev.token, ev.logprobs->logprob, top.c_str());
          }
        });
  }
  SS_ASSIGN_OR_RETURN(DecodeOutcome out, run_decode_loop(*rt.model, phase2, seq, prompt.query, n_ctx, comm,
                                                         controller.get()));
  rt.cache->free_sequence(seq);
  if (coord) {
    controller->finish(out.finish);
    std::fputc('\n', stdout);
    std::fflush(stdout);
    const double n_gen = static_cast<double>(out.tokens.size());
    std::fprintf(stderr,
                 "[timing] context %lld tokens in %.3f s (%.1f tok/s, %s); query %zu tokens + first token %.3f s; "
                 "decode %d tokens in %.3f s (%.2f tok/s); finish %s\n",
                 static_cast<long long>(n_ctx), phase1_s, phase1_s > 0 ? n_ctx / phase1_s : 0.0,
                 attention_mode_name(plan.mode), prompt.query.size(), out.first_step_s,
                 static_cast<int>(n_gen - 1), out.decode_s, n_gen > 1 && out.decode_s > 0 ? (n_gen - 1) / out.decode_s : 0.0,
                 finish_reason_name(out.finish));
    if (g.print_entropy) {
      for (int l = 0; l < hp.n_layers; ++l) {
        std::fprintf(stderr, "[entropy] layer %2d mean %.4f nats (max %.4f)\n", l, entropy.layer_mean(l),
                     entropy.mean_max(l, 0));
      }
    }
  }
  return Status();
}

}  // namespace

int run_generate(const CommandLine& cl, int* argc, char*** argv) {
  auto comm = start_communicator(argc, argv);
  if (!comm.ok()) {
    std::fprintf(stderr, "error: %s\n", comm.status().to_string().c_str());
    return 1;
  }
  Runtime rt;
  rt.comm = std::move(comm).value();
  Status st = start_runtime(cl.config, rt);
  if (st.ok()) st = generate(cl, rt);
  if (!st.ok()) {
    spdlog::error("{}", st.to_string());
    return 1;
  }
  return 0;
}

}  // namespace starserve
