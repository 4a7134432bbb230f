#include "server/completion_service.h"

#include <condition_variable>
#include <ctime>
#include <type_traits>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "common/check.h"
#include "common/log.h"

#ifndef STARSERVE_VERSION
#define STARSERVE_VERSION "unknown"
#endif

namespace starserve {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// The client's deadline on the steady clock the engine uses; nullopt when the client set none.
std::optional<Clock::time_point> steady_deadline(const grpc::ServerContext* ctx) {
  const auto deadline = ctx->deadline();
  if (deadline == std::chrono::system_clock::time_point::max()) return std::nullopt;
  const auto left = deadline - std::chrono::system_clock::now();
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(left);
}

bool deadline_passed(const grpc::ServerContext* ctx) {
  const auto deadline = ctx->deadline();
  return deadline != std::chrono::system_clock::time_point::max() && std::chrono::system_clock::now() >= deadline;
}

int64_t unix_seconds() { return static_cast<int64_t>(std::time(nullptr)); }

// The per-RPC mailbox between the engine thread (producer) and the RPC thread (consumer). Held by shared_ptr in
// the engine's callback, so an RPC that returns early (client gone) leaves it valid for events still in flight.
struct EventQueue {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::pair<EngineEvent, Clock::time_point>> events;  // with the time the engine delivered them
};

// Appends one batch of token events to a choice-like message (text, ids, logprobs).
template <typename Choice>
void append_tokens(const std::vector<EngineEvent>& tokens, const Tokenizer& tok, std::string* text, Choice* choice) {
  for (const EngineEvent& e : tokens) {
    *text += e.token.text;
    // token -1: text released at the end (held-back bytes), not a new token.
    if (e.token.token >= 0) choice->add_token_ids(e.token.token);
    if (e.token.logprobs) append_logprobs(*e.token.logprobs, tok, choice->mutable_logprobs());
  }
}

// Usage (the context/query split as the engine made it), timing, entropy with its health and the prompt's
// log-probabilities (on the response's one choice): from the engine's finish event.
template <typename Response>
void fill_tail(const EngineEvent& finished, const AttentionHealth* health, const Tokenizer& tok,
               Clock::time_point rpc_start, Response* r) {
  fill_usage(finished.usage, r->mutable_usage());
  r->set_context_id(finished.context_id);
  if (!finished.prompt_logprobs.empty()) {
    fill_prompt_logprobs(finished.prompt_logprobs, tok, r->mutable_choices(0)->mutable_prompt_logprobs());
  }
  fill_timing(finished.timing, 1000.0 * seconds_between(rpc_start, Clock::now()), r->mutable_timing());
  if (finished.entropy && finished.entropy->enabled()) {
    fill_entropy(*finished.entropy, health, r->mutable_attention_entropy());
  }
}

grpc::Status stream_closed() {
  return grpc::Status(grpc::StatusCode::CANCELLED,
                      "the stream closed before the request finished (client gone, or the server is shutting down)");
}

grpc::Status no_chat_template() {
  return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                      fmt::format("this model has no chat template the server recognises; use Complete, or start "
                                  "the server with a built-in template ({})",
                                  fmt::join(ChatTemplate::builtin_names(), ", ")));
}

// What sets the four generation RPCs apart; CompletionService::serve_generation does the rest. Response is the
// unary response or the message a stream is made of.
template <typename Request>
struct GenerationRpc;
template <>
struct GenerationRpc<v1::CompleteRequest> {
  using Response = v1::CompleteResponse;
  static constexpr std::string_view kName = "Complete", kIdPrefix = "cmpl";
  static constexpr bool kChat = false;
};
template <>
struct GenerationRpc<v1::StreamCompleteRequest> {
  using Response = v1::StreamCompleteResponse;
  static constexpr std::string_view kName = "StreamComplete", kIdPrefix = "cmpl";
  static constexpr bool kChat = false;
};
template <>
struct GenerationRpc<v1::ChatCompleteRequest> {
  using Response = v1::ChatCompleteResponse;
  static constexpr std::string_view kName = "ChatComplete", kIdPrefix = "chatcmpl";
  static constexpr bool kChat = true;
};
template <>
struct GenerationRpc<v1::StreamChatCompleteRequest> {
  using Response = v1::StreamChatCompleteResponse;
  static constexpr std::string_view kName = "StreamChatComplete", kIdPrefix = "chatcmpl";
  static constexpr bool kChat = true;
};

