#include "server/openai_http.h"

#include <sys/socket.h>

#include <algorithm>
#include <csignal>
#include <cmath>
#include <condition_variable>
#include <ctime>
#include <map>
#include <mutex>
#include <random>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <httplib.h>
#include <nlohmann/json.hpp>

#include "common/check.h"
#include "common/log.h"
#include "server/convert.h"
#include "starserve/v1/completion.pb.h"

namespace starserve {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

struct OpenAiHttpServer::Attached {
  Engine& engine;
  const Tokenizer tokenizer;  // copies share the immutable tables
  const std::optional<ChatTemplate> chat_template;
  int max_token_bytes;  // longest_token_bytes(tokenizer), for the prompt byte bound
};

namespace {

// How often a waiting worker looks at the shutdown flag (as CompletionService's kCancelPollInterval).
constexpr std::chrono::milliseconds kPollInterval{50};
constexpr int kIoTimeoutS = 30;     // a request body must keep arriving, a stream's reader must keep reading
constexpr int kKeepAliveS = 5;      // an idle keep-alive connection is closed after this (it holds a worker)
constexpr char kJson[] = "application/json";
// Exactly this type: httplib compresses text/* bodies for clients that accept gzip, except text/event-stream,
// and a compressed stream would hold tokens back.
constexpr char kEventStream[] = "text/event-stream";

int64_t unix_seconds() { return static_cast<int64_t>(std::time(nullptr)); }
double seconds_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// Every text the server writes: token text may end in part of a UTF-8 character, which JSON cannot carry.
std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

// ---------------------------------------------------------------------------------------------------------------
// Errors in OpenAI's shape

struct ApiError {
  int http = 500;
  std::string type, message, param, code;
};

ApiError bad_request(std::string message, std::string param = {}) {
  return {400, "invalid_request_error", std::move(message), std::move(param), {}};
}

// A validation message names its field first ("max_tokens = 0 must be ...", "stop[1] is empty"): that is the param.
std::string param_of(const std::string& message) {
  size_t n = 0;
  while (n < message.size() && (std::islower(static_cast<unsigned char>(message[n])) || message[n] == '_')) ++n;
  if (n == 0 || n == message.size()) return {};
  const std::string_view rest = std::string_view(message).substr(n);
  for (std::string_view follow : {" = ", "[", " is ", " has ", " must "}) {
    if (rest.substr(0, follow.size()) == follow) {
      std::string field = message.substr(0, n);
      if (field == "split" || field == "the") return {};
      if (field == "prompt_token_ids") return "prompt";
      return field;
    }
  }
  return {};
}

ApiError from_status(const Status& s) {
  ApiError e;
  e.message = s.message();
  switch (s.code()) {
    case StatusCode::kInvalidArgument:
    case StatusCode::kOutOfRange:
      e.http = 400, e.type = "invalid_request_error", e.param = param_of(s.message());
      break;
    case StatusCode::kNotFound:
      e.http = 404, e.type = "invalid_request_error";
      if (e.message.rfind("context_id", 0) == 0) {
        e.code = "context_not_found", e.param = "context_id";
      } else {
        e.code = "model_not_found";
      }
      break;
    case StatusCode::kUnauthenticated: e.http = 401, e.type = "authentication_error", e.code = "invalid_api_key"; break;
    case StatusCode::kResourceExhausted:
      e.http = 429, e.type = "rate_limit_error", e.code = "resource_exhausted";
      break;
    case StatusCode::kUnavailable: e.http = 503, e.type = "service_unavailable"; break;
    case StatusCode::kDeadlineExceeded: e.http = 504, e.type = "timeout"; break;
    case StatusCode::kUnimplemented: e.http = 501, e.type = "not_implemented"; break;
    default: e.http = 500, e.type = "server_error"; break;
  }
  return e;
}

json error_json(const ApiError& e) {
  return {{"error",
           {{"message", e.message},
            {"type", e.type},
            {"param", e.param.empty() ? json(nullptr) : json(e.param)},
            {"code", e.code.empty() ? json(nullptr) : json(e.code)}}}};
}

void send_error(httplib::Response& res, const ApiError& e) {
  res.status = e.http;
  res.set_content(dump(error_json(e)), kJson);
}

// The gRPC code name of a status, for starserve_requests_total{status}.
std::string_view code_name(const Status& s) { return grpc_code_name(to_grpc_status(s).error_code()); }
std::string_view code_name_of_http(int http) {
  switch (http) {
    case 200: return "OK";
    case 400: case 413: return "INVALID_ARGUMENT";
    case 401: return "UNAUTHENTICATED";
    case 404: return "NOT_FOUND";
    case 429: return "RESOURCE_EXHAUSTED";
    case 501: return "UNIMPLEMENTED";
    case 503: return "UNAVAILABLE";
    case 504: return "DEADLINE_EXCEEDED";
    default: return "INTERNAL";
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Request body -> the gRPC request message (the edge: types checked here, values by prepare_request)

// A field read from the body; null counts as absent (clients send `"stop": null`).
const json* field(const json& body, const char* name) {
  auto it = body.find(name);
  if (it == body.end() || it->is_null()) return nullptr;
  return &*it;
}

Status type_error(const char* name, const char* what) { return invalid_argument("{} must be {}", name, what); }

Status get_int(const json& body, const char* name, std::optional<int64_t>* out) {
  const json* v = field(body, name);
  if (!v) return Status();
  if (v->is_number_integer()) {
    *out = v->get<int64_t>();
  } else if (v->is_number_float() && std::floor(v->get<double>()) == v->get<double>() &&
             std::fabs(v->get<double>()) < 9.0e15) {
    *out = static_cast<int64_t>(v->get<double>());
  } else {
    return type_error(name, "an integer");
  }
  return Status();
}

// An int32 field of GenerationParams; the range is prepare_request's to check, beyond int32 is refused here.
template <typename Setter>
Status set_int32(const json& body, const char* name, Setter set) {
  std::optional<int64_t> v;
  SS_RETURN_IF_ERROR(get_int(body, name, &v));
  if (!v) return Status();
  if (*v < INT32_MIN || *v > INT32_MAX) return invalid_argument("{} = {} is out of range", name, *v);
  set(static_cast<int32_t>(*v));
  return Status();
}

template <typename Setter>
Status set_float(const json& body, const char* name, Setter set) {
  const json* v = field(body, name);
  if (!v) return Status();
  if (!v->is_number()) return type_error(name, "a number");
  set(v->get<float>());
  return Status();
}

template <typename Setter>
Status set_double(const json& body, const char* name, Setter set) {
  const json* v = field(body, name);
  if (!v) return Status();
  if (!v->is_number()) return type_error(name, "a number");
  set(v->get<double>());
  return Status();
}

template <typename Setter>
Status set_bool(const json& body, const char* name, Setter set) {
  const json* v = field(body, name);
  if (!v) return Status();
  if (!v->is_boolean()) return type_error(name, "true or false");
  set(v->get<bool>());
  return Status();
}

Status get_string(const json& body, const char* name, std::string* out) {
  const json* v = field(body, name);
  if (!v) return Status();
  if (!v->is_string()) return type_error(name, "a string");
  *out = v->get<std::string>();
  return Status();
}

// What the response needs to know about the request besides the gRPC message.
struct Options {
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage: a last chunk with usage and no choices
  bool logprobs = false;       // the choices carry logprobs
};

// OpenAI fields this server cannot honour are refused rather than ignored.
Status refuse_unsupported(const json& body, bool chat) {
  if (const json* v = field(body, "best_of"); v && !(v->is_number_integer() && v->get<int64_t>() == 1)) {
    return invalid_argument("best_of must be 1 (one choice per request)");
  }
  if (const json* v = field(body, "logit_bias"); v && !(v->is_object() && v->empty())) {
    return invalid_argument("logit_bias is not supported");
  }
  if (const json* v = field(body, "suffix"); v && !(v->is_string() && v->get<std::string>().empty())) {
    return invalid_argument("suffix is not supported");
  }
  if (chat) {
    for (const char* name : {"tools", "functions"}) {
      if (const json* v = field(body, name); v && !(v->is_array() && v->empty())) {
        return invalid_argument("{} is not supported (no tool calling)", name);
      }
    }
    if (const json* v = field(body, "response_format")) {
      const json* type = v->is_object() ? field(*v, "type") : nullptr;
      if (!type || *type != "text") {
        return invalid_argument("response_format: only {{\"type\": \"text\"}} is supported");
      }
    }
  }
  return Status();
}

// The sampling and Star fields shared by both endpoints -> GenerationParams.
Status parse_params(const json& body, bool chat, v1::GenerationParams* g, Options* o) {
  SS_RETURN_IF_ERROR(set_int32(body, "max_tokens", [g](int32_t v) { g->set_max_tokens(v); }));
  if (chat) {
    SS_RETURN_IF_ERROR(set_int32(body, "max_completion_tokens", [g](int32_t v) { g->set_max_tokens(v); }));
  }
  SS_RETURN_IF_ERROR(set_float(body, "temperature", [g](float v) { g->set_temperature(v); }));
  SS_RETURN_IF_ERROR(set_float(body, "top_p", [g](float v) { g->set_top_p(v); }));
  SS_RETURN_IF_ERROR(set_int32(body, "top_k", [g](int32_t v) { g->set_top_k(v); }));
  SS_RETURN_IF_ERROR(set_float(body, "min_p", [g](float v) { g->set_min_p(v); }));
  SS_RETURN_IF_ERROR(set_float(body, "repetition_penalty", [g](float v) { g->set_repetition_penalty(v); }));
  SS_RETURN_IF_ERROR(set_float(body, "frequency_penalty", [g](float v) { g->set_frequency_penalty(v); }));
  SS_RETURN_IF_ERROR(set_float(body, "presence_penalty", [g](float v) { g->set_presence_penalty(v); }));
  std::optional<int64_t> seed;
  SS_RETURN_IF_ERROR(get_int(body, "seed", &seed));
  if (seed) g->set_seed(static_cast<uint64_t>(*seed));  // OpenAI's seeds are signed 64-bit; the bits are the seed
  if (const json* stop = field(body, "stop")) {
    if (stop->is_string()) {
      g->add_stop(stop->get<std::string>());
    } else if (stop->is_array()) {
      for (const json& s : *stop) {
        if (!s.is_string()) return type_error("stop", "a string or an array of strings");
        g->add_stop(s.get<std::string>());
      }
    } else {
      return type_error("stop", "a string or an array of strings");
    }
  }
  if (const json* ids = field(body, "stop_token_ids")) {
    if (!ids->is_array()) return type_error("stop_token_ids", "an array of token ids");
    for (const json& id : *ids) {
      if (!id.is_number_integer() || id.get<int64_t>() < INT32_MIN || id.get<int64_t>() > INT32_MAX) {
        return type_error("stop_token_ids", "an array of token ids");
      }
      g->add_stop_token_ids(id.get<int32_t>());
    }
  }
  SS_RETURN_IF_ERROR(set_bool(body, "ignore_eos", [g](bool v) { g->set_ignore_eos(v); }));
  SS_RETURN_IF_ERROR(set_int32(body, "n", [g](int32_t v) { g->set_n(v); }));
  if (chat) {
    // Chat: `logprobs` switches them on, `top_logprobs` is the number of alternatives.
    bool want = false;
    SS_RETURN_IF_ERROR(set_bool(body, "logprobs", [&want](bool v) { want = v; }));
    std::optional<int64_t> top;
    SS_RETURN_IF_ERROR(get_int(body, "top_logprobs", &top));
    if (top && !want) return invalid_argument("top_logprobs needs logprobs = true");
    if (want) {
      if (top && (*top < 0 || *top > kMaxLogprobs)) {
        return invalid_argument("top_logprobs = {} must be in [0, {}]", *top, kMaxLogprobs);
      }
      g->set_logprobs(static_cast<int32_t>(top.value_or(0)));
      o->logprobs = true;
    }
  } else {
    SS_RETURN_IF_ERROR(set_int32(body, "logprobs", [g, o](int32_t v) {
      g->set_logprobs(v);
      o->logprobs = true;
    }));
  }
  if (const json* mode = field(body, "attention_mode")) {
    static const std::map<std::string, v1::AttentionMode> kModes = {
        {"global", v1::ATTENTION_MODE_GLOBAL}, {"exact", v1::ATTENTION_MODE_EXACT}, {"star", v1::ATTENTION_MODE_STAR}};
    auto it = mode->is_string() ? kModes.find(mode->get<std::string>()) : kModes.end();
    if (it == kModes.end()) return type_error("attention_mode", "one of \"global\", \"exact\", \"star\"");
    g->set_attention_mode(it->second);
  }
  if (const json* layout = field(body, "exact_layout")) {
    static const std::map<std::string, v1::ExactLayout> kLayouts = {{"contiguous", v1::EXACT_LAYOUT_CONTIGUOUS},
                                                                    {"zigzag", v1::EXACT_LAYOUT_ZIGZAG}};
    auto it = layout->is_string() ? kLayouts.find(layout->get<std::string>()) : kLayouts.end();
    if (it == kLayouts.end()) return type_error("exact_layout", "one of \"contiguous\", \"zigzag\"");
    g->set_exact_layout(it->second);
  }
  SS_RETURN_IF_ERROR(set_int32(body, "block_size", [g](int32_t v) { g->set_block_size(v); }));
  SS_RETURN_IF_ERROR(set_int32(body, "anchor_size", [g](int32_t v) { g->set_anchor_size(v); }));
  SS_RETURN_IF_ERROR(
      set_bool(body, "return_attention_entropy", [g](bool v) { g->set_return_attention_entropy(v); }));
  SS_RETURN_IF_ERROR(
      set_double(body, "entropy_overload_ratio", [g](double v) { g->set_entropy_overload_ratio(v); }));
  SS_RETURN_IF_ERROR(set_double(body, "entropy_collapse_nats", [g](double v) { g->set_entropy_collapse_nats(v); }));
  SS_RETURN_IF_ERROR(set_int32(body, "prompt_logprobs", [g](int32_t v) { g->set_prompt_logprobs(v); }));

  SS_RETURN_IF_ERROR(set_bool(body, "stream", [o](bool v) { o->stream = v; }));
  if (const json* so = field(body, "stream_options")) {
    if (!so->is_object()) return type_error("stream_options", "an object");
    if (!o->stream) return invalid_argument("stream_options needs stream = true");
    SS_RETURN_IF_ERROR(set_bool(*so, "include_usage", [o](bool v) { o->include_usage = v; }));
  }
  return Status();
}

// /v1/completions: prompt (a string, an array of one string, token ids, or an array of one array of ids), echo,
// and the extensions `context` (the prompt is then the query of a split) and `context_id` (a cached context named by
// an earlier response's context_id; the prompt is then the query).
Status parse_completion(const json& body, v1::CompleteRequest* r, Options* o) {
  SS_RETURN_IF_ERROR(refuse_unsupported(body, false));
  std::string model, context, context_id;
  SS_RETURN_IF_ERROR(get_string(body, "model", &model));
  r->set_model(model);
  SS_RETURN_IF_ERROR(get_string(body, "context", &context));
  SS_RETURN_IF_ERROR(get_string(body, "context_id", &context_id));
  if (!context_id.empty() && !context.empty()) {
    return invalid_argument("context_id and context both set: context_id stands for the context");
  }
  r->set_context_id(context_id);
  const json* prompt = field(body, "prompt");
  if (!prompt) return invalid_argument("prompt is required");
  const json* p = prompt;
  if (p->is_array() && p->size() == 1 && ((*p)[0].is_string() || (*p)[0].is_array())) p = &(*p)[0];
  if (p->is_string()) {
    if (context.empty()) {
      r->set_prompt(p->get<std::string>());
    } else {
      r->mutable_split()->set_context(context);
      r->mutable_split()->set_query(p->get<std::string>());
    }
  } else if (p->is_array() && !p->empty() && std::all_of(p->begin(), p->end(), [](const json& x) {
               return x.is_number_integer() && x.get<int64_t>() >= INT32_MIN && x.get<int64_t>() <= INT32_MAX;
             })) {
    if (!context.empty()) return invalid_argument("context needs a text prompt (the query), not token ids");
    for (const json& id : *p) r->mutable_prompt_token_ids()->add_ids(id.get<int32_t>());
  } else if (p->is_array() && p->empty()) {
    return invalid_argument("prompt is empty");
  } else if (prompt->is_array() && prompt->size() > 1) {
    return invalid_argument("prompt holds {} prompts; one prompt per request is supported", prompt->size());
  } else {
    return type_error("prompt", "a string or an array of token ids");
  }
  SS_RETURN_IF_ERROR(set_bool(body, "echo", [r](bool v) { r->set_echo(v); }));
  return parse_params(body, false, r->mutable_params(), o);
}

// /v1/chat/completions: messages (content a string or an array of text parts) and the `context` extension.
Status parse_chat(const json& body, v1::ChatCompleteRequest* r, Options* o) {
  SS_RETURN_IF_ERROR(refuse_unsupported(body, true));
  std::string model, context;
  SS_RETURN_IF_ERROR(get_string(body, "model", &model));
  r->set_model(model);
  SS_RETURN_IF_ERROR(get_string(body, "context", &context));
  r->set_context(context);
  const json* messages = field(body, "messages");
  if (!messages || !messages->is_array() || messages->empty()) {
    return invalid_argument("messages must be a non-empty array of {{\"role\", \"content\"}}");
  }
  for (size_t i = 0; i < messages->size(); ++i) {
    const json& m = (*messages)[i];
    const std::string name = fmt::format("messages[{}]", i);
    if (!m.is_object()) return invalid_argument("{} must be an object with role and content", name);
    v1::ChatMessage* out = r->add_messages();
    const json* role = field(m, "role");
    if (!role || !role->is_string()) return invalid_argument("{}.role must be a string", name);
    out->set_role(role->get<std::string>());
    const json* content = field(m, "content");
    if (!content) continue;  // an assistant turn without text
    if (content->is_string()) {
      out->set_content(content->get<std::string>());
    } else if (content->is_array()) {
      std::string text;
      for (const json& part : *content) {
        const json* type = part.is_object() ? field(part, "type") : nullptr;
        const json* t = part.is_object() ? field(part, "text") : nullptr;
        if (!type || *type != "text" || !t || !t->is_string()) {
          return invalid_argument("{}.content: only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported",
                                  name);
        }
        text += t->get<std::string>();
      }
      out->set_content(std::move(text));
    } else {
      return invalid_argument("{}.content must be a string or an array of text parts", name);
    }
  }
  return parse_params(body, true, r->mutable_params(), o);
}

// ---------------------------------------------------------------------------------------------------------------
// Engine results -> OpenAI's JSON

std::string lossy(const std::string& bytes) {
  std::string text;
  append_utf8_lossy(bytes, text);
  return text;
}

json bytes_array(const std::string& bytes) {
  json a = json::array();
  for (unsigned char c : bytes) a.push_back(static_cast<int>(c));
  return a;
}

// Chat's logprob entry (also used for prompt_logprobs): token, logprob, bytes, top_logprobs, and the token id.
json chat_logprob_entry(const TokenLogprobs& lp, const Tokenizer& tok) {
  const std::string bytes = tok.token_to_bytes(lp.token);
  json top = json::array();
  for (const TokenLogprob& t : lp.top) {
    const std::string b = tok.token_to_bytes(t.token);
    top.push_back({{"token", lossy(b)}, {"logprob", t.logprob}, {"bytes", bytes_array(b)}, {"token_id", t.token}});
  }
  return {{"token", lossy(bytes)},
          {"logprob", lp.logprob},
          {"bytes", bytes_array(bytes)},
          {"top_logprobs", std::move(top)},
          {"token_id", lp.token}};
}

// The text, token ids and logprobs of a run of token events, in either endpoint's logprobs shape.
struct ChoiceDelta {
  std::string text;
  json token_ids = json::array();
  // Completions: {tokens, token_logprobs, top_logprobs, text_offset}; chat: {content: [...]}.
  json logprobs;
};

// text_offset: the completion text's length so far (echo included), advanced here.
ChoiceDelta make_delta(const std::vector<EngineEvent>& events, const Tokenizer& tok, bool chat, bool with_logprobs,
                       size_t* text_offset) {
  ChoiceDelta d;
  if (with_logprobs) {
    d.logprobs = chat ? json{{"content", json::array()}}
                      : json{{"tokens", json::array()},
                             {"token_logprobs", json::array()},
                             {"top_logprobs", json::array()},
                             {"text_offset", json::array()}};
  }
  for (const EngineEvent& e : events) {
    if (e.token.token >= 0) {
      d.token_ids.push_back(e.token.token);
      if (with_logprobs && e.token.logprobs) {
        const TokenLogprobs& lp = *e.token.logprobs;
        if (chat) {
          d.logprobs["content"].push_back(chat_logprob_entry(lp, tok));
        } else {
          json top = json::object();
          for (const TokenLogprob& t : lp.top) top[lossy(tok.token_to_bytes(t.token))] = t.logprob;
          d.logprobs["tokens"].push_back(lossy(tok.token_to_bytes(lp.token)));
          d.logprobs["token_logprobs"].push_back(lp.logprob);
          d.logprobs["top_logprobs"].push_back(std::move(top));
          d.logprobs["text_offset"].push_back(*text_offset);
        }
      }
    }
    d.text += e.token.text;
    *text_offset += e.token.text.size();
  }
  return d;
}

std::string_view finish_name(FinishReason r) {
  switch (r) {
    case FinishReason::kStop: return "stop";
    case FinishReason::kLength: return "length";
    case FinishReason::kCancelled: return "cancelled";
    case FinishReason::kError: return "error";
    case FinishReason::kUnspecified: break;
  }
  return "stop";
}

json usage_json(const EngineUsage& u) {
  const int64_t prompt = u.context_tokens + u.query_tokens;
  return {{"prompt_tokens", prompt},
          {"completion_tokens", u.completion_tokens},
          {"total_tokens", prompt + u.completion_tokens},
          {"context_tokens", u.context_tokens},
          {"query_tokens", u.query_tokens},
          {"cached_context_tokens", u.cached_context_tokens},
          {"prompt_tokens_details", {{"cached_tokens", u.cached_context_tokens}}}};
}

json timing_json(const EngineTiming& t, double total_ms) {
  return {{"queue_ms", t.queue_ms},
          {"phase1_ms", t.phase1_ms},
          {"time_to_first_token_ms", t.time_to_first_token_ms},
          {"tokens_per_second", t.tokens_per_second},
          {"total_ms", total_ms}};
}

json health_json(const AttentionHealth& h) {
  const auto heads = [](const std::vector<HeadRef>& v) {
    json out = json::array();
    for (const HeadRef& r : v) out.push_back({{"layer", r.layer}, {"head", r.head}});
    return out;
  };
  json out = {{"overload_ratio", h.thresholds.overload_ratio},
              {"collapse_nats", h.thresholds.collapse_nats},
              {"n_heads_judged", h.n_judged},
              {"overload_fraction", h.overload_fraction()},
              {"collapse_fraction", h.collapse_fraction()},
              {"overloaded", heads(h.overloaded)},
              {"collapsed", heads(h.collapsed)}};
  if (h.rank_ratio) out["rank_entropy_ratio"] = *h.rank_ratio;
  return out;
}

// The map's values rounded to float, as gRPC carries them and as the health judged them.
json entropy_json(const EntropyStats& e, const AttentionHealth& health) {
  const auto f = [](double v) { return static_cast<double>(static_cast<float>(v)); };
  json layers = json::array();
  for (int l = 0; l < e.n_layers; ++l) {
    json mean = json::array(), max = json::array();
    for (int h = 0; h < e.n_heads; ++h) {
      mean.push_back(f(e.mean(l, h)));
      max.push_back(f(e.mean_max(l, h)));
    }
    json layer = {{"mean", f(e.layer_mean(l))}, {"head_mean", std::move(mean)}, {"head_max", std::move(max)}};
    if (e.has_rank_entropy()) {
      json rank = json::array();
      for (int h = 0; h < e.n_heads; ++h) rank.push_back(f(e.rank_mean(l, h)));
      layer["rank_mean"] = f(e.rank_layer_mean(l));
      layer["head_rank_mean"] = std::move(rank);
    }
    layers.push_back(std::move(layer));
  }
  return {{"n_layers", e.n_layers},
          {"n_heads", e.n_heads},
          {"n_ranks", e.has_rank_entropy() ? e.n_ranks : 1},
          {"layers", std::move(layers)},
          {"health", health_json(health)}};
}

// The per-request mailbox between the engine thread and the worker (as CompletionService's EventQueue); held by
// shared_ptr in the engine's callback so a request that ends early leaves it valid for events still in flight.
struct EventQueue {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::pair<EngineEvent, Clock::time_point>> events;
};

}  // namespace

// One admitted generation request, from submission to its last write.
struct OpenAiHttpServer::Request {
  Request(OpenAiHttpServer& s, const Attached& attached) : server(s), a(attached) {}
  OpenAiHttpServer& server;
  const Attached& a;
  bool chat = false;
  Options options;
  std::string rpc;  // "POST /v1/completions": the metrics label
  std::string id, model;
  RequestRegistry::Handle handle;  // id, registered for Abort while the request lives
  int64_t created = 0;
  Clock::time_point start;
  std::shared_ptr<EventQueue> queue = std::make_shared<EventQueue>();
  RequestId engine_id{};
  bool finished = false;  // the engine's finish event was read
  HealthThresholds health_thresholds;     // the request's (else the server's)
  std::optional<AttentionHealth> health;  // when the finish event carries entropy
  std::optional<Clock::time_point> last_token_at;

  int n = 1;  // choices

  enum class End { kFinished, kClientGone, kAbandoned };
  // Reads events until every choice's finish event (kFinished, (*ends)[c] set) or a failed write (kClientGone)
  // or the server's shutdown grace ran out (kAbandoned); the engine request is cancelled in the last two cases.
  // Token events carry their choice.
  End pump(const std::function<bool(const std::vector<EngineEvent>&)>& sink, std::vector<EngineEvent>* ends) {
    std::vector<std::pair<EngineEvent, Clock::time_point>> batch;
    std::vector<EngineEvent> tokens;
    ends->assign(static_cast<size_t>(n), EngineEvent());
    int n_finished = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(queue->mu);
        queue->cv.wait_for(lock, kPollInterval, [&] { return !queue->events.empty(); });
        batch.swap(queue->events);
      }
      tokens.clear();
      for (auto& [event, at] : batch) {
        if (event.kind == EngineEvent::Kind::kFinished) {
          if (event.choice >= 0 && event.choice < n) {
            (*ends)[static_cast<size_t>(event.choice)] = std::move(event);
            ++n_finished;
          }
          continue;
        }
        if (event.token.token >= 0 && server.metrics_) {
          if (!last_token_at) server.metrics_->observe_time_to_first_token(seconds_between(start, at));
          else server.metrics_->observe_inter_token_latency(seconds_between(*last_token_at, at));
          last_token_at = at;
        }
        tokens.push_back(std::move(event));
      }
      batch.clear();
      if (!tokens.empty() && !sink(tokens)) {
        a.engine.cancel(engine_id);
        return End::kClientGone;
      }
      if (n_finished == n) {
        const EngineEvent* end = &ends->front();
        finished = true;
        if (end->entropy && end->entropy->enabled()) {
          health = attention_health(*end->entropy, health_thresholds);
          if (server.metrics_) server.metrics_->observe_attention_health(*health);
        }
        if (ServerMetrics* m = server.metrics_) {
          for (const EngineEvent& e : *ends) m->add_generated_tokens(e.usage.completion_tokens);
          if (end->usage.context_tokens > 0 && end->timing.phase1_ms > 0) {
            m->observe_phase1(end->timing.phase1_ms / 1000.0);
          }
          m->observe_request_duration(seconds_between(start, Clock::now()));
        }
        return End::kFinished;
      }
      if (server.abandon_.load()) {
        a.engine.cancel(engine_id);
        return End::kAbandoned;
      }
    }
  }

