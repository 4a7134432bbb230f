// starctl: command-line client for a starserve gRPC server.
//
//   starctl complete --prompt "The capital of France is" --max-tokens 16 --temperature 0
//   starctl stream --context-file report.txt --query "What were the main findings?" --attention star --entropy
//   starctl complete --prompt "..." --attention global --entropy-json global.json   (map + health as JSON)
//   starctl chat "What is the capital of France?" --system "Answer briefly." --stream
//   starctl tokenize "Hello world"        starctl info        starctl health --ready
//
// tokenize prints each token's id and text (--ids-only: the ids), and only the fields the response holds.
//
// Generated text goes to stdout; usage, timing, entropy and logprobs go to stderr so stdout can be piped.
// --entropy prints per layer the mean entropy, then a layer x head heat map of H / head_max (ANSI 256-colour
// background when stderr is a terminal and NO_COLOR is unset, else Unicode shade blocks) with the request's
// attention health: o marks a head in entropic overload, c a collapsed one.
// Exit status: 0 success, 1 the RPC failed (the gRPC status is printed), 2 bad command line or unreadable file.
#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <google/protobuf/util/json_util.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include "common/config.h"
#include "starserve/v1/completion.grpc.pb.h"

namespace v1 = starserve::v1;

namespace {

struct ConnectionOptions {
  std::string address = "localhost:50051";
  std::string api_key;
  bool tls = false;  // TLS with the system's root certificates
  std::string tls_ca, tls_cert, tls_key;
  double timeout_s = 0;  // 0 = no deadline
};

// Generation options shared by complete/stream/chat; -1 / NaN sentinels with CLI11's count() tell "unset" apart.
struct GenerationOptions {
  std::string prompt;
  std::string context_file, query;
  std::vector<int32_t> prompt_token_ids;
  std::string system;
  int max_tokens = 0;
  float temperature = 0, top_p = 0, min_p = 0, repetition_penalty = 0, frequency_penalty = 0, presence_penalty = 0;
  int top_k = 0;
  uint64_t seed = 0;
  int n = 1;  // choices
  std::vector<std::string> stop;
  std::vector<int32_t> stop_token_ids;
  bool ignore_eos = false;
  int logprobs = 0;
  int prompt_logprobs = 0;
  bool echo = false;
  std::string attention;
  std::string exact_layout;
  int block_size = 0, anchor_size = 0;
  bool entropy = false;
  std::string entropy_json;  // write the entropy map and its health here
  double overload_ratio = 0, collapse_nats = 0;
  bool stream = false;  // chat only
  std::string model;
  std::string request_id;  // sent as x-request-id: the id Abort takes
  std::string context_id;  // a cached context instead of --context-file
  // Hidden, for tests of the server's input checks: \xHH in the prompt, query, system message, stop strings and
  // model is the byte HH (\\ a backslash), so invalid UTF-8 can be sent.
  bool unescape = false;
  std::map<std::string, CLI::Option*> given;  // flag name -> option, to test count()
  bool has(const std::string& name) const {
    auto it = given.find(name);
    return it != given.end() && it->second->count() > 0;
  }
};

class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

std::string read_file(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw UsageError(fmt::format("cannot read {} {}", what, path));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::shared_ptr<grpc::Channel> make_channel(const ConnectionOptions& c) {
  std::shared_ptr<grpc::ChannelCredentials> creds;
  if (c.tls || !c.tls_ca.empty() || !c.tls_cert.empty()) {
    if (c.tls_cert.empty() != c.tls_key.empty()) throw UsageError("--tls-cert and --tls-key go together");
    grpc::SslCredentialsOptions ssl;
    if (!c.tls_ca.empty()) ssl.pem_root_certs = read_file(c.tls_ca, "--tls-ca");
    if (!c.tls_cert.empty()) {
      ssl.pem_cert_chain = read_file(c.tls_cert, "--tls-cert");
      ssl.pem_private_key = read_file(c.tls_key, "--tls-key");
    }
    creds = grpc::SslCredentials(ssl);
  } else {
    creds = grpc::InsecureChannelCredentials();
  }
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  return grpc::CreateCustomChannel(c.address, creds, args);
}

void prepare_context(const ConnectionOptions& c, grpc::ClientContext* ctx) {
  if (!c.api_key.empty()) ctx->AddMetadata("authorization", "Bearer " + c.api_key);
  if (c.timeout_s > 0) {
    ctx->set_deadline(std::chrono::system_clock::now() +
                      std::chrono::microseconds(static_cast<int64_t>(c.timeout_s * 1e6)));
  }
}

int report_error(const grpc::Status& s) {
  static const char* const kNames[] = {"OK",
                                       "CANCELLED",
                                       "UNKNOWN",
                                       "INVALID_ARGUMENT",
                                       "DEADLINE_EXCEEDED",
                                       "NOT_FOUND",
                                       "ALREADY_EXISTS",
                                       "PERMISSION_DENIED",
                                       "RESOURCE_EXHAUSTED",
                                       "FAILED_PRECONDITION",
                                       "ABORTED",
                                       "OUT_OF_RANGE",
                                       "UNIMPLEMENTED",
                                       "INTERNAL",
                                       "UNAVAILABLE",
                                       "DATA_LOSS",
                                       "UNAUTHENTICATED"};
  const int code = static_cast<int>(s.error_code());
  const char* name = code >= 0 && code <= 16 ? kNames[code] : "UNKNOWN";
  std::fflush(stdout);
  fmt::print(stderr, "\nerror: {}: {}\n", name, s.error_message());
  return 1;
}

v1::AttentionMode parse_mode(const std::string& s) {
  if (s.empty()) return v1::ATTENTION_MODE_UNSPECIFIED;
  if (s == "global") return v1::ATTENTION_MODE_GLOBAL;
  if (s == "exact") return v1::ATTENTION_MODE_EXACT;
  if (s == "star") return v1::ATTENTION_MODE_STAR;
  throw UsageError(fmt::format("--attention {}: must be global, exact or star", s));
}

v1::ExactLayout parse_layout(const std::string& s) {
  if (s.empty() || s == "auto") return v1::EXACT_LAYOUT_UNSPECIFIED;
  if (s == "zigzag") return v1::EXACT_LAYOUT_ZIGZAG;
  if (s == "contiguous") return v1::EXACT_LAYOUT_CONTIGUOUS;
  throw UsageError(fmt::format("--exact-layout {}: must be zigzag, contiguous or auto", s));
}

// `\xHH` -> the byte HH, `\\` -> a backslash; anything else as it is.
std::string unescape_bytes(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 1 < s.size() && s[i + 1] == '\\') {
      out.push_back('\\');
      ++i;
    } else if (s[i] == '\\' && i + 3 < s.size() && s[i + 1] == 'x' &&
               std::isxdigit(static_cast<unsigned char>(s[i + 2])) && std::isxdigit(static_cast<unsigned char>(s[i + 3]))) {
      out.push_back(static_cast<char>(std::stoi(s.substr(i + 2, 2), nullptr, 16)));
      i += 3;
    } else {
      out.push_back(s[i]);
    }
  }
  return out;
}

