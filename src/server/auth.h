// API-key authentication: with ServerConfig.api_key set, every RPC must carry the metadata
// `authorization: Bearer <key>`.
//
// Two enforcement points, because gRPC 1.51 cannot attach an AuthMetadataProcessor to plaintext
// (insecure) server credentials:
//   - starserve.v1 handlers call ApiKeyCheck::check first (before any tokenizing or engine work);
//   - RPCs served by gRPC itself (health, reflection) go through the interceptor made by
//     make_auth_interceptor_factory. Health is covered only when ServerConfig.auth_health is set, so
//     orchestrator probes keep working without the key by default.
#pragma once

#include <map>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>
#include <grpcpp/support/server_interceptor.h>

namespace starserve {

class ApiKeyCheck {
 public:
  explicit ApiKeyCheck(std::string api_key) : key_(std::move(api_key)) {}
  bool enabled() const { return !key_.empty(); }
  // OK when auth is off or the metadata carries the key; else UNAUTHENTICATED saying what is wrong (missing
  // header, not a Bearer token, wrong key). The comparison takes the same time wherever the first difference is.
  grpc::Status check(const std::multimap<grpc::string_ref, grpc::string_ref>& metadata) const;

 private:
  std::string key_;
};

// Interceptor for every method outside starserve.v1 (health: only when auth_health). Server interceptors cannot
// stop a handler from running, so a rejected call is neutralised instead: a unary call (health Check) answers
// UNAUTHENTICATED with an empty message in place of the real one; a streaming call (health Watch, reflection) is
// cancelled at once (the client sees CANCELLED), since its handler would otherwise keep it open.
std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> make_auth_interceptor_factory(
    std::shared_ptr<const ApiKeyCheck> check, bool auth_health);

}  // namespace starserve