  // The finish events' first error, if the request failed (as CompletionService::finish_status).
  static Status failure(const std::vector<EngineEvent>& ends) {
    for (const EngineEvent& end : ends) {
      if (end.finish == FinishReason::kError) {
        return end.error.ok() ? internal_error("the engine failed the request without saying why") : end.error;
      }
      if (end.finish == FinishReason::kCancelled && !end.error.ok()) return end.error;
    }
    return Status();
  }
  // The response's tail event: the first choice's (it encoded the prompt), with every choice's completion tokens.
  static EngineEvent tail_of(const std::vector<EngineEvent>& ends) {
    EngineEvent t = ends.front();
    for (size_t c = 1; c < ends.size(); ++c) t.usage.completion_tokens += ends[c].usage.completion_tokens;
    return t;
  }
  // Token events by choice, in order.
  std::vector<std::vector<EngineEvent>> by_choice(const std::vector<EngineEvent>& tokens) const {
    std::vector<std::vector<EngineEvent>> per(static_cast<size_t>(n));
    for (const EngineEvent& e : tokens) {
      if (e.choice >= 0 && e.choice < n) per[static_cast<size_t>(e.choice)].push_back(e);
    }
    return per;
  }

  json header(bool chunk) const {
    const char* object = chat ? (chunk ? "chat.completion.chunk" : "chat.completion")
                              : "text_completion";
    return {{"id", id}, {"object", object}, {"created", created}, {"model", model}};
  }