// GenerationParams from the flags, built once whatever the RPC; flags not given stay unset (the server's default).
v1::GenerationParams make_params(const GenerationOptions& g) {
  v1::GenerationParams p;
  if (g.has("--max-tokens")) p.set_max_tokens(g.max_tokens);
  if (g.has("--temperature")) p.set_temperature(g.temperature);
  if (g.has("--top-p")) p.set_top_p(g.top_p);
  if (g.has("--top-k")) p.set_top_k(g.top_k);
  if (g.has("--min-p")) p.set_min_p(g.min_p);
  if (g.has("--repetition-penalty")) p.set_repetition_penalty(g.repetition_penalty);
  if (g.has("--frequency-penalty")) p.set_frequency_penalty(g.frequency_penalty);
  if (g.has("--presence-penalty")) p.set_presence_penalty(g.presence_penalty);
  if (g.has("--seed")) p.set_seed(g.seed);
  if (g.has("--n")) p.set_n(g.n);
  for (const std::string& s : g.stop) p.add_stop(s);
  for (int32_t id : g.stop_token_ids) p.add_stop_token_ids(id);
  if (g.ignore_eos) p.set_ignore_eos(true);
  if (g.has("--logprobs")) p.set_logprobs(g.logprobs);
  if (g.has("--prompt-logprobs")) p.set_prompt_logprobs(g.prompt_logprobs);
  p.set_attention_mode(parse_mode(g.attention));
  p.set_exact_layout(parse_layout(g.exact_layout));
  if (g.has("--block-size")) p.set_block_size(g.block_size);
  if (g.has("--anchor-size")) p.set_anchor_size(g.anchor_size);
  if (g.entropy || !g.entropy_json.empty()) p.set_return_attention_entropy(true);
  if (g.has("--entropy-overload-ratio")) p.set_entropy_overload_ratio(g.overload_ratio);
  if (g.has("--entropy-collapse-nats")) p.set_entropy_collapse_nats(g.collapse_nats);
  return p;
}

// The prompt parts: what the request kinds do not share. Completions take one of three inputs and --echo.
template <typename Req>
void set_completion_prompt(const GenerationOptions& g, Req* r) {
  if (!g.context_id.empty()) {
    // A cached context by its id: the input is the query alone.
    if (!g.context_file.empty()) throw UsageError("--context-id stands for the context: drop --context-file");
    if ((!g.prompt.empty()) + (!g.query.empty()) + (!g.prompt_token_ids.empty()) != 1) {
      throw UsageError("--context-id needs exactly one of --query, --prompt or --token-ids (the query)");
    }
    r->set_context_id(g.context_id);
    if (!g.query.empty()) r->mutable_split()->set_query(g.query);
    if (!g.prompt.empty()) r->set_prompt(g.prompt);
    for (int32_t id : g.prompt_token_ids) r->mutable_prompt_token_ids()->add_ids(id);
    if (g.echo) r->set_echo(true);
    return;
  }
  const int n_inputs = (!g.prompt.empty()) + (!g.context_file.empty()) + (!g.prompt_token_ids.empty());
  if (n_inputs != 1) throw UsageError("give exactly one of --prompt, --context-file (with --query) or --token-ids");
  if (!g.prompt.empty()) {
    r->set_prompt(g.prompt);
  } else if (!g.prompt_token_ids.empty()) {
    for (int32_t id : g.prompt_token_ids) r->mutable_prompt_token_ids()->add_ids(id);
  } else {
    if (g.query.empty()) throw UsageError("--context-file needs --query");
    r->mutable_split()->set_context(read_file(g.context_file, "--context-file"));
    r->mutable_split()->set_query(g.query);
  }
  if (g.echo) r->set_echo(true);
}