// Where a choice's text goes: the completion's text, the chat reply's message, the chat stream's delta.
void set_text(v1::CompletionChoice* c, std::string text) { c->set_text(std::move(text)); }
void set_text(v1::ChatChoice* c, std::string text) { c->mutable_message()->set_content(std::move(text)); }
void set_text(v1::ChatDeltaChoice* c, std::string text) { c->mutable_delta()->set_content(std::move(text)); }
// The assistant role: on the chat reply, and on the first message of a chat stream only (as OpenAI).
void set_role(v1::CompletionChoice*) {}
void set_role(v1::ChatChoice* c) { c->mutable_message()->set_role("assistant"); }
void set_role(v1::ChatDeltaChoice* c) { c->mutable_delta()->set_role("assistant"); }

}  // namespace

CompletionService::CompletionService(const ServerConfig& config, std::shared_ptr<const ApiKeyCheck> api_key,
                                     ServerMetrics* metrics, RequestRegistry* registry)
    : CheckedService("starserve.v1.CompletionService"),
      config_(config),
      api_key_(std::move(api_key)),
      metrics_(metrics),
      registry_(registry ? registry : &own_registry_),
      id_rng_(std::random_device{}()) {
  add_unary("Complete", &CompletionService::Complete);
  add_server_streaming("StreamComplete", &CompletionService::StreamComplete);
  add_unary("ChatComplete", &CompletionService::ChatComplete);
  add_server_streaming("StreamChatComplete", &CompletionService::StreamChatComplete);
  add_unary("Tokenize", &CompletionService::Tokenize);
  add_unary("GetModelInfo", &CompletionService::GetModelInfo);
  add_unary("GetServerInfo", &CompletionService::GetServerInfo);
  add_unary("Abort", &CompletionService::Abort);
  check_all_registered();
}

CompletionService::CompletionService(const ServerConfig& config, Engine& engine, const Tokenizer& tokenizer,
                                     std::optional<ChatTemplate> chat_template,
                                     std::shared_ptr<const ApiKeyCheck> api_key, ServerMetrics* metrics,
                                     RequestRegistry* registry)
    : CompletionService(config, std::move(api_key), metrics, registry) {
  attach(engine, tokenizer, std::move(chat_template));
}

void CompletionService::attach(Engine& engine, const Tokenizer& tokenizer, std::optional<ChatTemplate> chat_template) {
  SS_CHECK(!attached_.load(), "CompletionService::attach called twice");
  auto a = std::make_unique<Attached>(Attached{engine, tokenizer, std::move(chat_template), 0});
  a->max_token_bytes = longest_token_bytes(a->tokenizer);
  attached_owner_ = std::move(a);
  attached_.store(attached_owner_.get());
}

grpc::Status CompletionService::admit(const grpc::ServerContext* ctx, bool needs_ready) const {
  if (api_key_) {
    grpc::Status s = api_key_->check(ctx->client_metadata());
    if (!s.ok()) return s;
  }
  if (shutting_down_.load()) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "the server is shutting down");
  if (!attached_.load()) {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                        "the model loading is under way (health service starserve.v1.CompletionService turns "
                        "SERVING when every rank has loaded it)");
  }
  if (needs_ready && !engine().ready()) {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                        "the model is still loading on some ranks (health service "
                        "starserve.v1.CompletionService turns SERVING when it is ready)");
  }
  return grpc::Status::OK;
}