  // One choice of a response or chunk. delta_role: chat streams name the role on their first chunk only.
  json choice(ChoiceDelta d, bool chunk, bool first_chunk, std::optional<FinishReason> finish, int index = 0) const {
    json c = {{"index", index}};
    if (!chat) {
      c["text"] = std::move(d.text);
    } else if (!chunk) {
      c["message"] = {{"role", "assistant"}, {"content", std::move(d.text)}};
    } else {
      json delta = json::object();
      if (first_chunk) delta["role"] = "assistant";
      if (!d.text.empty() || first_chunk) delta["content"] = std::move(d.text);
      c["delta"] = std::move(delta);
    }
    c["logprobs"] = options.logprobs ? std::move(d.logprobs) : json(nullptr);
    c["finish_reason"] = finish ? json(finish_name(*finish)) : json(nullptr);
    c["token_ids"] = std::move(d.token_ids);
    return c;
  }

  // The request's tail on the finishing message: usage, timing, entropy, prompt log-probabilities.
  void add_tail(const EngineEvent& end, json* m, bool with_usage) const {
    if (with_usage) (*m)["usage"] = usage_json(end.usage);
    if (!end.context_id.empty()) (*m)["context_id"] = end.context_id;
    (*m)["timing"] = timing_json(end.timing, 1000.0 * seconds_between(start, Clock::now()));
    if (end.entropy && end.entropy->enabled() && health) (*m)["attention_entropy"] = entropy_json(*end.entropy, *health);
    if (!end.prompt_logprobs.empty()) {
      json content = json::array();
      for (const TokenLogprobs& lp : end.prompt_logprobs) content.push_back(chat_logprob_entry(lp, a.tokenizer));
      (*m)["choices"][0]["prompt_logprobs"] = {{"content", std::move(content)}};
    }
  }