// Chat: an optional system message, the user message and an optional document.
template <typename Req>
void set_chat_prompt(const GenerationOptions& g, Req* r) {
  if (g.prompt.empty()) throw UsageError("chat needs a message (positional or --prompt)");
  if (!g.system.empty()) {
    v1::ChatMessage* m = r->add_messages();
    m->set_role("system");
    m->set_content(g.system);
  }
  v1::ChatMessage* m = r->add_messages();
  m->set_role("user");
  m->set_content(g.prompt);
  if (!g.context_file.empty()) r->set_context(read_file(g.context_file, "--context-file"));
}

void set_prompt(const GenerationOptions& g, v1::CompleteRequest* r) { set_completion_prompt(g, r); }
void set_prompt(const GenerationOptions& g, v1::StreamCompleteRequest* r) { set_completion_prompt(g, r); }
void set_prompt(const GenerationOptions& g, v1::ChatCompleteRequest* r) { set_chat_prompt(g, r); }
void set_prompt(const GenerationOptions& g, v1::StreamChatCompleteRequest* r) { set_chat_prompt(g, r); }

// The text of a choice: a completion's text, a chat reply's message, a chat stream's delta.
const std::string& choice_text(const v1::CompletionChoice& c) { return c.text(); }
const std::string& choice_text(const v1::ChatChoice& c) { return c.message().content(); }
const std::string& choice_text(const v1::ChatDeltaChoice& c) { return c.delta().content(); }

const char* finish_name(v1::FinishReason r) {
  switch (r) {
    case v1::FINISH_REASON_STOP: return "stop";
    case v1::FINISH_REASON_LENGTH: return "length";
    case v1::FINISH_REASON_CANCELLED: return "cancelled";
    case v1::FINISH_REASON_ERROR: return "error";
    default: return "unspecified";
  }
}

void print_logprobs(const v1::Logprobs& lp) {
  for (const v1::LogprobEntry& e : lp.content()) {
    fmt::print(stderr, "logprob {:>8.4f}  {:>6}  {:?}", e.logprob(), e.token_id(), e.token());
    for (const v1::TopLogprob& t : e.top_logprobs()) fmt::print(stderr, "  | {:?} {:.3f}", t.token(), t.logprob());
    fmt::print(stderr, "\n");
  }
}

// The prompt's tokens after the first with their logprobs, then their sum and the perplexity exp(-mean).
void print_prompt_logprobs(const v1::PromptLogprobs& lp) {
  double sum = 0;
  for (const v1::LogprobEntry& e : lp.content()) {
    sum += e.logprob();
    fmt::print(stderr, "prompt logprob {:>8.4f}  {:>6}  {:?}", e.logprob(), e.token_id(), e.token());
    for (const v1::TopLogprob& t : e.top_logprobs()) fmt::print(stderr, "  | {:?} {:.3f}", t.token(), t.logprob());
    fmt::print(stderr, "\n");
  }
  const int n = lp.content_size();
  if (n > 0) {
    fmt::print(stderr, "[prompt] {} scored tokens, sum logprob {:.4f}, perplexity {:.4f}\n", n, sum,
               std::exp(-sum / n));
  }
}

// ---- the entropy map: terminal heat map and JSON ----

std::string json_string(std::string_view s);

// A cell's value: the head's mean entropy over its uniform maximum, in [0, 1]; negative when no key was visible.
double cell_ratio(const v1::LayerEntropy& layer, int h) {
  const float max = h < layer.head_max_size() ? layer.head_max(h) : 0.f;
  if (!(max > 0.f) || h >= layer.head_mean_size()) return -1.0;
  return std::clamp(static_cast<double>(layer.head_mean(h)) / max, 0.0, 1.0);
}

