// The gRPC front end of rank 0: starserve.v1.CompletionService, grpc.health.v1.Health (server/health_service.h),
// server reflection v1 and v1alpha (server/reflection_service.h), API-key auth on all of them (server/auth.h),
// optional TLS / mutual TLS, the Prometheus endpoint, and the OpenAI-compatible HTTP API (server/openai_http.h) on
// config.http_port, which shares the key, the TLS files, the limits, the engine and this lifecycle. This header
// includes no gRPC code, so the app that wires engine and server stays free of it.
//
// Health: service "" is SERVING from start() until shutdown (liveness). "starserve.v1.CompletionService" is
// NOT_SERVING until an engine is attached and Engine::ready() (every rank has loaded the model), then SERVING until
// begin_shutdown(), set_unavailable() or shutdown(); it never turns back while requests run, however long a prefill
// takes (readiness).
//
// Lifecycle of `starserve serve` on rank 0: GrpcServer(config) and start() before the model loads (health and the
// API-key check answer; completion RPCs answer UNAVAILABLE "the model loading is under way"), attach() once the
// engine exists, begin_shutdown() when a drain starts, shutdown() and wait() at the end.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <optional>

#include "common/config.h"
#include "common/status.h"
#include "engine/engine.h"
#include "model/chat_template.h"
#include "model/tokenizer.h"

namespace starserve {

class GrpcServer {
 public:
  // No engine yet: attach() gives it.
  explicit GrpcServer(const ServerConfig& config);
  // The engine and tokenizer must outlive the server. chat_template: the template for the chat RPCs, nullopt when
  // the model has none (they answer FAILED_PRECONDITION).
  GrpcServer(const ServerConfig& config, Engine& engine, const Tokenizer& tokenizer,
             std::optional<ChatTemplate> chat_template);
  ~GrpcServer();  // shuts down if still running
  GrpcServer(const GrpcServer&) = delete;
  GrpcServer& operator=(const GrpcServer&) = delete;

  // Once, before or after start(), from any thread: completion RPCs go to `engine` from now on, readiness follows
  // engine.ready(), and the metrics endpoint (config.metrics_port) opens; its error (the port cannot be bound)
  // is returned.
  Status attach(Engine& engine, const Tokenizer& tokenizer, std::optional<ChatTemplate> chat_template);

  // Reads the TLS files, binds config.host:config.port (and the metrics port when set) and starts serving; returns
  // at once. config.host: an IPv4 address, an IPv6 address with or without brackets ("::1", "[::1]"), or a name;
  // never with a port. Errors: kInvalidArgument (inconsistent TLS settings, a host that carries a port or is no
  // address), kNotFound (unreadable PEM file), kUnavailable (an address cannot be bound).
  Status start();
  int port() const;          // the bound port (config.port 0 picks a free one)
  int metrics_port() const;  // 0 when the endpoint is off
  // The start of a drain, thread-safe: readiness NOT_SERVING and new completion RPCs UNAVAILABLE "the server is
  // shutting down"; running ones go on; liveness stays SERVING until shutdown().
  void begin_shutdown();
  // Readiness NOT_SERVING for good (a rank stopped answering); RPCs are refused by the engine. Thread-safe.
  void set_unavailable();
  // Thread-safe and idempotent. New RPCs get UNAVAILABLE, health turns NOT_SERVING, running RPCs get `grace` to
  // finish and are then cancelled (their engine requests with them).
  void shutdown(std::chrono::milliseconds grace = std::chrono::seconds(10));
  // Blocks until shutdown() has completed.
  void wait();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// start(), then wait until `stop` becomes true (polled every 100 ms, so a signal handler may set it), then
// shutdown() and wait(). Returns start()'s error, or OK after a clean shutdown.
Status run_grpc_server(const ServerConfig& config, Engine& engine, const Tokenizer& tokenizer,
                       std::optional<ChatTemplate> chat_template, const std::atomic<bool>& stop);

}  // namespace starserve
