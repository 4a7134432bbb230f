#include "server/grpc_server.h"

#include <algorithm>
#include <condition_variable>
#include <fstream>
#include <mutex>
#include <sstream>
#include <thread>

#include <arpa/inet.h>

#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/server_credentials.h>

#include "common/log.h"
#include "server/auth.h"
#include "server/completion_service.h"
#include "server/health_service.h"
#include "server/metrics.h"
#include "server/openai_http.h"
#include "server/reflection_service.h"

namespace starserve {
namespace {

constexpr char kReadinessService[] = "starserve.v1.CompletionService";

Result<std::string> read_pem(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return not_found("cannot read {} file {}", what, path);
  std::stringstream ss;
  ss << in.rdbuf();
  if (ss.str().empty()) return invalid_argument("{} file {} is empty", what, path);
  return ss.str();
}

// The host to listen on, without brackets: an IPv4 address ("0.0.0.0", "127.0.0.1"), an IPv6 address with or
// without brackets ("::", "::1", "[::1]", "fe80::1%eth0"), or a name ("localhost"). A host that carries a port
// ("127.0.0.1:50051") is refused: the port is ServerConfig.port.
Result<std::string> parse_host(const std::string& host) {
  if (host.empty()) return invalid_argument("host is empty (e.g. 0.0.0.0, 127.0.0.1, ::, ::1 or a name)");
  std::string bare = host;
  if (host.front() == '[') {
    if (host.back() != ']') {
      return invalid_argument("host = \"{}\": a bracketed IPv6 address takes no port here (the port is --port)", host);
    }
    bare = host.substr(1, host.size() - 2);
  }
  if (bare.find(':') != std::string::npos) {
    const std::string address = bare.substr(0, bare.find('%'));  // a zone index (%eth0) is not part of the address
    in6_addr parsed{};
    if (inet_pton(AF_INET6, address.c_str(), &parsed) != 1) {
      return invalid_argument("host = \"{}\" is neither an IPv6 address nor a name; give the port with --port, not "
                              "in --host",
                              host);
    }
  }
  return bare;
}

// A gRPC address (and the address in log lines): IPv6 literals need brackets.
std::string listen_address(const std::string& bare_host, int port) {
  if (bare_host.find(':') != std::string::npos) return fmt::format("[{}]:{}", bare_host, port);
  return fmt::format("{}:{}", bare_host, port);
}

Result<std::shared_ptr<grpc::ServerCredentials>> make_credentials(const ServerConfig& config) {
  const bool has_cert = !config.tls_cert.empty(), has_key = !config.tls_key.empty();
  if (has_cert != has_key) {
    return invalid_argument("TLS needs both tls_cert and tls_key (got only {})", has_cert ? "tls_cert" : "tls_key");
  }
  if (!has_cert) {
    if (!config.tls_client_ca.empty()) return invalid_argument("tls_client_ca (mutual TLS) needs tls_cert and tls_key");
    return grpc::InsecureServerCredentials();
  }
  SS_ASSIGN_OR_RETURN(std::string cert, read_pem(config.tls_cert, "tls_cert"));
  SS_ASSIGN_OR_RETURN(std::string key, read_pem(config.tls_key, "tls_key"));
  grpc::SslServerCredentialsOptions options;
  options.pem_key_cert_pairs.push_back({std::move(key), std::move(cert)});
  if (!config.tls_client_ca.empty()) {
    SS_ASSIGN_OR_RETURN(options.pem_root_certs, read_pem(config.tls_client_ca, "tls_client_ca"));
    // Mutual TLS: a client without a certificate signed by this CA fails the handshake.
    options.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  return grpc::SslServerCredentials(options);
}

}  // namespace

struct GrpcServer::Impl {
  explicit Impl(const ServerConfig& c)
      : config(c),
        api_key(std::make_shared<ApiKeyCheck>(c.api_key)),
        service(c, api_key, &metrics, &requests),
        health(api_key, c.health_without_key),
        reflection_v1("grpc.reflection.v1.ServerReflection", service_names(), api_key),
        reflection_v1alpha("grpc.reflection.v1alpha.ServerReflection", service_names(), api_key),
        http_api(c, api_key, &metrics, &requests) {}

