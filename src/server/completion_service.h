// starserve.v1.CompletionService on the synchronous gRPC API: one gRPC thread per RPC, which converts the request
// at the edge (server/convert.h), submits it to the Engine and waits for its events on a per-RPC queue. The methods
// are registered through CheckedService (server/checked_service.h), so a request that does not parse (a string
// field with invalid UTF-8) is answered INVALID_ARGUMENT naming the field.
//
// Threads: handlers run on gRPC's threads. Engine events arrive on the engine's thread and are only appended to
// the RPC's queue there (the engine requires its callbacks not to block); the RPC thread drains the queue, writes
// responses, and polls ServerContext::IsCancelled every kCancelPollInterval so that a client cancellation or an
// expired deadline reaches Engine::cancel within that time.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "common/config.h"
#include "engine/engine.h"
#include "model/chat_template.h"
#include "model/tokenizer.h"
#include "server/auth.h"
#include "server/checked_service.h"
#include "server/convert.h"
#include "server/metrics.h"
#include "server/request_registry.h"
#include "starserve/v1/completion.pb.h"

namespace starserve {

inline constexpr std::chrono::milliseconds kCancelPollInterval{50};
// The metadata key of a client-chosen request id (gRPC keys are lower case), and Abort's most ids per call.
inline constexpr char kRequestIdMetadata[] = "x-request-id";
inline constexpr int kMaxAbortIds = 1024;

class CompletionService final : public CheckedService<CompletionService> {
 public:
  // Without a model: every RPC answers UNAVAILABLE "the model loading is under way" (after the API-key check)
  // until attach(). metrics may be null. registry: the running requests Abort can reach, shared with the other
  // front ends (null = the service's own).
  CompletionService(const ServerConfig& config, std::shared_ptr<const ApiKeyCheck> api_key, ServerMetrics* metrics,
                    RequestRegistry* registry = nullptr);
  // Attached at once. chat_template: nullopt = the chat RPCs answer FAILED_PRECONDITION.
  CompletionService(const ServerConfig& config, Engine& engine, const Tokenizer& tokenizer,
                    std::optional<ChatTemplate> chat_template, std::shared_ptr<const ApiKeyCheck> api_key,
                    ServerMetrics* metrics, RequestRegistry* registry = nullptr);
  // Once, from any thread, while RPCs run: from now on they go to `engine` (which must outlive the service).
  void attach(Engine& engine, const Tokenizer& tokenizer, std::optional<ChatTemplate> chat_template);

  grpc::Status Complete(grpc::ServerContext* ctx, const v1::CompleteRequest* request,
                        v1::CompleteResponse* response);
  grpc::Status StreamComplete(grpc::ServerContext* ctx, const v1::StreamCompleteRequest* request,
                              grpc::ServerWriter<v1::StreamCompleteResponse>* writer);
  grpc::Status ChatComplete(grpc::ServerContext* ctx, const v1::ChatCompleteRequest* request,
                            v1::ChatCompleteResponse* response);
  grpc::Status StreamChatComplete(grpc::ServerContext* ctx, const v1::StreamChatCompleteRequest* request,
                                  grpc::ServerWriter<v1::StreamChatCompleteResponse>* writer);
  grpc::Status Tokenize(grpc::ServerContext* ctx, const v1::TokenizeRequest* request,
                        v1::TokenizeResponse* response);
  grpc::Status GetModelInfo(grpc::ServerContext* ctx, const v1::GetModelInfoRequest* request,
                            v1::GetModelInfoResponse* response);
  grpc::Status GetServerInfo(grpc::ServerContext* ctx, const v1::GetServerInfoRequest* request,
                             v1::GetServerInfoResponse* response);
  // Answers during a drain too (the ids it names may be draining); only the API key is checked.
  grpc::Status Abort(grpc::ServerContext* ctx, const v1::AbortRequest* request, v1::AbortResponse* response);

  // From now on new RPCs answer UNAVAILABLE; running ones go on until grpc::Server::Shutdown's deadline cancels
  // them (which reaches the engine through the cancellation poll).
  void begin_shutdown() { shutting_down_.store(true); }

 private:
  using Clock = std::chrono::steady_clock;
  // Token events that arrived together, handed to the RPC's writer; false = the client is gone.
  using TokenSink = std::function<bool(const std::vector<EngineEvent>& tokens)>;

  // Key, shutdown and (needs_ready) readiness checks, in that order, before any work.
  grpc::Status admit(const grpc::ServerContext* ctx, bool needs_ready) const;
  RequestLimits limits(const EngineInfo& info) const;
  // Submits the request and pumps its events until each of its n choices finished (OK, (*finished)[c] set) or the
  // client cancels, its deadline passes or a write fails (non-OK; the engine request is cancelled). Token events
  // carry their choice.
  // `handle` (the request's public id) is bound to the engine request once submitted, so Abort reaches it.
  grpc::Status generate(grpc::ServerContext* ctx, PreparedRequest& prepared, Clock::time_point rpc_start,
                        const TokenSink& sink, std::vector<EngineEvent>* finished, RequestRegistry::Handle& handle);
  // The id a generation RPC's responses carry, registered: the client's `x-request-id` or a new "prefix-…" one.
  // INVALID_ARGUMENT for a malformed x-request-id, ALREADY_EXISTS when a running request has it.
  grpc::Status register_id(const grpc::ServerContext* ctx, std::string_view prefix, RequestRegistry::Handle* handle);
  // The RPC's final status given the engine's finish event.
  grpc::Status finish_status(const grpc::ServerContext* ctx, const EngineEvent& finished) const;
  void record_finish(const std::vector<EngineEvent>& choices, Clock::time_point rpc_start);
  grpc::Status done(std::string_view rpc, grpc::Status status);
  std::string new_id(std::string_view prefix);

  // The four generation RPCs: Request is one of their request types; Out is the unary response or the stream's
  // writer. Admission, conversion, generation and the final usage/timing are the same for all four.
  template <typename Request, typename Out>
  grpc::Status serve_generation(grpc::ServerContext* ctx, const Request& request, Out* out);

  // What attach() gives; set once, then immutable.
  struct Attached {
    Engine& engine;
    const Tokenizer tokenizer;  // copies share the immutable tables
    const std::optional<ChatTemplate> chat_template;
    int max_token_bytes;  // longest_token_bytes(tokenizer), for the prompt byte bound
  };
  // Only after admit() succeeded (which checks that the model is attached).
  const Attached* attached() const { return attached_.load(); }
  Engine& engine() const { return attached()->engine; }
  const Tokenizer& tokenizer() const { return attached()->tokenizer; }
  const std::optional<ChatTemplate>& chat_template() const { return attached()->chat_template; }

  const ServerConfig config_;
  std::unique_ptr<Attached> attached_owner_;
  std::atomic<const Attached*> attached_{nullptr};
  const std::shared_ptr<const ApiKeyCheck> api_key_;
  ServerMetrics* const metrics_;
  std::atomic<bool> shutting_down_{false};
  RequestRegistry own_registry_;
  RequestRegistry* const registry_;
  std::mutex id_mu_;
  std::mt19937_64 id_rng_;  // response ids (guarded by id_mu_)
};

}  // namespace starserve