  void record(std::string_view status) const {
    if (server.metrics_) server.metrics_->record_request(rpc, status);
  }
};

OpenAiHttpServer::OpenAiHttpServer(const ServerConfig& config, std::shared_ptr<const ApiKeyCheck> api_key,
                                   ServerMetrics* metrics, RequestRegistry* registry)
    : config_(config),
      api_key_(std::move(api_key)),
      metrics_(metrics),
      registry_(registry ? registry : &own_registry_) {}

OpenAiHttpServer::~OpenAiHttpServer() { stop(); }

void OpenAiHttpServer::attach(Engine& engine, const Tokenizer& tokenizer, std::optional<ChatTemplate> chat_template) {
  SS_CHECK(!attached_.load(), "OpenAiHttpServer::attach called twice");
  auto a = std::make_unique<Attached>(Attached{engine, tokenizer, std::move(chat_template), 0});
  a->max_token_bytes = longest_token_bytes(a->tokenizer);
  attached_owner_ = std::move(a);
  attached_.store(attached_owner_.get());
}

namespace {

// The key check of the gRPC services, on the Authorization header.
Status check_key(const ApiKeyCheck* key, const httplib::Request& req) {
  if (!key || !key->enabled()) return Status();
  std::multimap<grpc::string_ref, grpc::string_ref> metadata;
  const std::string value = req.get_header_value("Authorization");
  if (req.has_header("Authorization")) metadata.emplace("authorization", value);
  const grpc::Status s = key->check(metadata);
  if (s.ok()) return Status();
  if (!req.has_header("Authorization")) {
    return unauthenticated("missing \"Authorization: Bearer <key>\" header (this server requires an API key)");
  }
  return unauthenticated("{}", s.error_message());
}

}  // namespace

void OpenAiHttpServer::install_routes() {
  httplib::Server& http = *http_;

  // Key, shutdown and readiness, in that order; nullopt = admitted.
  const auto admit = [this](const httplib::Request& req, bool needs_engine) -> std::optional<ApiError> {
    if (Status s = check_key(api_key_.get(), req); !s.ok()) return from_status(s);
    if (!needs_engine) return std::nullopt;
    if (!admitting_.load()) return from_status(unavailable("the server is shutting down"));
    const Attached* a = attached_.load();
    if (!a) {
      return from_status(unavailable("the model loading is under way (GET /health/ready turns 200 when it is ready)"));
    }
    if (!a->engine.ready()) {
      return from_status(
          unavailable("the model is still loading on some ranks (GET /health/ready turns 200 when it is ready)"));
    }
    return std::nullopt;
  };

  const auto health = [this](bool ready) {
    return [this, ready](const httplib::Request& req, httplib::Response& res) {
      if (!config_.health_without_key) {
        if (Status s = check_key(api_key_.get(), req); !s.ok()) return send_error(res, from_status(s));
      }
      if (!ready) return res.set_content(R"({"status":"ok"})", kJson);
      const Attached* a = attached_.load();
      if (!admitting_.load()) return send_error(res, from_status(unavailable("the server is shutting down")));
      if (!a || !a->engine.ready()) return send_error(res, from_status(unavailable("the model is loading")));
      res.set_content(R"({"status":"ready"})", kJson);
    };
  };
  http.Get("/health", health(false));
  http.Get("/health/ready", health(true));

  const auto model_json = [this](const Attached& a) {
    return json{{"id", a.engine.info().model_name}, {"object", "model"}, {"created", started_unix_},
                {"owned_by", "starserve"}, {"max_model_len", a.engine.info().max_context}};
  };
  http.Get("/v1/models", [this, admit, model_json](const httplib::Request& req, httplib::Response& res) {
    if (auto e = admit(req, false)) return send_error(res, *e);
    const Attached* a = attached_.load();
    if (!a) return send_error(res, from_status(unavailable("the model loading is under way")));
    res.set_content(dump({{"object", "list"}, {"data", json::array({model_json(*a)})}}), kJson);
  });
  http.Get(R"(/v1/models/(.+))", [this, admit, model_json](const httplib::Request& req, httplib::Response& res) {
    if (auto e = admit(req, false)) return send_error(res, *e);
    const Attached* a = attached_.load();
    if (!a) return send_error(res, from_status(unavailable("the model loading is under way")));
    const std::string name = req.matches[1];
    if (name != a->engine.info().model_name) {
      return send_error(res, from_status(not_found("model \"{}\" is not served here; this server serves \"{}\"", name,
                                                    a->engine.info().model_name)));
    }
    res.set_content(dump(model_json(*a)), kJson);
  });

  const auto generation = [this, admit](bool chat) {
    return [this, admit, chat](const httplib::Request& req, httplib::Response& res) {
      const std::string rpc = chat ? "POST /v1/chat/completions" : "POST /v1/completions";
      const auto refuse = [&](const ApiError& e) {
        if (metrics_) metrics_->record_request(rpc, code_name_of_http(e.http));
        log_debug("{}: {} {}", rpc, e.http, e.message);
        send_error(res, e);
      };
      if (auto e = admit(req, true)) return refuse(*e);
      const Attached& a = *attached_.load();
      const json body = json::parse(req.body, nullptr, /*allow_exceptions=*/false);
      if (body.is_discarded() || !body.is_object()) return refuse(bad_request("the body must be a JSON object"));

      Options options;
      v1::CompleteRequest completion;
      v1::ChatCompleteRequest chat_request;
      Status parsed = chat ? parse_chat(body, &chat_request, &options) : parse_completion(body, &completion, &options);
      if (!parsed.ok()) return refuse(from_status(parsed));
      if (chat && !a.chat_template) {
        return refuse(bad_request(fmt::format("this model has no chat template the server recognises; use "
                                              "/v1/completions, or start the server with a built-in template ({})",
                                              fmt::join(ChatTemplate::builtin_names(), ", "))));
      }
      const EngineInfo info = a.engine.info();
      const RequestLimits limits = make_request_limits(config_, info, a.tokenizer, a.max_token_bytes);
      const ChatTemplate* tmpl = a.chat_template ? &*a.chat_template : nullptr;
      Result<PreparedRequest> prepared = chat ? prepare_request(chat_request, a.tokenizer, tmpl, limits)
                                              : prepare_request(completion, a.tokenizer, tmpl, limits);
      if (!prepared.ok()) {
        ApiError e = from_status(prepared.status());
        if (chat && e.param == "logprobs") e.param = "top_logprobs";
        return refuse(e);
      }

      auto r = std::make_shared<Request>(*this, a);
      r->chat = chat;
      r->options = options;
      r->n = prepared->engine.n;
      r->health_thresholds = prepared->health;
      r->rpc = rpc;
      r->model = info.model_name;
      r->created = unix_seconds();
      r->start = Clock::now();
      if (req.has_header("X-Request-Id")) {
        // The client's id (as vLLM's server takes it), shared with gRPC's x-request-id: Abort reaches it.
        const std::string chosen = req.get_header_value("X-Request-Id");
        if (std::string why = RequestRegistry::check_client_id(chosen); !why.empty()) {
          return refuse(bad_request("X-Request-Id: " + why));
        }
        if (!registry_->reserve(chosen, &r->handle)) {
          return refuse({409, "invalid_request_error",
                         fmt::format("X-Request-Id: a running request already has the id \"{}\"", chosen), {},
                         "request_id_in_use"});
        }
      } else {
        thread_local std::mt19937_64 rng(std::random_device{}());
        while (!registry_->reserve(
            fmt::format("{}-{:016x}{:08x}", chat ? "chatcmpl" : "cmpl", rng(), static_cast<uint32_t>(rng())),
            &r->handle)) {
        }
      }
      r->id = r->handle.id();
      res.set_header("X-Request-Id", r->id);
      const int64_t n_prompt = static_cast<int64_t>(prepared->engine.context.size() + prepared->engine.query.size());
      std::string echo = std::move(prepared->echo_text);
      Result<RequestId> id = a.engine.submit(std::move(prepared->engine), [queue = r->queue](const EngineEvent& e) {
        {
          std::lock_guard<std::mutex> lock(queue->mu);
          queue->events.emplace_back(e, Clock::now());
        }
        queue->cv.notify_one();
      });
      if (!id.ok()) return refuse(from_status(id.status()));
      r->engine_id = *id;
      r->handle.bind(a.engine, *id);
      if (metrics_) metrics_->add_prompt_tokens(n_prompt);

      if (!options.stream) {
        const size_t n_choices = static_cast<size_t>(r->n);
        std::vector<size_t> offsets(n_choices, 0);
        std::vector<ChoiceDelta> all;
        for (size_t c = 0; c < n_choices; ++c) {
          all.push_back(make_delta({}, a.tokenizer, chat, options.logprobs, &offsets[c]));
          all[c].text = echo;
          offsets[c] = echo.size();
        }
        std::vector<EngineEvent> ends;
        const Request::End how = r->pump(
            [&](const std::vector<EngineEvent>& tokens) {
              const auto per = r->by_choice(tokens);
              for (size_t c = 0; c < n_choices; ++c) {
                if (per[c].empty()) continue;
                ChoiceDelta d = make_delta(per[c], a.tokenizer, chat, options.logprobs, &offsets[c]);
                all[c].text += d.text;
                for (json& t : d.token_ids) all[c].token_ids.push_back(std::move(t));
                if (options.logprobs) {
                  for (auto& [k, v] : d.logprobs.items()) {
                    for (json& x : v) all[c].logprobs[k].push_back(std::move(x));
                  }
                }
              }
              return true;
            },
            &ends);
        if (how != Request::End::kFinished) return refuse(from_status(unavailable("the server is shutting down")));
        if (Status f = Request::failure(ends); !f.ok()) return refuse(from_status(f));
        json m = r->header(false);
        m["choices"] = json::array();
        for (size_t c = 0; c < n_choices; ++c) {
          m["choices"].push_back(r->choice(std::move(all[c]), false, false, ends[c].finish, static_cast<int>(c)));
        }
        r->add_tail(Request::tail_of(ends), &m, true);
        r->record("OK");
        return res.set_content(dump(m), kJson);
      }

      // Streaming: the status line and headers go out with the first chunk; failures after that are an error
      // event in the stream.
      res.set_header("Cache-Control", "no-cache");
      res.set_header("X-Accel-Buffering", "no");
      auto echo_text = std::make_shared<std::string>(std::move(echo));
      res.set_chunked_content_provider(
          kEventStream,
          [r, echo_text](size_t, httplib::DataSink& sink) {
            const auto send = [&sink](const json& j) {
              const std::string event = "data: " + dump(j) + "\n\n";
              return sink.write(event.data(), event.size());
            };
            const Tokenizer& tok = r->a.tokenizer;
            const size_t n_choices = static_cast<size_t>(r->n);
            // Per choice: the text offset, whether its first chunk went out, the echo its first chunk carries.
            std::vector<size_t> offsets(n_choices, echo_text->size());
            std::vector<char> first(n_choices, 1);
            std::vector<std::string> pending(n_choices, *echo_text);
            std::vector<EngineEvent> ends;
            const Request::End how = r->pump(
                [&](const std::vector<EngineEvent>& tokens) {
                  const auto per = r->by_choice(tokens);
                  json m = r->header(true);
                  m["choices"] = json::array();
                  for (size_t c = 0; c < n_choices; ++c) {
                    if (per[c].empty()) continue;
                    ChoiceDelta d = make_delta(per[c], tok, r->chat, r->options.logprobs, &offsets[c]);
                    d.text = pending[c] + d.text;
                    pending[c].clear();
                    m["choices"].push_back(r->choice(std::move(d), true, first[c] != 0, std::nullopt, static_cast<int>(c)));
                    first[c] = 0;
                  }
                  return send(m);
                },
                &ends);
            if (how == Request::End::kClientGone) {
              r->record("CANCELLED");
              return false;
            }
            if (how == Request::End::kAbandoned) {
              r->record("UNAVAILABLE");
              send(error_json(from_status(unavailable("the server is shutting down"))));
              return false;
            }
            if (Status f = Request::failure(ends); !f.ok()) {
              r->record(code_name(f));
              send(error_json(from_status(f)));
            } else {
              const EngineEvent end = Request::tail_of(ends);
              json m = r->header(true);
              m["choices"] = json::array();
              for (size_t c = 0; c < n_choices; ++c) {
                size_t ignored = offsets[c];
                ChoiceDelta d = make_delta({}, tok, r->chat, r->options.logprobs, &ignored);
                d.text = std::move(pending[c]);
                m["choices"].push_back(r->choice(std::move(d), true, first[c] != 0, ends[c].finish, static_cast<int>(c)));
              }
              r->add_tail(end, &m, false);
              bool ok = send(m);
              if (ok && r->options.include_usage) {
                json u = r->header(true);
                u["choices"] = json::array();
                u["usage"] = usage_json(end.usage);
                ok = send(u);
              }
              if (!ok) {
                r->record("CANCELLED");
                return false;
              }
              r->record("OK");
            }
            const std::string done = "data: [DONE]\n\n";
            if (!sink.write(done.data(), done.size())) return false;
            sink.done();
            return true;
          },
          // The provider may never run (the connection failed before the headers went out): the engine request
          // must not outlive it.
          [r](bool) {
            if (!r->finished) r->a.engine.cancel(r->engine_id);
          });
    };
  };
  http.Post("/v1/completions", generation(false));
  http.Post("/v1/chat/completions", generation(true));

  // Unknown routes and methods, and httplib's own refusals (413 over payload_max_length, 400 unparsable HTTP), in
  // OpenAI's shape; handlers' own errors already carry a body.
  http.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;
    ApiError e;
    e.http = res.status;
    e.type = "invalid_request_error";
    if (res.status == 404) {
      e.message = fmt::format("unknown route {} {} (this server has POST /v1/completions, POST /v1/chat/completions, "
                              "GET /v1/models, GET /health, GET /health/ready)",
                              req.method, req.path);
      e.code = "unknown_url";
    } else if (res.status == 413) {
      e.message = "the request body is larger than the server's limit (max_message_bytes)";
    } else {
      e.message = fmt::format("HTTP {}", res.status);
      if (res.status >= 500) e.type = "server_error";
    }
    res.set_content(dump(error_json(e)), kJson);
  });
  http.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
    std::string what = "unknown exception";
    try {
      if (ep) std::rethrow_exception(ep);
    } catch (const std::exception& ex) {
      what = ex.what();
    } catch (...) {
    }
    ApiError e;
    e.type = "server_error";
    e.message = fmt::format("internal error: {}", what);
    send_error(res, e);
  });
}