RequestLimits CompletionService::limits(const EngineInfo& info) const {
  return make_request_limits(config_, info, tokenizer(), attached()->max_token_bytes);
}

grpc::Status CompletionService::done(std::string_view rpc, grpc::Status status) {
  if (metrics_) metrics_->record_request(rpc, grpc_code_name(status.error_code()));
  if (!status.ok()) {
    log_debug("{}: {}: {}", rpc, grpc_code_name(status.error_code()), status.error_message());
  }
  return status;
}

std::string CompletionService::new_id(std::string_view prefix) {
  std::lock_guard<std::mutex> lock(id_mu_);
  return fmt::format("{}-{:016x}{:08x}", prefix, id_rng_(), static_cast<uint32_t>(id_rng_()));
}

grpc::Status CompletionService::register_id(const grpc::ServerContext* ctx, std::string_view prefix,
                                            RequestRegistry::Handle* handle) {
  const auto& md = ctx->client_metadata();
  if (auto it = md.find(kRequestIdMetadata); it != md.end()) {
    const std::string id(it->second.data(), it->second.size());
    if (std::string why = RequestRegistry::check_client_id(id); !why.empty()) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, fmt::format("metadata {}: {}", kRequestIdMetadata, why));
    }
    if (!registry_->reserve(id, handle)) {
      return grpc::Status(grpc::StatusCode::ALREADY_EXISTS,
                          fmt::format("metadata {}: a running request already has the id \"{}\"",
                                      kRequestIdMetadata, id));
    }
    return grpc::Status::OK;
  }
  // 96 random bits: a collision with a running request is practically impossible, but a retry costs nothing.
  while (!registry_->reserve(new_id(prefix), handle)) {
  }
  return grpc::Status::OK;
}

grpc::Status CompletionService::generate(grpc::ServerContext* ctx, PreparedRequest& prepared,
                                         Clock::time_point rpc_start, const TokenSink& sink,
                                         std::vector<EngineEvent>* finished, RequestRegistry::Handle& handle) {
  prepared.engine.deadline = steady_deadline(ctx);
  const int n_choices = prepared.engine.n;
  finished->assign(static_cast<size_t>(n_choices), EngineEvent());
  int n_finished = 0;
  const int64_t n_prompt = static_cast<int64_t>(prepared.engine.context.size() + prepared.engine.query.size());
  auto queue = std::make_shared<EventQueue>();
  Result<RequestId> id = engine().submit(std::move(prepared.engine), [queue](const EngineEvent& e) {
    {
      std::lock_guard<std::mutex> lock(queue->mu);
      queue->events.emplace_back(e, Clock::now());
    }
    queue->cv.notify_one();
  });
  if (!id.ok()) return to_grpc_status(id.status());
  handle.bind(engine(), *id);
  if (metrics_) metrics_->add_prompt_tokens(n_prompt);

  std::vector<std::pair<EngineEvent, Clock::time_point>> batch;
  std::vector<EngineEvent> tokens;
  std::optional<Clock::time_point> last_token_at;
  int64_t n_tokens = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(queue->mu);
      queue->cv.wait_for(lock, kCancelPollInterval, [&] { return !queue->events.empty(); });
      batch.swap(queue->events);
    }
    tokens.clear();
    for (auto& [event, at] : batch) {
      if (event.kind == EngineEvent::Kind::kFinished) {
        if (event.choice >= 0 && event.choice < n_choices) {
          (*finished)[static_cast<size_t>(event.choice)] = std::move(event);
          ++n_finished;
        }
        continue;
      }
      if (event.token.token >= 0) {
        if (metrics_) {
          if (!last_token_at) metrics_->observe_time_to_first_token(seconds_between(rpc_start, at));
          else metrics_->observe_inter_token_latency(seconds_between(*last_token_at, at));
        }
        last_token_at = at;
        ++n_tokens;
      }
      tokens.push_back(std::move(event));
    }
    batch.clear();
    if (!tokens.empty() && !sink(tokens)) {
      engine().cancel(*id);
      return stream_closed();
    }
    if (n_finished == n_choices) {
      record_finish(*finished, rpc_start);
      return grpc::Status::OK;
    }
    // True when the client cancelled, its deadline passed or the server is past its shutdown deadline.
    if (ctx->IsCancelled()) {
      engine().cancel(*id);
      if (deadline_passed(ctx)) {
        return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                            fmt::format("the deadline passed after {} generated tokens", n_tokens));
      }
      return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client");
    }
  }
}