// Layer rows x head columns, two characters a head. Plain: a shade block for the fifth of [0, 1] the value is in
// (' ' under 0.2 ... '█' from 0.8), then the head's mark (o overloaded, c collapsed) or the block again. Colour: the
// xterm-256 grey ramp (232 black .. 255 white) as background, the mark in bold red.
std::string render_heat_map(const v1::AttentionEntropy& e, bool colour) {
  static const char* const kShades[] = {" ", "\u2591", "\u2592", "\u2593", "\u2588"};
  const int n_heads = e.n_heads();
  std::vector<char> mark(static_cast<size_t>(e.n_layers()) * std::max(n_heads, 0), ' ');
  const auto flag = [&](const v1::HeadIndex& i, char c) {
    if (i.layer() >= 0 && i.layer() < e.n_layers() && i.head() >= 0 && i.head() < n_heads) {
      char& m = mark[static_cast<size_t>(i.layer()) * n_heads + i.head()];
      m = m == ' ' ? c : '*';  // both (possible when ratio x head_max < collapse_nats)
    }
  };
  for (const v1::HeadIndex& i : e.health().overloaded()) flag(i, 'o');
  for (const v1::HeadIndex& i : e.health().collapsed()) flag(i, 'c');
  std::string out;
  // Head numbers: the units digit over each column, the tens digit above it when there are ten heads or more.
  if (n_heads >= 10) {
    out += "          ";
    for (int h = 0; h < n_heads; ++h) out += h >= 10 ? fmt::format("{} ", (h / 10) % 10) : std::string("  ");
    out += '\n';
  }
  out += "    head  ";
  for (int h = 0; h < n_heads; ++h) out += fmt::format("{} ", h % 10);
  out += " H/max\n";
  for (int l = 0; l < e.layers_size(); ++l) {
    const v1::LayerEntropy& layer = e.layers(l);
    out += fmt::format("  L{:<4}  ", l);
    double sum = 0, sum_max = 0;
    for (int h = 0; h < n_heads; ++h) {
      const double r = cell_ratio(layer, h);
      if (h < layer.head_mean_size()) sum += layer.head_mean(h);
      if (h < layer.head_max_size()) sum_max += layer.head_max(h);
      const char m = mark[static_cast<size_t>(l) * n_heads + h];
      if (colour) {
        const int grey = r < 0 ? 232 : 232 + static_cast<int>(std::lround(r * 23));
        out += fmt::format("\x1b[48;5;{}m", grey);
        out += m == ' ' ? std::string("  ") : fmt::format("\x1b[1;38;5;196m{} ", m);
        out += "\x1b[0m";
      } else {
        const char* shade = r < 0 ? "\u00b7" : kShades[std::min(4, static_cast<int>(r * 5))];
        out += shade;
        out += m == ' ' ? std::string(shade) : std::string(1, m);
      }
    }
    out += sum_max > 0 ? fmt::format("  {:.3f}\n", sum / sum_max) : std::string("  -\n");
  }
  const v1::AttentionHealth& hl = e.health();
  if (colour) {
    out += "  legend: H / head_max  0 ";
    for (int g = 232; g <= 255; g += 2) out += fmt::format("\x1b[48;5;{}m \x1b[0m", g);
    out += " 1";
  } else {
    out += "  legend: H / head_max  ' ' <0.2  \u2591 <0.4  \u2592 <0.6  \u2593 <0.8  \u2588 >=0.8  \u00b7 no keys";
  }
  out += fmt::format("\n          o overload (H > {} x head_max)  c collapse (H < {} nats)  * both\n",
                     hl.overload_ratio(), hl.collapse_nats());
  return out;
}

// A float as the double it is (exact: every float is a double), shortest form that reads back the same.
std::string json_number(double v) { return std::isfinite(v) ? fmt::format("{}", v) : std::string("null"); }

std::string head_list_json(const google::protobuf::RepeatedPtrField<v1::HeadIndex>& heads) {
  std::vector<std::string> items;
  for (const v1::HeadIndex& i : heads) items.push_back(fmt::format("{{\"layer\": {}, \"head\": {}}}", i.layer(), i.head()));
  return fmt::format("[{}]", fmt::join(items, ", "));
}

// The map and its health as one JSON document (scripts/entropy_heatmap.py reads it): the request's attention mode
// as asked ("" = the server's default), the token counts, then the response's fields with their proto names.
std::string entropy_json(const v1::AttentionEntropy& e, const v1::Usage& u, const std::string& attention) {
  std::string out = "{\n";
  out += fmt::format("  \"attention_mode\": {},\n", json_string(attention));
  out += fmt::format("  \"usage\": {{\"prompt_tokens\": {}, \"context_tokens\": {}, \"query_tokens\": {}, "
                     "\"completion_tokens\": {}}},\n",
                     u.prompt_tokens(), u.context_tokens(), u.query_tokens(), u.completion_tokens());
  out += fmt::format("  \"n_layers\": {},\n  \"n_heads\": {},\n  \"n_ranks\": {},\n  \"layers\": [\n", e.n_layers(),
                     e.n_heads(), std::max(1, e.n_ranks()));
  for (int l = 0; l < e.layers_size(); ++l) {
    const v1::LayerEntropy& layer = e.layers(l);
    std::vector<std::string> mean, max, rank;
    for (float v : layer.head_mean()) mean.push_back(json_number(v));
    for (float v : layer.head_max()) max.push_back(json_number(v));
    for (float v : layer.head_rank_mean()) rank.push_back(json_number(v));
    const std::string ranks = rank.empty() ? std::string()
                                           : fmt::format(", \"rank_mean\": {}, \"head_rank_mean\": [{}]",
                                                         json_number(layer.rank_mean()), fmt::join(rank, ", "));
    out += fmt::format("    {{\"mean\": {}, \"head_mean\": [{}], \"head_max\": [{}]{}}}{}\n", json_number(layer.mean()),
                       fmt::join(mean, ", "), fmt::join(max, ", "), ranks, l + 1 < e.layers_size() ? "," : "");
  }
  const v1::AttentionHealth& h = e.health();
  out += "  ],\n  \"health\": {\n";
  out += fmt::format("    \"overload_ratio\": {},\n    \"collapse_nats\": {},\n    \"n_heads_judged\": {},\n",
                     json_number(h.overload_ratio()), json_number(h.collapse_nats()), h.n_heads_judged());
  out += fmt::format("    \"overload_fraction\": {},\n    \"collapse_fraction\": {},\n",
                     json_number(h.overload_fraction()), json_number(h.collapse_fraction()));
  if (e.n_ranks() > 1) out += fmt::format("    \"rank_entropy_ratio\": {},\n", json_number(h.rank_entropy_ratio()));
  out += fmt::format("    \"overloaded\": {},\n    \"collapsed\": {}\n  }}\n}}\n", head_list_json(h.overloaded()),
                     head_list_json(h.collapsed()));
  return out;
}

