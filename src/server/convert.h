// The edge between protobuf and the engine: requests are parsed into native types here (tokenized, validated
// against the server's limits) and engine results are written back into responses. How a plain prompt is split
// into context and query is the engine's decision, not this file's.
// Nothing past this file sees a protobuf type. All functions are pure apart from tokenizing, so they run on the
// RPC's thread before the engine is involved.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include <grpcpp/grpcpp.h>

#include "common/config.h"
#include "common/status.h"
#include "engine/engine.h"
#include "model/chat_template.h"
#include "model/tokenizer.h"
#include "server/attention_health.h"
#include "starserve/v1/completion.pb.h"

namespace starserve {

// What validation needs to know; built per RPC from ServerConfig and Engine::info().
struct RequestLimits {
  std::string model_name;     // a request's non-empty `model` must equal it
  int max_context = 0;        // tokens per request (prompt + generated); 0 = not bounded here
  int max_prompt_tokens = 0;  // context + query tokens; 0 = not bounded here
  // Bytes of prompt text (prompt, split context + query, chat contents + document), checked before tokenizing: a
  // text longer than this cannot fit in max_prompt_tokens (see make_request_limits). 0 = not bounded here.
  int64_t max_prompt_bytes = 0;
  int max_token_bytes = 0;    // the vocabulary's longest token in bytes (for the messages)
  // The largest response; bounds prompt log-probabilities (max_prompt_logprob_bytes). 0 = not bounded here.
  int64_t max_message_bytes = 0;
  int max_tokens_limit = 0;   // upper bound of max_tokens
  int max_stop_strings = 0;
  int max_stop_string_bytes = 0;
  int n_vocab = 0;            // bounds prompt_token_ids, stop_token_ids, top_k
  AttentionMode default_mode = AttentionMode::kStar;  // for attention_mode = UNSPECIFIED
  HealthThresholds health;    // ServerConfig's entropy thresholds, for requests that set none
};

// max_prompt_bytes = max_prompt_tokens x max_token_bytes. Every byte of a text is covered by exactly one of its
// tokens and no token covers more than max_token_bytes bytes, so a text of more bytes has more than
// max_prompt_tokens tokens and would be refused once tokenized: the byte check refuses nothing the token check would
// accept, and turns away an oversized prompt before the tokenizer spends time on it. (A configured byte limit could
// be tighter, but would refuse prompts of long tokens that fit; this one needs no setting and follows the token limit.)
// max_token_bytes: longest_token_bytes(tokenizer), computed once by the caller.
RequestLimits make_request_limits(const ServerConfig& config, const EngineInfo& info, const Tokenizer& tokenizer,
                                  int max_token_bytes);
// The longest token of the vocabulary in bytes (control and added tokens included), at least 1.
int longest_token_bytes(const Tokenizer& tokenizer);

struct PreparedRequest {
  EngineRequest engine;
  std::string echo_text;  // completion with echo: the prompt text the output starts with
  // The request's entropy thresholds (else the server's), for the health of the entropy map it may ask for.
  HealthThresholds health;
};

// The four generation requests (CompleteRequest, StreamCompleteRequest, ChatCompleteRequest,
// StreamChatCompleteRequest) take one path: `model` and the GenerationParams are checked, the request's own prompt
// builder turns its input into tokens, then the GenerationParams fill EngineRequest's sampling and Star fields.
// Prompt builders: a plain prompt (text, token ids, or a chat without a document) goes whole into
// EngineRequest::query with split_prompt set, and the engine decides its context/query split; an explicit split
// (SplitPrompt, or a chat document) is kept as given. chat_template: required by the chat requests (the caller
// answers FAILED_PRECONDITION when the model has none), unused by the others. Every error is kInvalidArgument
// naming the field and the limit (kNotFound for an unknown `model`). Instantiated in convert.cpp for those four.
template <typename Request>
Result<PreparedRequest> prepare_request(const Request& request, const Tokenizer& tokenizer,
                                        const ChatTemplate* chat_template, const RequestLimits& limits);

// Tokenize: chat_template may be null (then chat input is kUnimplemented). The ids are what the engine would get
// for the same prompt or conversation.
Result<v1::TokenizeResponse> tokenize(const v1::TokenizeRequest& request, const Tokenizer& tokenizer,
                                      const ChatTemplate* chat_template, const RequestLimits& limits);

// ---- results -> proto ----
v1::FinishReason to_proto(FinishReason reason);
v1::AttentionMode to_proto(AttentionMode mode);
v1::ExactLayout to_proto(ExactLayout layout);
void fill_usage(const EngineUsage& usage, v1::Usage* out);
// total_ms: the server's own measure from the RPC's arrival.
void fill_timing(const EngineTiming& timing, double total_ms, v1::Timing* out);
// The map, and with health its AttentionHealth (attention_health of the same map).
void fill_entropy(const EntropyStats& entropy, const AttentionHealth* health, v1::AttentionEntropy* out);
void fill_health(const AttentionHealth& health, v1::AttentionHealth* out);
void append_logprobs(const TokenLogprobs& logprobs, const Tokenizer& tokenizer, v1::Logprobs* out);
// EngineEvent::prompt_logprobs -> the choice's prompt_logprobs.
void fill_prompt_logprobs(const std::vector<TokenLogprobs>& logprobs, const Tokenizer& tokenizer,
                          v1::PromptLogprobs* out);
// An upper bound of the encoded size of prompt log-probabilities for n_prompt tokens with top_n alternatives each:
// per value (the entry's own and each alternative's) an id, a logprob, the token's bytes and its text (a byte that
// is not valid UTF-8 becomes U+FFFD, 3 bytes), with their field headers.
int64_t max_prompt_logprob_bytes(int64_t n_prompt, int top_n, int max_token_bytes);

// ---- status ----
// Engine/validation codes -> gRPC codes (kOutOfRange -> OUT_OF_RANGE, kResourceExhausted -> RESOURCE_EXHAUSTED ...).
grpc::Status to_grpc_status(const Status& status);
// "OK", "INVALID_ARGUMENT", ...: the label of starserve_requests_total{status}.
std::string_view grpc_code_name(grpc::StatusCode code);

}  // namespace starserve