grpc::Status CompletionService::finish_status(const grpc::ServerContext* ctx, const EngineEvent& finished) const {
  if (finished.finish == FinishReason::kError) {
    if (!finished.error.ok()) return to_grpc_status(finished.error);
    return grpc::Status(grpc::StatusCode::INTERNAL, "the engine failed the request without saying why");
  }
  if (finished.finish == FinishReason::kCancelled) {
    if (!finished.error.ok()) return to_grpc_status(finished.error);
    if (deadline_passed(ctx)) return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "the deadline passed");
    // Cancelled on the server's side (e.g. shutdown) with the client still there: the partial output is an
    // answer, marked FINISH_REASON_CANCELLED.
  }
  return grpc::Status::OK;
}

void CompletionService::record_finish(const std::vector<EngineEvent>& choices, Clock::time_point rpc_start) {
  if (!metrics_) return;
  const EngineEvent& finished = choices.front();
  for (const EngineEvent& c : choices) metrics_->add_generated_tokens(c.usage.completion_tokens);
  if (finished.usage.context_tokens > 0 && finished.timing.phase1_ms > 0) {
    metrics_->observe_phase1(finished.timing.phase1_ms / 1000.0);
  }
  metrics_->observe_request_duration(seconds_between(rpc_start, Clock::now()));
}

// ---------------------------------------------------------------------------------------------------------------
// Completion and chat, unary and streaming

