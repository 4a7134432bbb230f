// API-key authentication: with ServerConfig.api_key set, every RPC must carry the metadata
// `authorization: Bearer <key>`.
//
// Every service of the server is its own (starserve.v1, grpc.health.v1, grpc.reflection.v1 / v1alpha), and each
// handler calls ApiKeyCheck::check first, before any tokenizing or engine work, so a call without the key ends
// UNAUTHENTICATED whatever its kind, streams included. (gRPC 1.51 cannot attach an AuthMetadataProcessor to
// plaintext server credentials, and an interceptor cannot stop a streaming handler from running: it could only
// cancel the call, which the client sees as CANCELLED.) Health alone can be exempted, for orchestrator probes
// (HealthService's without_key).
#pragma once

#include <map>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

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

}  // namespace starserve
