#include "server/convert.h"

#include <algorithm>
#include <climits>
#include <type_traits>

#include <fmt/ranges.h>

#include "common/check.h"
#include "common/log.h"
#include "model/chat_prompt.h"

namespace starserve {
namespace {

Status check_model(const std::string& requested, const RequestLimits& limits) {
  if (requested.empty() || requested == limits.model_name) return Status();
  return not_found("model \"{}\" is not served here; this server serves \"{}\"", requested, limits.model_name);
}

// The GenerationParams checks that need no prompt, made before any tokenizing.
Status check_params(const v1::GenerationParams& g, const RequestLimits& limits) {
  // Several choices share the prompt's KV (the engine forks the sequence after the query).
  if (g.has_n() && (g.n() < 1 || g.n() > kMaxChoices)) {
    return invalid_argument("n = {} must be in [1, {}]", g.n(), kMaxChoices);
  }
  if (g.has_max_tokens() && (g.max_tokens() < 1 || g.max_tokens() > limits.max_tokens_limit)) {
    return invalid_argument("max_tokens = {} must be in [1, {}] (server limit max_tokens_limit)", g.max_tokens(),
                            limits.max_tokens_limit);
  }
  if (g.stop_size() > limits.max_stop_strings) {
    return invalid_argument("stop has {} strings; the server allows at most {} (max_stop_strings)", g.stop_size(),
                            limits.max_stop_strings);
  }
  for (int i = 0; i < g.stop_size(); ++i) {
    const size_t n = g.stop(i).size();
    if (n == 0) return invalid_argument("stop[{}] is empty", i);
    if (n > static_cast<size_t>(limits.max_stop_string_bytes)) {
      return invalid_argument("stop[{}] has {} bytes; the server allows at most {} (max_stop_string_bytes)", i, n,
                              limits.max_stop_string_bytes);
    }
  }
  if (g.has_prompt_logprobs() && (g.prompt_logprobs() < 0 || g.prompt_logprobs() > kMaxLogprobs)) {
    return invalid_argument("prompt_logprobs = {} must be in [0, {}] (max_logprobs)", g.prompt_logprobs(),
                            kMaxLogprobs);
  }
  // Checked whether or not the request asks for entropy, so a wrong value is never silently unused.
  if (g.has_entropy_overload_ratio()) SS_RETURN_IF_ERROR(check_overload_ratio(g.entropy_overload_ratio()));
  if (g.has_entropy_collapse_nats()) SS_RETURN_IF_ERROR(check_collapse_nats(g.entropy_collapse_nats()));
  return Status();
}

// GenerationParams -> EngineRequest's sampling and Star fields, once the prompt (`n_prompt` tokens) is known.
// default_max_tokens applies when max_tokens is unset.
Status apply_params(const v1::GenerationParams& g, int64_t n_prompt, int default_max_tokens,
                    const RequestLimits& limits, PreparedRequest* prepared) {
  EngineRequest* out = &prepared->engine;
  if (limits.max_prompt_tokens > 0 && n_prompt > limits.max_prompt_tokens) {
    return invalid_argument("the prompt has {} tokens; the server allows at most {} (max_prompt_tokens)", n_prompt,
                            limits.max_prompt_tokens);
  }
  SamplingParams& s = out->sampling;
  s.max_tokens = g.has_max_tokens() ? g.max_tokens() : default_max_tokens;
  if (s.max_tokens < 1) {
    return invalid_argument("the prompt has {} tokens and leaves no room to generate in the context limit of {}",
                            n_prompt, limits.max_context);
  }
  if (limits.max_context > 0 && n_prompt + s.max_tokens > limits.max_context) {
    return invalid_argument("prompt ({} tokens) + max_tokens ({}) = {} exceeds the context limit of {} tokens",
                            n_prompt, s.max_tokens, n_prompt + s.max_tokens, limits.max_context);
  }
  if (g.has_temperature()) s.temperature = g.temperature();
  if (g.has_top_p()) s.top_p = g.top_p();
  if (g.has_top_k()) s.top_k = g.top_k();
  if (g.has_min_p()) s.min_p = g.min_p();
  if (g.has_repetition_penalty()) s.repetition_penalty = g.repetition_penalty();
  if (g.has_frequency_penalty()) s.frequency_penalty = g.frequency_penalty();
  if (g.has_presence_penalty()) s.presence_penalty = g.presence_penalty();
  if (g.has_seed()) s.seed = g.seed();
  s.stop.assign(g.stop().begin(), g.stop().end());
  s.stop_token_ids.assign(g.stop_token_ids().begin(), g.stop_token_ids().end());
  for (size_t i = 0; i < s.stop_token_ids.size(); ++i) {
    if (s.stop_token_ids[i] < 0 || s.stop_token_ids[i] >= limits.n_vocab) {
      return invalid_argument("stop_token_ids[{}] = {} must be in [0, {}) (n_vocab)", i, s.stop_token_ids[i],
                              limits.n_vocab);
    }
  }
  if (g.has_ignore_eos()) s.ignore_eos = g.ignore_eos();
  if (g.has_logprobs()) s.logprobs = g.logprobs();
  SS_RETURN_IF_ERROR(s.validate(limits.n_vocab));

  switch (g.attention_mode()) {
    case v1::ATTENTION_MODE_GLOBAL: out->mode = AttentionMode::kGlobal; break;
    case v1::ATTENTION_MODE_EXACT: out->mode = AttentionMode::kExact; break;
    case v1::ATTENTION_MODE_STAR: out->mode = AttentionMode::kStar; break;
    case v1::ATTENTION_MODE_UNSPECIFIED: out->mode = limits.default_mode; break;
    default:
      return invalid_argument("attention_mode = {} is not a known AttentionMode",
                              static_cast<int>(g.attention_mode()));
  }
  switch (g.exact_layout()) {
    case v1::EXACT_LAYOUT_UNSPECIFIED: out->exact_layout = ExactLayout::kAuto; break;  // the server's default
    case v1::EXACT_LAYOUT_CONTIGUOUS: out->exact_layout = ExactLayout::kContiguous; break;
    case v1::EXACT_LAYOUT_ZIGZAG: out->exact_layout = ExactLayout::kZigzag; break;
    default:
      return invalid_argument("exact_layout = {} is not a known ExactLayout", static_cast<int>(g.exact_layout()));
  }
  const int size_bound = limits.max_context > 0 ? limits.max_context : INT_MAX;
  if (g.has_block_size()) {
    if (g.block_size() < 1 || g.block_size() > size_bound) {
      return invalid_argument("block_size = {} must be in [1, {}]", g.block_size(), size_bound);
    }
    out->block_size = g.block_size();
  }
  if (g.has_anchor_size()) {
    if (g.anchor_size() < 0 || g.anchor_size() > size_bound) {
      return invalid_argument("anchor_size = {} must be in [0, {}] (0 = no anchor)", g.anchor_size(), size_bound);
    }
    out->anchor_size = g.anchor_size();
  }
  out->return_entropy = g.has_return_attention_entropy() && g.return_attention_entropy();
  out->n = g.has_n() ? g.n() : 1;
  prepared->health = limits.health;
  if (g.has_entropy_overload_ratio()) prepared->health.overload_ratio = g.entropy_overload_ratio();
  if (g.has_entropy_collapse_nats()) prepared->health.collapse_nats = g.entropy_collapse_nats();
  if (g.has_prompt_logprobs()) {
    const int64_t bound = max_prompt_logprob_bytes(n_prompt, g.prompt_logprobs(), limits.max_token_bytes);
    if (limits.max_message_bytes > 0 && bound > limits.max_message_bytes) {
      return invalid_argument("prompt_logprobs = {} for a prompt of {} tokens may need {} bytes; the server's "
                              "max_message_bytes is {} (fewer alternatives or a shorter prompt fit)",
                              g.prompt_logprobs(), n_prompt, bound, limits.max_message_bytes);
    }
    out->prompt_logprobs = g.prompt_logprobs();
  }
  return Status();
}

// Refuses prompt text that cannot fit in max_prompt_tokens, by its size alone (before any tokenizing).
Status check_prompt_bytes(std::string_view what, size_t n_bytes, const RequestLimits& limits) {
  if (limits.max_prompt_bytes <= 0 || n_bytes <= static_cast<uint64_t>(limits.max_prompt_bytes)) return Status();
  return invalid_argument("{} has {} bytes; the server allows at most {} (max_prompt_bytes = max_prompt_tokens {} x "
                          "{} bytes, the longest token: more bytes cannot fit in max_prompt_tokens)",
                          what, n_bytes, limits.max_prompt_bytes, limits.max_prompt_tokens, limits.max_token_bytes);
}

size_t content_bytes(const google::protobuf::RepeatedPtrField<v1::ChatMessage>& messages) {
  size_t n = 0;
  for (const v1::ChatMessage& m : messages) n += m.content().size();
  return n;
}

// A prompt without a split of its own: all of it is the query and the engine picks the context/query cut.
void set_plain_prompt(std::vector<int32_t> all, EngineRequest* out) {
  out->context.clear();
  out->query = std::move(all);
  out->split_prompt = true;
}

// ---- prompt builders, one per input shape ----

// CompleteRequest and StreamCompleteRequest: the `input` oneof and `echo`.
template <typename Req>
Status build_completion_prompt(const Req& r, const Tokenizer& tok, const RequestLimits& limits,
                               PreparedRequest* p) {
  if (!r.context_id().empty()) {
    // A cached context by its id: the input is the query alone (after the context, so no BOS).
    if (r.context_id().size() > 64) return invalid_argument("context_id is {} bytes, at most 64", r.context_id().size());
    if (r.echo()) return invalid_argument("echo needs the prompt's text, which a request with context_id does not send");
    p->engine.context_id = r.context_id();
    switch (r.input_case()) {
      case Req::kPrompt:
        SS_RETURN_IF_ERROR(check_prompt_bytes("prompt", r.prompt().size(), limits));
        p->engine.query = tok.encode(r.prompt(), /*add_special=*/false, /*parse_special=*/false);
        break;
      case Req::kPromptTokenIds:
        for (int i = 0; i < r.prompt_token_ids().ids_size(); ++i) {
          const int32_t id = r.prompt_token_ids().ids(i);
          if (id < 0 || id >= limits.n_vocab) {
            return invalid_argument("prompt_token_ids[{}] = {} must be in [0, {}) (n_vocab)", i, id, limits.n_vocab);
          }
        }
        p->engine.query.assign(r.prompt_token_ids().ids().begin(), r.prompt_token_ids().ids().end());
        break;
      case Req::kSplit:
        if (!r.split().context().empty()) {
          return invalid_argument("split.context and context_id both set: context_id stands for the context");
        }
        SS_RETURN_IF_ERROR(check_prompt_bytes("split.query", r.split().query().size(), limits));
        p->engine.query = tok.encode(r.split().query(), /*add_special=*/false, /*parse_special=*/false);
        break;
      default:
        return invalid_argument("context_id needs the query: set prompt, prompt_token_ids or split.query");
    }
    if (p->engine.query.empty()) return invalid_argument("the query after context_id tokenizes to no tokens");
    return Status();
  }
  switch (r.input_case()) {
    case Req::kPrompt: {
      if (r.prompt().empty()) return invalid_argument("prompt is empty");
      SS_RETURN_IF_ERROR(check_prompt_bytes("prompt", r.prompt().size(), limits));
      set_plain_prompt(tok.encode(r.prompt(), /*add_special=*/true, /*parse_special=*/false), &p->engine);
      if (r.echo()) p->echo_text = r.prompt();
      break;
    }
    case Req::kPromptTokenIds: {
      const auto& ids = r.prompt_token_ids().ids();
      if (ids.empty()) return invalid_argument("prompt_token_ids is empty");
      for (int i = 0; i < ids.size(); ++i) {
        if (ids[i] < 0 || ids[i] >= limits.n_vocab) {
          return invalid_argument("prompt_token_ids[{}] = {} must be in [0, {}) (n_vocab)", i, ids[i], limits.n_vocab);
        }
      }
      std::vector<int32_t> all(ids.begin(), ids.end());
      if (r.echo()) p->echo_text = tok.decode(all);
      set_plain_prompt(std::move(all), &p->engine);
      break;
    }
    case Req::kSplit: {
      const v1::SplitPrompt& s = r.split();
      if (s.query().empty()) return invalid_argument("split.query is empty (the question goes to phase 2)");
      SS_RETURN_IF_ERROR(check_prompt_bytes("split (context + query)", s.context().size() + s.query().size(), limits));
      if (s.context().empty()) {
        p->engine.query = tok.encode(s.query(), /*add_special=*/true, /*parse_special=*/false);
      } else {
        // BOS belongs to the start of the sequence, which is the context.
        p->engine.context = tok.encode(s.context(), /*add_special=*/true, /*parse_special=*/false);
        p->engine.query = tok.encode(s.query(), /*add_special=*/false, /*parse_special=*/false);
      }
      if (r.echo()) p->echo_text = s.context() + s.query();
      break;
    }
    default:
      return invalid_argument("no input: set one of prompt, prompt_token_ids or split");
  }
  if (p->engine.query.empty()) return invalid_argument("the prompt tokenizes to no query tokens");
  return Status();
}

std::string_view trim(std::string_view s) {
  const auto is_space = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; };
  while (!s.empty() && is_space(s.front())) s.remove_prefix(1);
  while (!s.empty() && is_space(s.back())) s.remove_suffix(1);
  return s;
}

Status check_messages(const google::protobuf::RepeatedPtrField<v1::ChatMessage>& messages,
                      const ChatTemplate& tmpl) {
  if (messages.empty()) return invalid_argument("messages is empty");
  // ChatML writes any role; a Jinja template decides itself which roles and orders it takes (its raise_exception
  // becomes INVALID_ARGUMENT with the template's message), as Hugging Face's apply_chat_template does. The native
  // Llama/Mistral/Gemma renderings know system, user and assistant only.
  const bool any_role =
      tmpl.family() == ChatTemplate::Family::kChatml || tmpl.family() == ChatTemplate::Family::kJinja;
  for (int i = 0; i < messages.size(); ++i) {
    const std::string& role = messages[i].role();
    if (role.empty() || role.size() > 32) return invalid_argument("messages[{}].role must have 1 to 32 characters", i);
    for (char c : role) {
      // The role is written into the prompt verbatim; anything else could forge template markers.
      if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-')) {
        return invalid_argument("messages[{}].role = \"{}\" may only hold letters, digits, '_' and '-'", i, role);
      }
    }
    if (!any_role) {
      if (role != "system" && role != "user" && role != "assistant") {
        return invalid_argument("messages[{}].role = \"{}\" must be system, user or assistant for the {} template", i,
                                role, tmpl.name());
      }
      if (role == "system" && i != 0) {
        return invalid_argument("messages[{}]: the {} template takes a system message only first", i, tmpl.name());
      }
    }
  }
  return Status();
}