template <typename Request, typename Out>
grpc::Status CompletionService::serve_generation(grpc::ServerContext* ctx, const Request& request, Out* out) {
  using Rpc = GenerationRpc<Request>;
  using Response = typename Rpc::Response;
  // Unary RPCs fill *out, a Response; streaming ones write Responses to *out, a ServerWriter.
  constexpr bool kStream = !std::is_same_v<Out, Response>;
  const Clock::time_point start = Clock::now();
  if (grpc::Status s = admit(ctx, true); !s.ok()) return s;
  if constexpr (Rpc::kChat) {
    if (!chat_template()) return no_chat_template();
  }
  const EngineInfo info = engine().info();
  Result<PreparedRequest> prepared =
      prepare_request(request, tokenizer(), chat_template() ? &*chat_template() : nullptr, limits(info));
  if (!prepared.ok()) return to_grpc_status(prepared.status());
  const HealthThresholds thresholds = prepared->health;

  RequestRegistry::Handle handle;
  if (grpc::Status r = register_id(ctx, Rpc::kIdPrefix, &handle); !r.ok()) return r;
  const std::string& id = handle.id();
  const int64_t stream_created = unix_seconds();  // the same on every message of a stream
  const int n_choices = prepared->engine.n;
  std::vector<bool> role_sent(static_cast<size_t>(n_choices), false);
  // The header of a message (streams: once per message; the unary response once, at the end).
  const auto header = [&](Response* m, int64_t created) {
    m->set_id(id);
    m->set_model(info.model_name);
    m->set_created(created);
  };
  // A message's choice `c`: a new entry of a stream message, the unary response's own (added before generating).
  const auto choice_of = [&](Response* m, int c) {
    auto* ch = kStream ? m->add_choices() : m->mutable_choices(c);
    ch->set_index(c);
    if (!role_sent[static_cast<size_t>(c)]) set_role(ch);
    role_sent[static_cast<size_t>(c)] = true;
    return ch;
  };
  // Per choice. Unary: the whole output text. Streaming: the text its next message carries (the echo, until one
  // is sent).
  std::vector<std::string> texts(static_cast<size_t>(n_choices), prepared->echo_text);
  std::vector<EngineEvent> finished;
  grpc::Status s;
  // Token events by choice, in order.
  const auto by_choice = [n_choices](const std::vector<EngineEvent>& tokens) {
    std::vector<std::vector<EngineEvent>> per(static_cast<size_t>(n_choices));
    for (const EngineEvent& e : tokens) {
      if (e.choice >= 0 && e.choice < n_choices) per[static_cast<size_t>(e.choice)].push_back(e);
    }
    return per;
  };
  if constexpr (kStream) {
    s = generate(ctx, *prepared, start,
                 [&](const std::vector<EngineEvent>& tokens) {
                   Response m;
                   header(&m, stream_created);
                   const auto per = by_choice(tokens);
                   for (int ci = 0; ci < n_choices; ++ci) {
                     if (per[static_cast<size_t>(ci)].empty()) continue;
                     auto* c = choice_of(&m, ci);
                     std::string& text = texts[static_cast<size_t>(ci)];
                     append_tokens(per[static_cast<size_t>(ci)], tokenizer(), &text, c);
                     set_text(c, std::move(text));
                     text.clear();
                   }
                   return out->Write(m);
                 },
                 &finished, handle);
  } else {
    for (int ci = 0; ci < n_choices; ++ci) out->add_choices();
    s = generate(ctx, *prepared, start,
                 [&](const std::vector<EngineEvent>& tokens) {
                   const auto per = by_choice(tokens);
                   for (int ci = 0; ci < n_choices; ++ci) {
                     append_tokens(per[static_cast<size_t>(ci)], tokenizer(), &texts[static_cast<size_t>(ci)],
                                   out->mutable_choices(ci));
                   }
                   return true;
                 },
                 &finished, handle);
  }
  if (!s.ok()) return s;
  for (const EngineEvent& f : finished) {
    if (s = finish_status(ctx, f); !s.ok()) return s;
  }
  Response last_message;
  Response* last = &last_message;
  if constexpr (!kStream) last = out;
  header(last, kStream ? stream_created : unix_seconds());
  for (int ci = 0; ci < n_choices; ++ci) {
    auto* c = choice_of(last, ci);
    std::string& text = texts[static_cast<size_t>(ci)];
    if (!kStream || !text.empty()) set_text(c, std::move(text));
    c->set_finish_reason(to_proto(finished[static_cast<size_t>(ci)].finish));
  }
  // Usage: every choice's completion tokens; the rest (prompt, timing, entropy, prompt log-probabilities,
  // context id) is the first choice's, which encoded the prompt.
  EngineEvent tail = finished.front();
  for (size_t ci = 1; ci < finished.size(); ++ci) tail.usage.completion_tokens += finished[ci].usage.completion_tokens;
  const EngineEvent& first = tail;
  std::optional<AttentionHealth> health;
  if (first.entropy && first.entropy->enabled()) {
    health = attention_health(*first.entropy, thresholds);
    if (metrics_) metrics_->observe_attention_health(*health);
  }
  fill_tail(first, health ? &*health : nullptr, tokenizer(), start, last);
  if constexpr (kStream) {
    if (!out->Write(*last)) return stream_closed();
  }
  return grpc::Status::OK;
}

grpc::Status CompletionService::Complete(grpc::ServerContext* ctx, const v1::CompleteRequest* request,
                                         v1::CompleteResponse* response) {
  return done(GenerationRpc<v1::CompleteRequest>::kName, serve_generation(ctx, *request, response));
}