// Usage, timing and entropy of the final message, on stderr; the entropy JSON to its file.
template <typename Msg>
void print_tail(const Msg& m, v1::FinishReason finish, const GenerationOptions& g) {
  const v1::Usage& u = m.usage();
  const v1::Timing& t = m.timing();
  fmt::print(stderr, "\n[finish {}] prompt {} tokens (context {}, query {}), completion {} tokens, id {}\n",
             finish_name(finish), u.prompt_tokens(), u.context_tokens(), u.query_tokens(), u.completion_tokens(),
             m.id());
  fmt::print(stderr, "[timing] queue {:.1f} ms, phase 1 {:.1f} ms, first token {:.1f} ms, {:.1f} tokens/s, total {:.1f} ms\n",
             t.queue_ms(), t.phase1_ms(), t.time_to_first_token_ms(), t.tokens_per_second(), t.total_ms());
  if (!m.context_id().empty()) {
    fmt::print(stderr, "[context] id {}, {} of {} context tokens from the cache\n", m.context_id(),
               u.cached_context_tokens(), u.context_tokens());
  }
  if (!m.has_attention_entropy()) return;
  const v1::AttentionEntropy& e = m.attention_entropy();
  if (g.entropy) {
    fmt::print(stderr, "[entropy] {} layers x {} heads, mean nats per layer (uniform = max):\n", e.n_layers(),
               e.n_heads());
    for (int l = 0; l < e.layers_size(); ++l) {
      const v1::LayerEntropy& layer = e.layers(l);
      double max_mean = 0;
      for (float v : layer.head_max()) max_mean += v;
      if (layer.head_max_size() > 0) max_mean /= layer.head_max_size();
      fmt::print(stderr, "  layer {:>3}: {:.4f} (max {:.4f})\n", l, layer.mean(), max_mean);
    }
    const v1::AttentionHealth& h = e.health();
    fmt::print(stderr, "[health] overload {:.4f} ({} of {} heads, H > {} x max), collapse {:.4f} ({} heads, H < {} nats)\n",
               h.overload_fraction(), h.overloaded_size(), h.n_heads_judged(), h.overload_ratio(),
               h.collapse_fraction(), h.collapsed_size(), h.collapse_nats());
    fmt::print(stderr, "{}", render_heat_map(e, starserve::terminal_wants_colour(fileno(stderr))));
  }
  if (!g.entropy_json.empty()) {
    std::ofstream f(g.entropy_json, std::ios::binary | std::ios::trunc);
    f << entropy_json(e, u, g.attention);
    if (!f) fmt::print(stderr, "starctl: cannot write --entropy-json {}\n", g.entropy_json);
  }
}

using Stub = v1::CompletionService::Stub;

// The two call shapes; on_message sees each response message as it arrives.
template <typename Req, typename Resp, typename OnMessage>
grpc::Status call(grpc::Status (Stub::*rpc)(grpc::ClientContext*, const Req&, Resp*), Stub& stub,
                  grpc::ClientContext& ctx, const Req& req, const OnMessage& on_message) {
  Resp resp;
  grpc::Status s = (stub.*rpc)(&ctx, req, &resp);
  if (s.ok()) on_message(resp);
  return s;
}

template <typename Req, typename Resp, typename OnMessage>
grpc::Status call(std::unique_ptr<grpc::ClientReader<Resp>> (Stub::*rpc)(grpc::ClientContext*, const Req&),
                  Stub& stub, grpc::ClientContext& ctx, const Req& req, const OnMessage& on_message) {
  auto reader = (stub.*rpc)(&ctx, req);
  Resp m;
  while (reader->Read(&m)) on_message(m);
  return reader->Finish();
}