// Chat prompt -> engine tokens. Without a document: the rendered prompt is a plain prompt (whole in the query,
// split by the engine), as `starserve generate --chat --prompt` does. With a document: it opens the last user
// message, followed by a blank line and the message's own content (the question); the cut is at the end of the
// document, so the question, the end of the turn and the assistant header are the query and get exact attention
// in phase 2 (Star Attention's accuracy depends on the question being in phase 2).
// Control tokens come only from the template; contents (and the document) are tokenized as text
// (model/chat_prompt.h), so a message cannot forge a turn.
Status build_chat_prompt(const google::protobuf::RepeatedPtrField<v1::ChatMessage>& messages,
                         const std::string& document, const Tokenizer& tok, const ChatTemplate& tmpl,
                         const RequestLimits& limits, EngineRequest* out, std::string* rendered_out) {
  SS_RETURN_IF_ERROR(check_messages(messages, tmpl));
  SS_RETURN_IF_ERROR(check_prompt_bytes("the messages' contents + context", content_bytes(messages) + document.size(),
                                        limits));
  std::vector<ChatMessage> msgs;
  msgs.reserve(static_cast<size_t>(messages.size()));
  for (const v1::ChatMessage& m : messages) msgs.push_back({m.role(), m.content()});

  std::string doc_text, question_text;
  int last_user = -1;
  if (!document.empty()) {
    for (int i = 0; i < messages.size(); ++i) {
      if (messages[i].role() == "user") last_user = i;
    }
    if (last_user < 0) return invalid_argument("context needs a user message to attach to; messages has none");
    // Outer whitespace is dropped so that templates that trim message content (llama3, gemma, llama2) keep the
    // document intact and it can be found again in the rendered text.
    doc_text = std::string(trim(document));
    question_text = std::string(trim(messages[last_user].content()));
    if (doc_text.empty()) return invalid_argument("context is only whitespace");
    if (question_text.empty()) {
      return invalid_argument("messages[{}].content (the question asked about context) is empty", last_user);
    }
    msgs[static_cast<size_t>(last_user)].content = doc_text + "\n\n" + question_text;
  }
  SS_ASSIGN_OR_RETURN(ChatPrompt prompt, render_chat_prompt(tmpl, msgs, tok));
  if (rendered_out) *rendered_out = prompt.text;
  if (last_user >= 0) {
    const auto [begin, end] = prompt.contents[static_cast<size_t>(last_user)];
    if (begin != ChatPrompt::kNotWritten &&
        std::string_view(prompt.text).substr(begin, end - begin) == msgs[static_cast<size_t>(last_user)].content) {
      const size_t cut = begin + doc_text.size();
      out->context = prompt.encode(tok, 0, cut);
      out->query = prompt.encode(tok, cut, prompt.text.size());
      return Status();
    }
    log_warn("chat template {} changed the document text; the engine splits the prompt by the query-tail rule",
             tmpl.name());
  }
  set_plain_prompt(prompt.encode(tok), out);
  return Status();
}