  static std::vector<std::string> service_names() {
    return {"starserve.v1.CompletionService", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"};
  }

  void watch_readiness();
  Status start_metrics();

  const ServerConfig config;
  std::atomic<Engine*> engine{nullptr};  // set once by attach()
  ServerMetrics metrics;
  std::shared_ptr<const ApiKeyCheck> api_key;
  RequestRegistry requests;  // both front ends' running requests, for Abort
  CompletionService service;
  HealthService health;
  ReflectionServiceV1 reflection_v1;
  ReflectionServiceV1alpha reflection_v1alpha;
  std::unique_ptr<grpc::Server> server;
  MetricsHttpServer metrics_http;
  OpenAiHttpServer http_api;  // started when config.http_port > 0
  int port = 0;
  std::string host;  // bare, as listened on

  std::mutex mu;
  std::condition_variable cv;
  bool stopping = false;   // guarded by mu
  bool admitting = true;   // guarded by mu: false after begin_shutdown() or set_unavailable()
  bool shut_down = false;  // guarded by mu: shutdown() has finished
  std::thread readiness;
};

void GrpcServer::Impl::watch_readiness() {
  // Polled because the Engine interface has no readiness callback; 100 ms is far below any model load time.
  std::unique_lock<std::mutex> lock(mu);
  while (!stopping && admitting) {
    Engine* e = engine.load();
    if (e && e->ready()) {
      health.set_serving(kReadinessService, true);
      log_info("model ready on every rank: {} is SERVING", kReadinessService);
      return;
    }
    cv.wait_for(lock, std::chrono::milliseconds(100));
  }
}

Status GrpcServer::Impl::start_metrics() {
  if (config.metrics_port <= 0) return Status();
  // The metric names, types and help texts have one home: server/metrics.cpp.
  metrics.register_engine(*engine.load());
  return metrics_http.start(host, config.metrics_port, [this] { return metrics.registry().render(); });
}

GrpcServer::GrpcServer(const ServerConfig& config) : impl_(std::make_unique<Impl>(config)) {}

GrpcServer::GrpcServer(const ServerConfig& config, Engine& engine, const Tokenizer& tokenizer,
                       std::optional<ChatTemplate> chat_template)
    : GrpcServer(config) {
  impl_->http_api.attach(engine, tokenizer, chat_template);
  impl_->service.attach(engine, tokenizer, std::move(chat_template));
  impl_->engine.store(&engine);
}

Status GrpcServer::attach(Engine& engine, const Tokenizer& tokenizer, std::optional<ChatTemplate> chat_template) {
  Impl& m = *impl_;
  SS_CHECK(!m.engine.load(), "GrpcServer::attach called twice");
  m.http_api.attach(engine, tokenizer, chat_template);
  m.service.attach(engine, tokenizer, std::move(chat_template));
  m.engine.store(&engine);
  m.cv.notify_all();
  if (!m.server) return Status();  // start() opens the metrics endpoint
  Status s = m.start_metrics();
  if (s.ok() && m.config.metrics_port > 0) {
    log_info("metrics on http://{}/metrics", listen_address(m.host, m.metrics_http.port()));
  }
  return s;
}

GrpcServer::~GrpcServer() {
  if (impl_->server) {
    shutdown(std::chrono::seconds(0));
    wait();
  }
}

Status GrpcServer::start() {
  Impl& m = *impl_;
  SS_CHECK(!m.server, "GrpcServer::start called twice");
  const ServerConfig& c = m.config;
  if (c.port < 0 || c.port > 65535) return invalid_argument("port = {} must be in [0, 65535]", c.port);
  if (c.metrics_port < 0 || c.metrics_port > 65535) {
    return invalid_argument("metrics_port = {} must be in [0, 65535] (0 = off)", c.metrics_port);
  }
  if (c.http_port < 0 || c.http_port > 65535) {
    return invalid_argument("http_port = {} must be in [0, 65535] (0 = off)", c.http_port);
  }
  if (c.max_message_bytes < 1024) {
    return invalid_argument("max_message_bytes = {} must be at least 1024", c.max_message_bytes);
  }
  SS_ASSIGN_OR_RETURN(std::string bare_host, parse_host(c.host));
  m.host = std::move(bare_host);
  const std::string& host = m.host;
  SS_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> credentials, make_credentials(c));

  // Health and reflection are this server's own services (they check the API key); gRPC's default health service
  // (a process-wide switch read by ServerBuilder) stays off.
  grpc::EnableDefaultHealthCheckService(false);