grpc::Status CompletionService::StreamComplete(grpc::ServerContext* ctx, const v1::StreamCompleteRequest* request,
                                               grpc::ServerWriter<v1::StreamCompleteResponse>* writer) {
  return done(GenerationRpc<v1::StreamCompleteRequest>::kName, serve_generation(ctx, *request, writer));
}

grpc::Status CompletionService::ChatComplete(grpc::ServerContext* ctx, const v1::ChatCompleteRequest* request,
                                             v1::ChatCompleteResponse* response) {
  return done(GenerationRpc<v1::ChatCompleteRequest>::kName, serve_generation(ctx, *request, response));
}

grpc::Status CompletionService::StreamChatComplete(grpc::ServerContext* ctx,
                                                   const v1::StreamChatCompleteRequest* request,
                                                   grpc::ServerWriter<v1::StreamChatCompleteResponse>* writer) {
  return done(GenerationRpc<v1::StreamChatCompleteRequest>::kName, serve_generation(ctx, *request, writer));
}

// ---------------------------------------------------------------------------------------------------------------
// Tokenize and info: no engine work, so they answer before the model is ready.

grpc::Status CompletionService::Tokenize(grpc::ServerContext* ctx, const v1::TokenizeRequest* request,
                                         v1::TokenizeResponse* response) {
  grpc::Status s = admit(ctx, false);
  if (s.ok()) {
    const ChatTemplate* tmpl = chat_template() ? &*chat_template() : nullptr;
    Result<v1::TokenizeResponse> r = tokenize(*request, tokenizer(), tmpl, limits(engine().info()));
    if (r.ok()) {
      *response = std::move(r).value();
      const int64_t n_ctx = engine().plain_prompt_context_tokens(response->count());
      response->set_context_tokens(static_cast<int32_t>(n_ctx));
      response->set_query_tokens(static_cast<int32_t>(response->count() - n_ctx));
    } else {
      s = to_grpc_status(r.status());
    }
  }
  return done("Tokenize", s);
}

grpc::Status CompletionService::GetModelInfo(grpc::ServerContext* ctx, const v1::GetModelInfoRequest*,
                                             v1::GetModelInfoResponse* response) {
  grpc::Status s = admit(ctx, false);
  if (s.ok()) {
    const EngineInfo info = engine().info();
    response->set_model(info.model_name);
    response->set_architecture(info.architecture);
    response->set_n_layers(info.n_layers);
    response->set_n_heads(info.n_heads);
    response->set_n_kv_heads(info.n_kv_heads);
    response->set_hidden(info.hidden);
    response->set_n_vocab(info.n_vocab);
    response->set_max_context(info.max_context);
    if (chat_template()) response->set_chat_template(std::string(chat_template()->name()));
    if (auto bos = tokenizer().bos_id()) response->set_bos_token_id(*bos);
    if (auto eos = tokenizer().eos_id()) response->set_eos_token_id(*eos);
    response->set_tokenizer(tokenizer().kind());
    v1::KvCacheInfo* kv = response->mutable_kv_cache();
    kv->set_bytes_per_row(info.kv_bytes_per_row);
    kv->set_dtype(info.kv_dtype);
    kv->set_page_size(info.kv_page_size);
    kv->set_compressed_chunk(info.kv_compressed_chunk);
    kv->set_leading_tokens(info.kv_leading_tokens);
    kv->set_state_bytes_per_sequence(info.kv_state_bytes_per_sequence);
    if (info.max_context > 0) {
      const int64_t n = info.max_context, p = info.kv_compressed_chunk;
      const int64_t rows = p > 0 ? (n + p - 1) / p + 1 : n;
      kv->set_bytes_per_token_at_max_context(
          static_cast<double>(rows * info.kv_bytes_per_row + info.kv_state_bytes_per_sequence) / static_cast<double>(n));
    }
  }
  return done("GetModelInfo", s);
}