// ChatCompleteRequest and StreamChatCompleteRequest: messages and the optional document.
template <typename Req>
Status build_chat_request_prompt(const Req& r, const Tokenizer& tok, const ChatTemplate& tmpl,
                                 const RequestLimits& limits, PreparedRequest* p) {
  SS_RETURN_IF_ERROR(build_chat_prompt(r.messages(), r.context(), tok, tmpl, limits, &p->engine, nullptr));
  if (p->engine.query.empty()) return invalid_argument("the conversation renders to no query tokens");
  return Status();
}

template <typename Req>
constexpr bool kIsChatRequest =
    std::is_same_v<Req, v1::ChatCompleteRequest> || std::is_same_v<Req, v1::StreamChatCompleteRequest>;

}  // namespace

template <typename Request>
Result<PreparedRequest> prepare_request(const Request& r, const Tokenizer& tok, const ChatTemplate* tmpl,
                                        const RequestLimits& limits) {
  SS_RETURN_IF_ERROR(check_model(r.model(), limits));
  SS_RETURN_IF_ERROR(check_params(r.params(), limits));
  PreparedRequest p;
  int64_t default_max_tokens = 0;
  if constexpr (kIsChatRequest<Request>) {
    SS_CHECK(tmpl != nullptr, "chat requests need a chat template (the service answers FAILED_PRECONDITION)");
    SS_RETURN_IF_ERROR(build_chat_request_prompt(r, tok, *tmpl, limits, &p));
  } else {
    SS_RETURN_IF_ERROR(build_completion_prompt(r, tok, limits, &p));
  }
  const int64_t n_prompt = static_cast<int64_t>(p.engine.context.size() + p.engine.query.size());
  if constexpr (kIsChatRequest<Request>) {
    // Chat default (as OpenAI and vLLM): as much as the context leaves, capped by the server's limit.
    default_max_tokens = limits.max_tokens_limit;
    if (limits.max_context > 0) default_max_tokens = std::min<int64_t>(default_max_tokens, limits.max_context - n_prompt);
  } else {
    // OpenAI's completions default.
    constexpr int kDefaultCompletionMaxTokens = 16;
    default_max_tokens = std::min(kDefaultCompletionMaxTokens, limits.max_tokens_limit);
  }
  SS_RETURN_IF_ERROR(apply_params(r.params(), n_prompt, static_cast<int>(std::max<int64_t>(default_max_tokens, 0)),
                                  limits, &p));
  return p;
}

