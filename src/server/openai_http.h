// The OpenAI-compatible HTTP API of rank 0, on ServerConfig.http_port (cpp-httplib; HTTPS with the gRPC server's
// tls_cert / tls_key, client certificates with tls_client_ca):
//   POST /v1/completions, POST /v1/chat/completions   (stream: Server-Sent Events, `data: {...}` then `data: [DONE]`)
//   GET  /v1/models, GET /v1/models/{id}
//   GET  /health (liveness), GET /health/ready (200 once every rank has the model, else 503)
// A request body is translated into the gRPC request message (CompleteRequest / ChatCompleteRequest) and goes through
// the same prepare_request (server/convert.h) and the same Engine as the gRPC CompletionService, so validation, chat
// rendering, limits and outputs are the gRPC ones. Fields OpenAI lacks carry the gRPC names in the body: top_k, min_p,
// repetition_penalty, stop_token_ids, ignore_eos, attention_mode ("global" | "exact" | "star"), block_size,
// anchor_size, return_attention_entropy, prompt_logprobs, and `context` (the document: with it a completion's prompt
// is the query of a {context, query} split, a chat places it as ChatCompleteRequest.context does).
// Errors are OpenAI's {"error": {"message", "type", "param", "code"}} with the HTTP status of the failure (400, 401,
// 404, 413, 429, 503, 500). The API key is the gRPC one (`Authorization: Bearer <key>`), health included unless
// health_without_key.
//
// Threads: a pool of config.http_threads workers answers; a request holds its worker until it is answered (a stream
// until [DONE]). Engine events are appended to the request's queue on the engine thread and written by the worker;
// a write that fails (the client is gone) cancels the engine request. A unary request whose client leaves is not
// noticed before its answer is written (HTTP/1.1 gives no signal without a write), so it runs to its end.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "common/config.h"
#include "common/status.h"
#include "engine/engine.h"
#include "model/chat_template.h"
#include "model/tokenizer.h"
#include "server/auth.h"
#include "server/metrics.h"
#include "server/request_registry.h"

namespace httplib {
class Server;
}

namespace starserve {

class OpenAiHttpServer {
 public:
  // metrics may be null; api_key may be disabled. registry: the running requests gRPC's Abort reaches (null = the
  // server's own). A request's id is its X-Request-Id header when sent (echoed in the response's header).
  OpenAiHttpServer(const ServerConfig& config, std::shared_ptr<const ApiKeyCheck> api_key, ServerMetrics* metrics,
                   RequestRegistry* registry = nullptr);
  ~OpenAiHttpServer();  // stop()
  OpenAiHttpServer(const OpenAiHttpServer&) = delete;
  OpenAiHttpServer& operator=(const OpenAiHttpServer&) = delete;

  // Binds host:config.http_port (host bare, as the gRPC server listens) and serves from a thread of its own.
  // Errors: kInvalidArgument (TLS files httplib cannot load), kUnavailable (the port cannot be bound).
  Status start(const std::string& host);
  int port() const { return port_; }
  // Once, from any thread: generation goes to `engine` (which must outlive the server) from now on.
  void attach(Engine& engine, const Tokenizer& tokenizer, std::optional<ChatTemplate> chat_template);
  // New generation requests answer 503 and readiness turns 503; running ones go on. Thread-safe.
  void begin_shutdown() { admitting_.store(false); }
  // Running requests still waiting for the engine after `grace` are cancelled, then the server stops and its
  // workers are joined. Idempotent.
  void stop(std::chrono::milliseconds grace = std::chrono::milliseconds(0));

  struct Attached;
  struct Request;

 private:
  void install_routes();

  const ServerConfig config_;
  const std::shared_ptr<const ApiKeyCheck> api_key_;
  ServerMetrics* const metrics_;
  RequestRegistry own_registry_;
  RequestRegistry* const registry_;
  std::unique_ptr<Attached> attached_owner_;
  std::atomic<const Attached*> attached_{nullptr};
  std::atomic<bool> admitting_{true};
  // Set by stop() once its grace is over: pumps cancel their engine requests and end.
  std::atomic<bool> abandon_{false};
  std::unique_ptr<httplib::Server> http_;
  int port_ = 0;
  std::thread thread_;  // httplib's accept loop until stop()
  int64_t started_unix_ = 0;
};

}  // namespace starserve
