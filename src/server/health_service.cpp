#include "server/health_service.h"

#include <fmt/format.h>

namespace starserve {

using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;

HealthService::HealthService(std::shared_ptr<const ApiKeyCheck> api_key, bool without_key)
    : CheckedService("grpc.health.v1.Health"), api_key_(std::move(api_key)), without_key_(without_key) {
  add_unary("Check", &HealthService::Check);
  add_server_streaming("Watch", &HealthService::Watch);
  check_all_registered();
}

grpc::Status HealthService::admit(const grpc::ServerContext* ctx) const {
  if (without_key_ || !api_key_) return grpc::Status::OK;
  return api_key_->check(ctx->client_metadata());
}

void HealthService::set_serving(const std::string& service, bool serving) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (shut_down_) return;
    serving_[service] = serving;
  }
  changed_.notify_all();
}

void HealthService::shutdown() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    shut_down_ = true;
    for (auto& [name, serving] : serving_) serving = false;
  }
  changed_.notify_all();
}

HealthService::ServingStatus HealthService::status_of(const std::string& service) const {
  const auto it = serving_.find(service);
  if (it == serving_.end()) return HealthCheckResponse::SERVICE_UNKNOWN;
  return it->second ? HealthCheckResponse::SERVING : HealthCheckResponse::NOT_SERVING;
}

grpc::Status HealthService::Check(grpc::ServerContext* ctx, const HealthCheckRequest* request,
                                  HealthCheckResponse* response) {
  if (grpc::Status s = admit(ctx); !s.ok()) return s;
  std::lock_guard<std::mutex> lock(mu_);
  const ServingStatus status = status_of(request->service());
  if (status == HealthCheckResponse::SERVICE_UNKNOWN) {
    return grpc::Status(grpc::StatusCode::NOT_FOUND, fmt::format("unknown service \"{}\" (known: \"\" for liveness, "
                                                                 "starserve.v1.CompletionService for readiness)",
                                                                 request->service()));
  }
  response->set_status(status);
  return grpc::Status::OK;
}

grpc::Status HealthService::Watch(grpc::ServerContext* ctx, const HealthCheckRequest* request,
                                  grpc::ServerWriter<HealthCheckResponse>* writer) {
  if (grpc::Status s = admit(ctx); !s.ok()) return s;
  bool sent = false;
  ServingStatus last = HealthCheckResponse::UNKNOWN;
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    const ServingStatus now = status_of(request->service());
    if (!sent || now != last) {
      sent = true;
      last = now;
      HealthCheckResponse response;
      response.set_status(now);
      lock.unlock();
      if (!writer->Write(response)) return grpc::Status(grpc::StatusCode::CANCELLED, "the client is gone");
      lock.lock();
      continue;  // the status may have changed while writing
    }
    if (shut_down_) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "the server is shutting down");
    if (ctx->IsCancelled()) return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client");
    changed_.wait_for(lock, kHealthPollInterval);
  }
}

}  // namespace starserve
