// gRPC server reflection, grpc.reflection.v1 and grpc.reflection.v1alpha (the same messages in two packages), on
// top of the generated descriptor pool: the .proto files compiled into this binary, their imports included.
// Implemented here because gRPC 1.51's reflection library serves only v1alpha and, running before any code of ours,
// cannot be made to answer UNAUTHENTICATED: with an API key set, a stream without it ends UNAUTHENTICATED before
// reading anything.
//
// Requests, one response each, in order: file_by_filename and file_containing_symbol (and _extension) return the
// file's FileDescriptorProto followed by those of its transitive imports; all_extension_numbers_of_type; and
// list_services, the services this server registered. A name that is not in the pool is an error_response with
// NOT_FOUND, a request with no question one with INVALID_ARGUMENT; the stream goes on either way.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "grpc/reflection/v1/reflection.pb.h"
#include "grpc/reflection/v1alpha/reflection.pb.h"
#include "server/auth.h"
#include "server/checked_service.h"

namespace starserve {

// Request, Response: ServerReflectionRequest / ServerReflectionResponse of grpc.reflection.v1 or v1alpha.
template <typename Request, typename Response>
class ReflectionService final : public CheckedService<ReflectionService<Request, Response>> {
 public:
  // service_name: "grpc.reflection.v1.ServerReflection" or "grpc.reflection.v1alpha.ServerReflection".
  // services: what list_services answers. api_key may be null or disabled (no key).
  ReflectionService(std::string_view service_name, std::vector<std::string> services,
                    std::shared_ptr<const ApiKeyCheck> api_key);

  grpc::Status ServerReflectionInfo(grpc::ServerContext* ctx, grpc::ServerReaderWriter<Response, Request>* stream);

 private:
  Response answer(const Request& request) const;

  const std::vector<std::string> services_;
  const std::shared_ptr<const ApiKeyCheck> api_key_;
};

using ReflectionServiceV1 =
    ReflectionService<grpc::reflection::v1::ServerReflectionRequest, grpc::reflection::v1::ServerReflectionResponse>;
using ReflectionServiceV1alpha = ReflectionService<grpc::reflection::v1alpha::ServerReflectionRequest,
                                                   grpc::reflection::v1alpha::ServerReflectionResponse>;

}  // namespace starserve