template Result<PreparedRequest> prepare_request(const v1::CompleteRequest&, const Tokenizer&, const ChatTemplate*,
                                                 const RequestLimits&);
template Result<PreparedRequest> prepare_request(const v1::StreamCompleteRequest&, const Tokenizer&,
                                                 const ChatTemplate*, const RequestLimits&);
template Result<PreparedRequest> prepare_request(const v1::ChatCompleteRequest&, const Tokenizer&,
                                                 const ChatTemplate*, const RequestLimits&);
template Result<PreparedRequest> prepare_request(const v1::StreamChatCompleteRequest&, const Tokenizer&,
                                                 const ChatTemplate*, const RequestLimits&);

RequestLimits make_request_limits(const ServerConfig& config, const EngineInfo& info, const Tokenizer& tokenizer,
                                  int max_token_bytes) {
  RequestLimits l;
  l.model_name = info.model_name;
  l.max_context = info.max_context;
  l.max_prompt_tokens = config.max_prompt_tokens > 0 ? config.max_prompt_tokens : info.max_context;
  if (info.max_context > 0 && l.max_prompt_tokens > 0) l.max_prompt_tokens = std::min(l.max_prompt_tokens, info.max_context);
  l.max_token_bytes = std::max(1, max_token_bytes);
  l.max_message_bytes = config.max_message_bytes;
  if (l.max_prompt_tokens > 0) l.max_prompt_bytes = int64_t{l.max_prompt_tokens} * l.max_token_bytes;
  l.max_tokens_limit = std::min(config.max_tokens_limit, kMaxMaxTokens);
  l.max_stop_strings = std::min(config.max_stop_strings, kMaxStopStrings);
  l.max_stop_string_bytes = std::min(config.max_stop_string_bytes, kMaxStopStringBytes);
  // The model's output layer may be padded past the tokenizer's vocabulary; ids must be valid for both.
  l.n_vocab = info.n_vocab > 0 ? std::min(info.n_vocab, tokenizer.n_vocab()) : tokenizer.n_vocab();
  l.default_mode = info.star_defaults.mode;
  l.health.overload_ratio = config.entropy_overload_ratio;
  l.health.collapse_nats = config.entropy_collapse_nats;
  return l;
}