  grpc::ServerBuilder builder;
  const std::string address = listen_address(host, c.port);
  builder.AddListeningPort(address, credentials, &m.port);
  builder.SetMaxReceiveMessageSize(c.max_message_bytes);
  builder.SetMaxSendMessageSize(c.max_message_bytes);
  // gRPC sets SO_REUSEPORT by default, which lets a second server bind the same port silently and share its
  // traffic; a port in use must be an error instead.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.RegisterService(&m.service);
  builder.RegisterService(&m.health);
  builder.RegisterService(&m.reflection_v1);
  builder.RegisterService(&m.reflection_v1alpha);
  m.server = builder.BuildAndStart();
  if (!m.server || m.port == 0) {
    m.server.reset();
    return unavailable("cannot listen for gRPC on {} (address in use, or not an address of this host)", address);
  }
  m.health.set_serving("", true);
  m.health.set_serving(kReadinessService, false);

  // The metrics endpoint reads the engine: it opens once one is attached (here, or in attach()).
  if (m.engine.load()) {
    Status s = m.start_metrics();
    if (!s.ok()) {
      m.server->Shutdown();
      m.server->Wait();
      m.server.reset();
      return s;
    }
  }
  if (c.http_port > 0) {
    Status s = m.http_api.start(host);
    if (!s.ok()) {
      m.metrics_http.stop();
      m.server->Shutdown();
      m.server->Wait();
      m.server.reset();
      return s;
    }
  }
  m.readiness = std::thread([&m] { m.watch_readiness(); });
  log_info("gRPC listening on {} (TLS {}, API key {}{}){}{}", listen_address(host, m.port),
           c.tls_cert.empty() ? "off" : (c.tls_client_ca.empty() ? "on" : "on, client certificates required"),
           m.api_key->enabled() ? "required" : "off",
           m.api_key->enabled() ? (c.health_without_key ? ", health exempt" : ", health included") : "",
           m.metrics_http.port() > 0
               ? fmt::format("; metrics on http://{}/metrics", listen_address(host, m.metrics_http.port()))
               : std::string(),
           m.engine.load() ? "" : "; model loading");
  if (m.http_api.port() > 0) {
    log_info("OpenAI-compatible HTTP API on {}://{}/v1", c.tls_cert.empty() ? "http" : "https",
             listen_address(host, m.http_api.port()));
  }
  return Status();
}

int GrpcServer::port() const { return impl_->port; }
int GrpcServer::metrics_port() const { return impl_->metrics_http.port(); }

void GrpcServer::begin_shutdown() {
  Impl& m = *impl_;
  {
    std::lock_guard<std::mutex> lock(m.mu);
    m.admitting = false;
  }
  m.cv.notify_all();
  m.service.begin_shutdown();
  m.http_api.begin_shutdown();
  m.health.set_serving(kReadinessService, false);
}

void GrpcServer::set_unavailable() {
  Impl& m = *impl_;
  {
    std::lock_guard<std::mutex> lock(m.mu);
    m.admitting = false;
  }
  m.cv.notify_all();
  m.http_api.begin_shutdown();
  m.health.set_serving(kReadinessService, false);
}

void GrpcServer::shutdown(std::chrono::milliseconds grace) {
  Impl& m = *impl_;
  {
    std::lock_guard<std::mutex> lock(m.mu);
    if (m.stopping || !m.server) return;
    m.stopping = true;
  }
  m.cv.notify_all();
  log_info("gRPC server shutting down ({} ms for running requests)", grace.count());
  m.service.begin_shutdown();
  m.http_api.begin_shutdown();
  m.health.shutdown();  // every service NOT_SERVING, for load balancers; Watch calls end
  // Stops accepting, waits for running RPCs until the deadline, then cancels them: the handlers see IsCancelled and
  // cancel their engine requests.
  m.server->Shutdown(std::chrono::system_clock::now() + grace);
  if (m.readiness.joinable()) m.readiness.join();
  m.http_api.stop(grace);
  m.metrics_http.stop();
  {
    std::lock_guard<std::mutex> lock(m.mu);
    m.shut_down = true;
  }
  m.cv.notify_all();
}

void GrpcServer::wait() {
  Impl& m = *impl_;
  if (!m.server) return;
  {
    std::unique_lock<std::mutex> lock(m.mu);
    m.cv.wait(lock, [&m] { return m.shut_down; });
  }
  m.server->Wait();
}

Status run_grpc_server(const ServerConfig& config, Engine& engine, const Tokenizer& tokenizer,
                       std::optional<ChatTemplate> chat_template, const std::atomic<bool>& stop) {
  GrpcServer server(config, engine, tokenizer, std::move(chat_template));
  SS_RETURN_IF_ERROR(server.start());
  while (!stop.load()) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  server.shutdown();
  server.wait();
  return Status();
}

}  // namespace starserve