// Every generation command: GenerationParams from the flags, the request kind's prompt parts, then one RPC.
// Text goes to stdout as it arrives (a unary response is a stream of one message), logprobs to stderr, and the
// usage and timing of the last message to stderr at the end.
template <typename Req, typename Resp, typename Rpc>
int run_generation(const ConnectionOptions& c, const GenerationOptions& given, Rpc rpc) {
  GenerationOptions g = given;
  if (g.unescape) {
    for (std::string* text : {&g.prompt, &g.query, &g.system, &g.model}) *text = unescape_bytes(*text);
    for (std::string& stop : g.stop) stop = unescape_bytes(stop);
  }
  Req req;
  set_prompt(g, &req);
  if (!g.model.empty()) req.set_model(g.model);
  *req.mutable_params() = make_params(g);
  auto stub = v1::CompletionService::NewStub(make_channel(c));
  grpc::ClientContext ctx;
  prepare_context(c, &ctx);
  if (!g.request_id.empty()) ctx.AddMetadata("x-request-id", g.request_id);
  Resp last;
  // One choice: its text as it arrives. Several: each choice's whole text at the end, under a header line.
  const bool several = g.n > 1;
  std::map<int, std::string> texts;
  std::map<int, v1::FinishReason> finishes;
  grpc::Status s = call(rpc, *stub, ctx, req, [&](const Resp& m) {
    for (const auto& choice : m.choices()) {
      const std::string& t = choice_text(choice);
      if (several) {
        texts[choice.index()] += t;
        if (choice.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) finishes[choice.index()] = choice.finish_reason();
      } else {
        std::fwrite(t.data(), 1, t.size(), stdout);
        std::fflush(stdout);
      }
      if (choice.has_logprobs()) print_logprobs(choice.logprobs());
      if (choice.has_prompt_logprobs()) print_prompt_logprobs(choice.prompt_logprobs());
    }
    last = m;
  });
  if (!s.ok()) return report_error(s);
  for (const auto& [index, text] : texts) {
    fmt::print("--- choice {} ({})\n{}\n", index, finish_name(finishes[index]), text);
  }
  if (!several) std::fputc('\n', stdout);
  print_tail(last, last.choices_size() ? last.choices(0).finish_reason() : v1::FINISH_REASON_UNSPECIFIED, g);
  return 0;
}

int run_complete(const ConnectionOptions& c, const GenerationOptions& g, bool stream) {
  if (stream) return run_generation<v1::StreamCompleteRequest, v1::StreamCompleteResponse>(c, g, &Stub::StreamComplete);
  return run_generation<v1::CompleteRequest, v1::CompleteResponse>(c, g, &Stub::Complete);
}

int run_chat(const ConnectionOptions& c, const GenerationOptions& g) {
  if (g.stream) {
    return run_generation<v1::StreamChatCompleteRequest, v1::StreamChatCompleteResponse>(c, g,
                                                                                        &Stub::StreamChatComplete);
  }
  return run_generation<v1::ChatCompleteRequest, v1::ChatCompleteResponse>(c, g, &Stub::ChatComplete);
}

std::string to_json(const google::protobuf::Message& m) {
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = true;
  options.always_print_primitive_fields = true;
  options.preserve_proto_field_names = true;
  std::string out;
  (void)google::protobuf::util::MessageToJsonString(m, &out, options);
  return out;
}

// A JSON string: quotes, backslashes and control characters escaped; the rest (UTF-8) as it is.
std::string json_string(std::string_view s) {
  std::string out = "\"";
  for (char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    if (c == '"' || c == '\\') {
      out.push_back('\\');
      out.push_back(ch);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c < 0x20) {
      out += fmt::format("\\u{:04x}", c);
    } else {
      out.push_back(ch);
    }
  }
  return out + "\"";
}

// What the response holds, one field per line: `tokens` only when the server sent them, `rendered` only for chat
// input (protobuf's JSON printer would print them empty, or drop every field that is 0).
std::string tokenize_json(const v1::TokenizeResponse& r) {
  std::vector<std::string> ids, tokens;
  for (int32_t id : r.token_ids()) ids.push_back(std::to_string(id));
  for (const std::string& t : r.tokens()) tokens.push_back(json_string(t));
  std::string out = fmt::format("{{\n  \"token_ids\": [{}],\n", fmt::join(ids, ", "));
  if (r.tokens_size() > 0) out += fmt::format("  \"tokens\": [{}],\n", fmt::join(tokens, ", "));
  out += fmt::format("  \"count\": {},\n  \"max_model_len\": {},\n  \"context_tokens\": {},\n  \"query_tokens\": {}",
                     r.count(), r.max_model_len(), r.context_tokens(), r.query_tokens());
  if (!r.rendered().empty()) out += fmt::format(",\n  \"rendered\": {}", json_string(r.rendered()));
  return out + "\n}\n";
}

int run_tokenize(const ConnectionOptions& c, const std::string& text, bool chat, bool no_special, bool ids_only) {
  v1::TokenizeRequest req;
  if (chat) {
    v1::ChatMessage* m = req.mutable_chat()->add_messages();
    m->set_role("user");
    m->set_content(text);
  } else {
    req.set_prompt(text);
    if (no_special) req.set_add_special_tokens(false);
  }
  if (!ids_only) req.set_return_token_strings(true);
  auto stub = v1::CompletionService::NewStub(make_channel(c));
  grpc::ClientContext ctx;
  prepare_context(c, &ctx);
  v1::TokenizeResponse resp;
  grpc::Status s = stub->Tokenize(&ctx, req, &resp);
  if (!s.ok()) return report_error(s);
  fmt::print("{}", tokenize_json(resp));
  return 0;
}

int run_info(const ConnectionOptions& c) {
  auto stub = v1::CompletionService::NewStub(make_channel(c));
  v1::GetModelInfoResponse model;
  v1::GetServerInfoResponse server;
  {
    grpc::ClientContext ctx;
    prepare_context(c, &ctx);
    grpc::Status s = stub->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &model);
    if (!s.ok()) return report_error(s);
  }
  {
    grpc::ClientContext ctx;
    prepare_context(c, &ctx);
    grpc::Status s = stub->GetServerInfo(&ctx, v1::GetServerInfoRequest(), &server);
    if (!s.ok()) return report_error(s);
  }
  fmt::print("{{\n\"model\": {},\n\"server\": {}}}\n", to_json(model), to_json(server));
  return 0;
}