int longest_token_bytes(const Tokenizer& tokenizer) {
  size_t longest = 1;
  for (int32_t id = 0; id < tokenizer.n_vocab(); ++id) longest = std::max(longest, tokenizer.token_to_bytes(id).size());
  return static_cast<int>(std::min<size_t>(longest, INT_MAX));
}

Result<v1::TokenizeResponse> tokenize(const v1::TokenizeRequest& request, const Tokenizer& tokenizer,
                                      const ChatTemplate* chat_template, const RequestLimits& limits) {
  v1::TokenizeResponse resp;
  std::vector<int32_t> ids;
  switch (request.input_case()) {
    case v1::TokenizeRequest::kPrompt: {
      // A text over the byte bound could never be a prompt here; the server does not spend time tokenizing it.
      SS_RETURN_IF_ERROR(check_prompt_bytes("prompt", request.prompt().size(), limits));
      const bool add_special = !request.has_add_special_tokens() || request.add_special_tokens();
      ids = tokenizer.encode(request.prompt(), add_special, /*parse_special=*/false);
      break;
    }
    case v1::TokenizeRequest::kChat: {
      if (chat_template == nullptr) {
        return unimplemented("this model has no chat template; start the server with a built-in one ({})",
                             fmt::join(ChatTemplate::builtin_names(), ", "));
      }
      std::string rendered;
      EngineRequest prompt;
      SS_RETURN_IF_ERROR(build_chat_prompt(request.chat().messages(), std::string(), tokenizer, *chat_template,
                                           limits, &prompt, &rendered));
      ids = std::move(prompt.context);
      ids.insert(ids.end(), prompt.query.begin(), prompt.query.end());
      resp.set_rendered(rendered);
      break;
    }
    default:
      return invalid_argument("no input: set prompt or chat");
  }
  for (int32_t id : ids) resp.add_token_ids(id);
  resp.set_count(resp.token_ids_size());
  resp.set_max_model_len(limits.max_context);
  if (request.return_token_strings()) {
    for (int32_t id : resp.token_ids()) {
      std::string text;
      append_utf8_lossy(tokenizer.token_to_bytes(id), text);
      resp.add_tokens(std::move(text));
    }
  }
  return resp;
}