Status OpenAiHttpServer::start(const std::string& host) {
  SS_CHECK(!http_, "OpenAiHttpServer::start called twice");
  if (config_.http_port < 0 || config_.http_port > 65535) {
    return invalid_argument("http_port = {} must be in [0, 65535] (0 = off)", config_.http_port);
  }
  if (config_.http_threads < 1 || config_.http_threads > 4096) {
    return invalid_argument("http_threads = {} must be in [1, 4096]", config_.http_threads);
  }
  std::unique_ptr<httplib::Server> http;
  if (!config_.tls_cert.empty()) {
    // OpenSSL writes to the socket with write(2), which raises SIGPIPE once the peer has gone (plain HTTP sends with
    // MSG_NOSIGNAL); its default action would end the server when a client leaves a stream.
    std::signal(SIGPIPE, SIG_IGN);
    auto ssl = std::make_unique<httplib::SSLServer>(
        config_.tls_cert.c_str(), config_.tls_key.c_str(),
        config_.tls_client_ca.empty() ? nullptr : config_.tls_client_ca.c_str());
    if (!ssl->is_valid()) {
      return invalid_argument("HTTP API: cannot load tls_cert {} / tls_key {}{}", config_.tls_cert, config_.tls_key,
                              config_.tls_client_ca.empty() ? "" : " / tls_client_ca " + config_.tls_client_ca);
    }
    http = std::move(ssl);
  } else {
    http = std::make_unique<httplib::Server>();
  }
  const int threads = config_.http_threads;
  http->new_task_queue = [threads] { return new httplib::ThreadPool(static_cast<size_t>(threads)); };
  // SO_REUSEADDR only: httplib's default SO_REUSEPORT would let a second server share the port silently.
  http->set_socket_options([](socket_t fd) {
    const int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  });
  http->set_keep_alive_timeout(kKeepAliveS);
  http->set_read_timeout(kIoTimeoutS, 0);
  http->set_write_timeout(kIoTimeoutS, 0);
  http->set_payload_max_length(static_cast<size_t>(config_.max_message_bytes));
  http_ = std::move(http);
  started_unix_ = unix_seconds();
  install_routes();

  const std::string bind_host = host.empty() ? "0.0.0.0" : host;
  if (!http_->bind_to_port(bind_host, config_.http_port)) {
    http_.reset();
    return unavailable("HTTP API: cannot listen on {}:{} (address in use, or not an address of this host)", bind_host,
                       config_.http_port);
  }
  port_ = config_.http_port;
  auto returned = std::make_shared<std::atomic<bool>>(false);  // shared with the thread, which may outlive this frame
  thread_ = std::thread([this, returned] {
    if (!http_->listen_after_bind()) log_warn("HTTP API on port {} stopped with an error", port_);
    returned->store(true);
  });
  // httplib's stop() only reaches a server whose accept loop has begun, so wait for it (it begins at once).
  while (!http_->is_running() && !returned->load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  if (!http_->is_running()) {
    thread_.join();
    http_.reset();
    port_ = 0;
    return unavailable("HTTP API: the server on port {} did not start", config_.http_port);
  }
  return Status();
}

void OpenAiHttpServer::stop(std::chrono::milliseconds grace) {
  if (!http_) return;
  begin_shutdown();
  // Running requests get `grace` to finish (the engine ends them as it drains), then are cancelled.
  const auto until = Clock::now() + grace;
  while (Clock::now() < until && attached_.load() && attached_.load()->engine.info().running > 0) {
    std::this_thread::sleep_for(kPollInterval);
  }
  abandon_.store(true);
  http_->stop();  // stops accepting; the pool joins its workers, which end as their pumps see abandon_
  if (thread_.joinable()) thread_.join();
  http_.reset();
}

}  // namespace starserve