grpc::Status CompletionService::GetServerInfo(grpc::ServerContext* ctx, const v1::GetServerInfoRequest*,
                                              v1::GetServerInfoResponse* response) {
  grpc::Status s = admit(ctx, false);
  if (s.ok()) {
    const EngineInfo info = engine().info();
    const RequestLimits l = limits(info);
    response->set_version(STARSERVE_VERSION);
    response->set_world_size(info.world_size);
    for (const std::string& d : info.devices) response->add_devices(d);
    v1::StarDefaults* star = response->mutable_star();
    star->set_attention_mode(to_proto(info.star_defaults.mode));
    star->set_block_size(info.star_defaults.block_size);
    star->set_n_blocks(info.star_defaults.n_blocks);
    star->set_anchor_size(info.star_defaults.anchor_size);
    star->set_query_tail(info.star_defaults.query_tail);
    star->set_exact_layout(to_proto(info.star_defaults.exact_layout));
    v1::RequestLimits* lim = response->mutable_limits();
    lim->set_max_prompt_tokens(l.max_prompt_tokens);
    lim->set_max_prompt_bytes(l.max_prompt_bytes);
    lim->set_max_tokens(l.max_tokens_limit);
    lim->set_max_stop_strings(l.max_stop_strings);
    lim->set_max_stop_string_bytes(l.max_stop_string_bytes);
    lim->set_max_message_bytes(config_.max_message_bytes);
    lim->set_max_logprobs(kMaxLogprobs);
    response->set_ready(engine().ready());
    response->set_kv_pages_total(info.kv_pages_total);
    response->set_kv_pages_free(info.kv_pages_free);
    response->set_queue_depth(info.queue_depth);
    response->set_running(info.running);
    response->set_tls(!config_.tls_cert.empty());
    response->set_mutual_tls(!config_.tls_cert.empty() && !config_.tls_client_ca.empty());
    response->set_auth_required(!config_.api_key.empty());
    response->set_communicator(info.communicator);
    response->set_kv_page_size(info.kv_page_size);
    response->set_kv_bytes_per_rank(info.kv_pages_total * info.kv_page_size * info.kv_bytes_per_row);
    v1::ContextCacheInfo* cc = response->mutable_context_cache();
    cc->set_enabled(info.context_cache_max_pages != 0);
    cc->set_max_pages(info.context_cache_max_pages);
    cc->set_entries(info.context_cache_entries);
    cc->set_pages(info.context_cache_pages);
    cc->set_hits(info.context_cache_hits);
    cc->set_misses(info.context_cache_misses);
    cc->set_evictions(info.context_cache_evictions);
  }
  return done("GetServerInfo", s);
}

// ---------------------------------------------------------------------------------------------------------------
// Abort

grpc::Status CompletionService::Abort(grpc::ServerContext* ctx, const v1::AbortRequest* request,
                                      v1::AbortResponse* response) {
  if (api_key_) {
    if (grpc::Status s = api_key_->check(ctx->client_metadata()); !s.ok()) return done("Abort", s);
  }
  if (request->ids_size() == 0) {
    return done("Abort", grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "ids: name at least one request id"));
  }
  if (request->ids_size() > kMaxAbortIds) {
    return done("Abort", grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                      fmt::format("ids: at most {} per call, got {}", kMaxAbortIds,
                                                  request->ids_size())));
  }
  for (int i = 0; i < request->ids_size(); ++i) {
    if (std::string why = RequestRegistry::check_client_id(request->ids(i)); !why.empty()) {
      return done("Abort", grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, fmt::format("ids[{}]: {}", i, why)));
    }
  }
  for (const std::string& id : request->ids()) {
    if (registry_->abort(id)) {
      response->add_aborted(id);
      log_info("Abort: request {} cancelled", id);
    } else {
      response->add_not_found(id);
    }
  }
  return done("Abort", grpc::Status::OK);
}

}  // namespace starserve