v1::FinishReason to_proto(FinishReason reason) {
  switch (reason) {
    case FinishReason::kStop: return v1::FINISH_REASON_STOP;
    case FinishReason::kLength: return v1::FINISH_REASON_LENGTH;
    case FinishReason::kCancelled: return v1::FINISH_REASON_CANCELLED;
    case FinishReason::kError: return v1::FINISH_REASON_ERROR;
    case FinishReason::kUnspecified: break;
  }
  return v1::FINISH_REASON_UNSPECIFIED;
}

v1::AttentionMode to_proto(AttentionMode mode) {
  switch (mode) {
    case AttentionMode::kGlobal: return v1::ATTENTION_MODE_GLOBAL;
    case AttentionMode::kExact: return v1::ATTENTION_MODE_EXACT;
    case AttentionMode::kStar: return v1::ATTENTION_MODE_STAR;
  }
  return v1::ATTENTION_MODE_UNSPECIFIED;
}

v1::ExactLayout to_proto(ExactLayout layout) {
  switch (layout) {
    case ExactLayout::kAuto: return v1::EXACT_LAYOUT_UNSPECIFIED;  // "auto": the model decides (common/config.h)
    case ExactLayout::kContiguous: return v1::EXACT_LAYOUT_CONTIGUOUS;
    case ExactLayout::kZigzag: return v1::EXACT_LAYOUT_ZIGZAG;
  }
  return v1::EXACT_LAYOUT_UNSPECIFIED;
}