// Abort: one line per id, "aborted ID" or "not found ID"; exit 0 when every id was aborted, 1 otherwise.
int run_abort(const ConnectionOptions& c, const std::vector<std::string>& ids) {
  auto stub = v1::CompletionService::NewStub(make_channel(c));
  v1::AbortRequest req;
  for (const std::string& id : ids) req.add_ids(id);
  v1::AbortResponse resp;
  grpc::ClientContext ctx;
  prepare_context(c, &ctx);
  grpc::Status s = stub->Abort(&ctx, req, &resp);
  if (!s.ok()) return report_error(s);
  for (const std::string& id : resp.aborted()) fmt::print("aborted {}\n", id);
  for (const std::string& id : resp.not_found()) fmt::print("not found {}\n", id);
  return resp.not_found_size() == 0 ? 0 : 1;
}

// grpc.health.v1.Health/Check without the health .proto: HealthCheckRequest is {string service = 1} and
// HealthCheckResponse is {ServingStatus status = 1}, both a single field on the wire.
int run_health(const ConnectionOptions& c, const std::string& service) {
  std::string request;
  if (!service.empty()) {
    request += '\x0a';  // field 1, length-delimited
    for (uint64_t n = service.size(); ; n >>= 7) {
      if (n < 0x80) {
        request += static_cast<char>(n);
        break;
      }
      request += static_cast<char>((n & 0x7f) | 0x80);
    }
    request += service;
  }
  grpc::Slice slice(request);
  grpc::ByteBuffer request_buffer(&slice, 1);
  grpc::GenericStub stub(make_channel(c));
  grpc::ClientContext ctx;
  prepare_context(c, &ctx);
  grpc::CompletionQueue cq;
  auto call = stub.PrepareUnaryCall(&ctx, "/grpc.health.v1.Health/Check", request_buffer, &cq);
  call->StartCall();
  grpc::ByteBuffer response_buffer;
  grpc::Status status;
  call->Finish(&response_buffer, &status, reinterpret_cast<void*>(1));
  void* tag = nullptr;
  bool ok = false;
  cq.Next(&tag, &ok);
  if (!status.ok()) return report_error(status);
  std::vector<grpc::Slice> slices;
  std::string response;
  if (response_buffer.Dump(&slices).ok()) {
    for (const grpc::Slice& s : slices) response.append(reinterpret_cast<const char*>(s.begin()), s.size());
  }
  // Only field 1 (varint) is expected; an absent field is the default, UNKNOWN.
  uint64_t value = 0;
  if (response.size() >= 2 && response[0] == '\x08') {
    int shift = 0;
    for (size_t i = 1; i < response.size() && shift < 64; ++i, shift += 7) {
      value |= static_cast<uint64_t>(response[i] & 0x7f) << shift;
      if (!(response[i] & 0x80)) break;
    }
  }
  static const char* const kStatus[] = {"UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"};
  fmt::print("{}\n", value < 4 ? kStatus[value] : "UNKNOWN");
  return value == 1 ? 0 : 1;
}

