// `starserve generate`: one request, start to end, on every rank of the job.
#include <algorithm>
#include <cstdio>
#include <optional>
#include <fstream>
#include <sstream>

#include "app/commands.h"
#include "app/runtime.h"
#include "common/log.h"
#include "engine/serving_engine.h"
#include "model/chat_prompt.h"
#include "model/chat_template.h"

namespace starserve {

namespace {

Result<std::string> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return not_found("cannot open context file {}", path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Rank 0: text -> the request's tokens. With --context-file the split is the user's: the document
// is the context and the question the query. A plain prompt goes whole, and the engine splits it
// (EngineRequest::split_prompt), exactly as it does for the gRPC API.
Status build_prompt(const CommandLine& cl, const Tokenizer& tok, EngineRequest* req) {
  const GenerateInputs& g = cl.generate;
  const bool split = !g.context_file.empty();
  if (split && g.query.empty()) return invalid_argument("--context-file needs --query");
  if (!split && g.prompt.empty()) return invalid_argument("give --prompt, or --context-file with --query");
  if (split && !g.prompt.empty()) return invalid_argument("--prompt cannot be combined with --context-file");
  std::string context_text;
  if (split) {
    SS_ASSIGN_OR_RETURN(context_text, read_file(g.context_file));
  }
  if (g.chat) {
    Result<ChatTemplate> tmpl = select_chat_template(cl.config.model.chat_template_file, cl.config.model.chat_template,
                                                     cl.config.model.path, tok);
    if (!tmpl.ok()) return tmpl.status();
    std::vector<ChatMessage> msgs;
    if (!g.system.empty()) msgs.push_back({"system", g.system});
    if (split) {
      // Outer whitespace goes (a file's last newline, say), so that templates that trim a message's
      // content (llama3, gemma, llama2) keep the document whole and it is found again below.
      const size_t first = context_text.find_first_not_of(" \t\r\n");
      if (first == std::string::npos) return invalid_argument("--context-file {} is only whitespace", g.context_file);
      context_text = context_text.substr(first, context_text.find_last_not_of(" \t\r\n") + 1 - first);
    }
    msgs.push_back({"user", split ? context_text + "\n\n" + g.query : g.prompt});
    // Control tokens come only from the template; the prompt, document and question are text
    // (model/chat_prompt.h), as in the gRPC chat RPCs.
    SS_ASSIGN_OR_RETURN(const ChatPrompt prompt, render_chat_prompt(*tmpl, msgs, tok));
    if (split) {
      // Context = the rendered text up to the end of the document; query = the question and the
      // rest of the template (end of turn, assistant header).
      const auto [begin, end] = prompt.contents.back();
      if (begin == ChatPrompt::kNotWritten ||
          std::string_view(prompt.text).substr(begin, context_text.size()) != context_text) {
        return invalid_argument("chat template {} changed the document's text; it cannot be kept as the context",
                                tmpl->name());
      }
      const size_t cut = begin + context_text.size();
      req->context = prompt.encode(tok, 0, cut);
      req->query = prompt.encode(tok, cut, prompt.text.size());
      return Status();
    }
    req->query = prompt.encode(tok);
    req->split_prompt = true;
    return Status();
  }
  if (split) {
    req->context = tok.encode(context_text, true, false);
    req->query = tok.encode(g.query, false, false);
    return Status();
  }
  req->query = tok.encode(g.prompt, true, false);
  req->split_prompt = true;
  return Status();
}

// Rank 0: the one request, submitted to the serving engine; its text streams to stdout and its
// timing (and entropy) go to stderr when it finishes. The engine stops after it.
Status generate(const CommandLine& cl, Runtime& rt, ServingEngine& engine) {
  const GenerateInputs& g = cl.generate;
  const ModelHParams& hp = rt.model->hparams();
  EngineRequest req;
  req.sampling = g.sampling;
  req.mode = cl.config.star.mode;
  req.block_size = cl.config.star.block_size;
  req.anchor_size = cl.config.star.anchor_size;
  req.n_blocks = cl.config.star.n_blocks;
  req.return_entropy = g.print_entropy;
  SS_RETURN_IF_ERROR(build_prompt(cl, *rt.files.tokenizer, &req));
  if (req.query.empty()) return invalid_argument("the query is empty after tokenization");
  const int64_t n_prompt = static_cast<int64_t>(req.context.size() + req.query.size());
  if (n_prompt + g.sampling.max_tokens > rt.max_context) {
    return out_of_range("prompt of {} tokens + max_tokens {} = {} exceeds the maximum context of {} tokens", n_prompt,
                        g.sampling.max_tokens, n_prompt + g.sampling.max_tokens, rt.max_context);
  }
  const AttentionMode mode = req.mode;
  std::optional<EngineEvent> finished;
  SS_ASSIGN_OR_RETURN(RequestId id, engine.submit(std::move(req), [&](const EngineEvent& ev) {
    if (ev.kind == EngineEvent::Kind::kToken) {
      std::fwrite(ev.token.text.data(), 1, ev.token.text.size(), stdout);
      std::fflush(stdout);
      if (ev.token.logprobs) {
        std::string top;
        for (const auto& [tid, lp] : ev.token.logprobs->top) top += fmt::format(" {}:{:.3f}", tid, lp);
        std::fprintf(stderr, "[logprobs] token %d %.4f top%s\n", ev.token.token, ev.token.logprobs->logprob,
                     top.c_str());
      }
      return;
    }
    finished = ev;
    engine.stop();
  }));
  log_info("request {}: {} prompt tokens; attention {}", id, n_prompt, attention_mode_name(mode));
  SS_RETURN_IF_ERROR(engine.run());
  SS_CHECK(finished.has_value(), "the engine stopped before request {} finished", id);
  std::fputc('\n', stdout);
  std::fflush(stdout);
  if (finished->finish == FinishReason::kError) return finished->error;
  const EngineTiming& t = finished->timing;
  const EngineUsage& u = finished->usage;
  const double phase1_s = t.phase1_ms / 1000.0;
  // The query's forward and the first token: from the end of phase 1 to the first token.
  const double first_step_s = std::max(0.0, t.time_to_first_token_ms - t.queue_ms - t.phase1_ms) / 1000.0;
  const double decode_s = t.decode_ms / 1000.0;
  const long long n_decode = std::max<long long>(0, u.completion_tokens - 1);
  std::fprintf(stderr,
               "[timing] context %lld tokens in %.3f s (%.1f tok/s, %s); query %lld tokens + first token %.3f s; "
               "decode %lld tokens in %.3f s (%.2f tok/s); finish %s\n",
               static_cast<long long>(u.context_tokens), phase1_s, phase1_s > 0 ? u.context_tokens / phase1_s : 0.0,
               attention_mode_name(mode), static_cast<long long>(u.query_tokens), first_step_s, n_decode, decode_s,
               n_decode > 0 && decode_s > 0 ? n_decode / decode_s : 0.0, finish_reason_name(finished->finish));
  if (g.print_entropy && finished->entropy) {
    for (int l = 0; l < hp.n_layers; ++l) {
      const EntropyStats& e = *finished->entropy;
      if (e.has_rank_entropy()) {
        std::fprintf(stderr, "[entropy] layer %2d mean %.4f nats (max %.4f) rank %.4f nats over %d ranks\n", l,
                     e.layer_mean(l), e.mean_max(l, 0), e.rank_layer_mean(l), e.n_ranks);
      } else {
        std::fprintf(stderr, "[entropy] layer %2d mean %.4f nats (max %.4f)\n", l, e.layer_mean(l), e.mean_max(l, 0));
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
  if (!st.ok()) {
    log_error("{}", st.to_string());
    return 1;
  }
  // The same engine as `serve`: rank 0 submits and runs the scheduler loop, the other ranks follow
  // its steps until it stops them.
  const EngineContext ctx = engine_context(cl.config, rt);
  if (rt.comm->rank() != 0) {
    st = run_worker(ctx);
    if (!st.ok()) log_error("worker stopped: {}", st.to_string());
    return st.ok() ? 0 : 1;
  }
  ServingEngine engine(ctx);
  st = generate(cl, rt, engine);
  if (!st.ok()) {
    // A request refused before it ran leaves the workers waiting for a step: stop them.
    engine.stop();
    const Status stopped = engine.run();
    if (!stopped.ok()) log_error("{}", stopped.to_string());
    log_error("{}", st.to_string());
    return 1;
  }
  return 0;
}

}  // namespace starserve