void fill_usage(const EngineUsage& usage, v1::Usage* out) {
  const int64_t prompt = usage.context_tokens + usage.query_tokens;
  out->set_prompt_tokens(static_cast<int32_t>(prompt));
  out->set_completion_tokens(static_cast<int32_t>(usage.completion_tokens));
  out->set_total_tokens(static_cast<int32_t>(prompt + usage.completion_tokens));
  out->set_context_tokens(static_cast<int32_t>(usage.context_tokens));
  out->set_query_tokens(static_cast<int32_t>(usage.query_tokens));
  out->set_cached_context_tokens(static_cast<int32_t>(usage.cached_context_tokens));
}

void fill_timing(const EngineTiming& timing, double total_ms, v1::Timing* out) {
  out->set_queue_ms(timing.queue_ms);
  out->set_phase1_ms(timing.phase1_ms);
  out->set_time_to_first_token_ms(timing.time_to_first_token_ms);
  out->set_tokens_per_second(timing.tokens_per_second);
  out->set_total_ms(total_ms);
}

void fill_health(const AttentionHealth& health, v1::AttentionHealth* out) {
  out->set_overload_ratio(health.thresholds.overload_ratio);
  out->set_collapse_nats(health.thresholds.collapse_nats);
  out->set_n_heads_judged(health.n_judged);
  out->set_overload_fraction(health.overload_fraction());
  out->set_collapse_fraction(health.collapse_fraction());
  if (health.rank_ratio) out->set_rank_entropy_ratio(*health.rank_ratio);
  for (const HeadRef& h : health.overloaded) {
    v1::HeadIndex* i = out->add_overloaded();
    i->set_layer(h.layer);
    i->set_head(h.head);
  }
  for (const HeadRef& h : health.collapsed) {
    v1::HeadIndex* i = out->add_collapsed();
    i->set_layer(h.layer);
    i->set_head(h.head);
  }
}

void fill_entropy(const EntropyStats& entropy, const AttentionHealth* health, v1::AttentionEntropy* out) {
  if (health) fill_health(*health, out->mutable_health());
  out->set_n_layers(entropy.n_layers);
  out->set_n_heads(entropy.n_heads);
  for (int l = 0; l < entropy.n_layers; ++l) {
    v1::LayerEntropy* layer = out->add_layers();
    layer->set_mean(static_cast<float>(entropy.layer_mean(l)));
    for (int h = 0; h < entropy.n_heads; ++h) {
      layer->add_head_mean(static_cast<float>(entropy.mean(l, h)));
      layer->add_head_max(static_cast<float>(entropy.mean_max(l, h)));
    }
    if (entropy.has_rank_entropy()) {
      layer->set_rank_mean(static_cast<float>(entropy.rank_layer_mean(l)));
      for (int h = 0; h < entropy.n_heads; ++h) layer->add_head_rank_mean(static_cast<float>(entropy.rank_mean(l, h)));
    }
  }
  out->set_n_ranks(entropy.has_rank_entropy() ? entropy.n_ranks : 1);
}