void add_generation_flags(CLI::App* cmd, GenerationOptions* g, bool completion) {
  // Options whose "unset" must reach the server as unset (proto3 optional) are remembered by name.
  const auto tracked = [cmd, g](const std::string& name, auto& var, const std::string& help = "") {
    g->given[name] = cmd->add_option(name, var, help);
  };
  cmd->add_option("--context-file", g->context_file,
                  completion ? "document encoded in phase 1 (split form; needs --query)"
                             : "document for Star Attention, placed before the message");
  if (completion) {
    cmd->add_option("--query", g->query, "question encoded in phase 2 (split form)");
    cmd->add_option("--context-id", g->context_id,
                    "a cached context, by the id a response returned ([context] line), instead of --context-file");
    cmd->add_option("--token-ids", g->prompt_token_ids, "prompt as token ids")->delimiter(',');
    cmd->add_flag("--echo", g->echo, "prepend the prompt to the output");
  } else {
    cmd->add_option("--system", g->system, "system message");
    cmd->add_flag("--stream", g->stream, "stream the reply");
  }
  tracked("--max-tokens", g->max_tokens, "tokens to generate at most");
  tracked("--temperature", g->temperature, "0 = greedy");
  tracked("--top-p", g->top_p);
  tracked("--top-k", g->top_k);
  tracked("--min-p", g->min_p);
  tracked("--repetition-penalty", g->repetition_penalty);
  tracked("--frequency-penalty", g->frequency_penalty);
  tracked("--presence-penalty", g->presence_penalty);
  tracked("--seed", g->seed);
  tracked("--n", g->n, "choices: samples of the same prompt, sharing its KV (printed one after another)");
  cmd->add_option("--stop", g->stop, "stop string (repeatable)");
  cmd->add_option("--stop-token-id", g->stop_token_ids, "stop token id (repeatable)");
  cmd->add_flag("--ignore-eos", g->ignore_eos);
  tracked("--logprobs", g->logprobs, "report the top-N logprobs per token (stderr)");
  tracked("--prompt-logprobs", g->prompt_logprobs,
          "report each prompt token's logprob with the top-N alternatives, and the prompt's perplexity (stderr)");
  cmd->add_option("--attention", g->attention, "global | exact | star (default: the server's)");
  cmd->add_option("--exact-layout", g->exact_layout,
                  "exact mode's token layout: zigzag | contiguous | auto (default: the server's)");
  tracked("--block-size", g->block_size, "context block size in tokens");
  tracked("--anchor-size", g->anchor_size, "anchor size in tokens (0 = none)");
  cmd->add_flag("--entropy", g->entropy,
                "report per-layer attention entropy, the attention health and a layer x head heat map (stderr)");
  cmd->add_option("--entropy-json", g->entropy_json,
                  "write the layer x head entropy map and its health as JSON to FILE (asks for entropy)");
  tracked("--entropy-overload-ratio", g->overload_ratio,
          "health threshold for this request: overload when H > RATIO x head_max (default: the server's)");
  tracked("--entropy-collapse-nats", g->collapse_nats,
          "health threshold for this request: collapse when H < NATS (default: the server's)");
  cmd->add_option("--model", g->model, "model name to check against the server's");
  cmd->add_option("--request-id", g->request_id,
                  "the request's id (metadata x-request-id; unique among running requests): `starctl abort` takes it");
  cmd->add_flag("--unescape", g->unescape, "\\xHH in texts is the byte HH (tests)")->group("");
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"starctl: client for the starserve gRPC server"};
  app.set_version_flag("--version", STARSERVE_VERSION);
  app.require_subcommand(1);
  ConnectionOptions c;
  app.add_option("--address", c.address, "server host:port")->capture_default_str();
  app.add_option("--api-key", c.api_key, "sent as \"authorization: Bearer <key>\"");
  app.add_flag("--tls", c.tls, "use TLS with the system's root certificates");
  app.add_option("--tls-ca", c.tls_ca, "PEM file of the CA that signed the server's certificate (implies TLS)");
  app.add_option("--tls-cert", c.tls_cert, "client certificate PEM (mutual TLS; with --tls-key)");
  app.add_option("--tls-key", c.tls_key, "client private key PEM (mutual TLS)");
  app.add_option("--timeout", c.timeout_s, "deadline in seconds (0 = none)");

  GenerationOptions complete_opts, stream_opts, chat_opts;
  CLI::App* complete = app.add_subcommand("complete", "complete a prompt (unary)");
  complete->add_option("--prompt,prompt", complete_opts.prompt, "plain prompt");
  add_generation_flags(complete, &complete_opts, true);
  CLI::App* stream = app.add_subcommand("stream", "complete a prompt, streaming the text");
  stream->add_option("--prompt,prompt", stream_opts.prompt, "plain prompt");
  add_generation_flags(stream, &stream_opts, true);
  CLI::App* chat = app.add_subcommand("chat", "reply to a user message with the model's chat template");
  chat->add_option("--prompt,message", chat_opts.prompt, "the user message");
  add_generation_flags(chat, &chat_opts, false);

  std::string tok_text;
  bool tok_chat = false, tok_no_special = false, tok_ids_only = false, tok_strings = false;
  CLI::App* tokenize = app.add_subcommand("tokenize", "token ids and texts of a text, as a completion would see them");
  tokenize->add_option("text", tok_text, "text to tokenize")->required();
  tokenize->add_flag("--chat", tok_chat, "render as a user message with the chat template first");
  tokenize->add_flag("--no-special", tok_no_special, "do not add BOS/EOS");
  tokenize->add_flag("--ids-only", tok_ids_only, "print the token ids without each token's text");
  // Token texts are printed by default now; the old flag that asked for them is kept for scripts.
  tokenize->add_flag("--strings", tok_strings, "print each token's text (the default)")->group("");

  app.add_subcommand("info", "model and server information (JSON)");

  std::vector<std::string> abort_ids;
  CLI::App* abort_cmd = app.add_subcommand("abort", "end queued or running requests by id (their output so far is "
                                                    "returned to their clients, finish reason cancelled)");
  abort_cmd->add_option("ids", abort_ids, "request ids (responses' id, or a --request-id)")->required();

  std::string health_service;
  bool health_ready = false;
  CLI::App* health = app.add_subcommand("health", "grpc.health.v1 check; exit 0 when SERVING");
  health->add_option("--service", health_service, "service name (default \"\": liveness)");
  health->add_flag("--ready", health_ready, "check readiness (starserve.v1.CompletionService)");

  CLI11_PARSE(app, argc, argv);
  try {
    if (complete->parsed()) return run_complete(c, complete_opts, /*stream=*/false);
    if (stream->parsed()) return run_complete(c, stream_opts, /*stream=*/true);
    if (chat->parsed()) return run_chat(c, chat_opts);
    if (tokenize->parsed()) return run_tokenize(c, tok_text, tok_chat, tok_no_special, tok_ids_only);
    if (app.got_subcommand("info")) return run_info(c);
    if (abort_cmd->parsed()) return run_abort(c, abort_ids);
    if (health->parsed()) {
      return run_health(c, health_ready ? std::string("starserve.v1.CompletionService") : health_service);
    }
  } catch (const UsageError& e) {
    fmt::print(stderr, "starctl: {}\n", e.what());
    return 2;
  }
  return 2;
}
