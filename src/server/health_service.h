// grpc.health.v1.Health, implemented here rather than by gRPC's default service so that it answers like every
// other service of this server: with an API key set, a call without it ends UNAUTHENTICATED. (gRPC's own service
// runs before any code of ours; an interceptor can rewrite a unary answer but cannot stop a Watch stream, which then
// ends CANCELLED.) `without_key` exempts health from the key, for orchestrator probes that cannot send it.
//
// Service names and their status: "" (liveness) and starserve.v1.CompletionService (readiness), set by GrpcServer.
// Check answers NOT_FOUND for a name never set. Watch sends the status at once (SERVICE_UNKNOWN for a name never
// set), then every change, until the client ends the call or shutdown() (NOT_SERVING, then UNAVAILABLE).
// Threads: Watch holds one gRPC thread per call, waking every kHealthPollInterval to see a cancellation (the
// synchronous API has no cancellation callback), as CompletionService's streams do.
#pragma once

#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "grpc/health/v1/health.pb.h"
#include "server/auth.h"
#include "server/checked_service.h"

namespace starserve {

inline constexpr std::chrono::milliseconds kHealthPollInterval{100};

class HealthService final : public CheckedService<HealthService> {
 public:
  // api_key may be null or disabled (no key): then every call is admitted.
  HealthService(std::shared_ptr<const ApiKeyCheck> api_key, bool without_key);

  // Thread-safe. Ignored after shutdown().
  void set_serving(const std::string& service, bool serving);
  // Every service NOT_SERVING from now on; running Watch calls send it and end.
  void shutdown();

  grpc::Status Check(grpc::ServerContext* ctx, const grpc::health::v1::HealthCheckRequest* request,
                     grpc::health::v1::HealthCheckResponse* response);
  grpc::Status Watch(grpc::ServerContext* ctx, const grpc::health::v1::HealthCheckRequest* request,
                     grpc::ServerWriter<grpc::health::v1::HealthCheckResponse>* writer);

 private:
  using ServingStatus = grpc::health::v1::HealthCheckResponse::ServingStatus;
  grpc::Status admit(const grpc::ServerContext* ctx) const;
  ServingStatus status_of(const std::string& service) const;  // mu_ held; SERVICE_UNKNOWN when never set

  const std::shared_ptr<const ApiKeyCheck> api_key_;
  const bool without_key_;
  mutable std::mutex mu_;
  std::condition_variable changed_;
  std::map<std::string, bool> serving_;  // guarded by mu_
  bool shut_down_ = false;               // guarded by mu_
};

}  // namespace starserve