namespace {
void fill_logprob_entry(const TokenLogprobs& logprobs, const Tokenizer& tokenizer, v1::LogprobEntry* e) {
  // Proto strings must be valid UTF-8 and a token may hold part of a character: `token` is the lossy text,
  // `bytes` the exact bytes.
  const auto fill = [&tokenizer](int32_t id, auto* entry) {
    const std::string bytes = tokenizer.token_to_bytes(id);
    std::string text;
    append_utf8_lossy(bytes, text);
    entry->set_token_id(id);
    entry->set_token(std::move(text));
    entry->set_bytes(bytes);
  };
  fill(logprobs.token, e);
  e->set_logprob(logprobs.logprob);
  for (const TokenLogprob& t : logprobs.top) {
    v1::TopLogprob* top = e->add_top_logprobs();
    fill(t.token, top);
    top->set_logprob(t.logprob);
  }
}
}  // namespace

void append_logprobs(const TokenLogprobs& logprobs, const Tokenizer& tokenizer, v1::Logprobs* out) {
  fill_logprob_entry(logprobs, tokenizer, out->add_content());
}

void fill_prompt_logprobs(const std::vector<TokenLogprobs>& logprobs, const Tokenizer& tokenizer,
                          v1::PromptLogprobs* out) {
  out->mutable_content()->Reserve(static_cast<int>(logprobs.size()));
  for (const TokenLogprobs& lp : logprobs) fill_logprob_entry(lp, tokenizer, out->add_content());
}

int64_t max_prompt_logprob_bytes(int64_t n_prompt, int top_n, int max_token_bytes) {
  // One value: token_id (1 + 5), token (1 + 3 + 3 L), bytes (1 + 3 + L), logprob (1 + 4), its message header
  // (1 + 3): 22 + 4 L bytes for token lengths L below 2^21.
  const int64_t value = 22 + 4 * static_cast<int64_t>(std::max(max_token_bytes, 1));
  return std::max<int64_t>(n_prompt - 1, 0) * (top_n + 1) * value;
}

grpc::Status to_grpc_status(const Status& status) {
  grpc::StatusCode code = grpc::StatusCode::UNKNOWN;
  switch (status.code()) {
    case StatusCode::kOk: return grpc::Status::OK;
    case StatusCode::kInvalidArgument: code = grpc::StatusCode::INVALID_ARGUMENT; break;
    case StatusCode::kNotFound: code = grpc::StatusCode::NOT_FOUND; break;
    case StatusCode::kDataLoss: code = grpc::StatusCode::DATA_LOSS; break;
    case StatusCode::kOutOfRange: code = grpc::StatusCode::OUT_OF_RANGE; break;
    case StatusCode::kResourceExhausted: code = grpc::StatusCode::RESOURCE_EXHAUSTED; break;
    case StatusCode::kUnavailable: code = grpc::StatusCode::UNAVAILABLE; break;
    case StatusCode::kCancelled: code = grpc::StatusCode::CANCELLED; break;
    case StatusCode::kDeadlineExceeded: code = grpc::StatusCode::DEADLINE_EXCEEDED; break;
    case StatusCode::kUnauthenticated: code = grpc::StatusCode::UNAUTHENTICATED; break;
    case StatusCode::kUnimplemented: code = grpc::StatusCode::UNIMPLEMENTED; break;
    case StatusCode::kInternal: code = grpc::StatusCode::INTERNAL; break;
  }
  return grpc::Status(code, status.message());
}

std::string_view grpc_code_name(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK: return "OK";
    case grpc::StatusCode::CANCELLED: return "CANCELLED";
    case grpc::StatusCode::UNKNOWN: return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT: return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED: return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND: return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS: return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED: return "PERMISSION_DENIED";
    case grpc::StatusCode::UNAUTHENTICATED: return "UNAUTHENTICATED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION: return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED: return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE: return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED: return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL: return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE: return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS: return "DATA_LOSS";
    default: break;
  }
  return "UNKNOWN";
}

}  // namespace starserve
