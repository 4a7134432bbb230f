// gRPC services whose requests that fail to parse are answered INVALID_ARGUMENT naming the field.
//
// Why: proto3 `string` fields must hold valid UTF-8, and the C++ parser refuses a message that breaks it. gRPC
// parses the request before any handler or interceptor runs and answers a parse failure with INTERNAL and an empty
// message (GenericDeserialize puts InitializationErrorString() there, which is empty for proto3), so a client that
// sends raw bytes in `prompt` learns nothing and the error looks like the server's fault. Declaring the text fields
// `bytes` would avoid the parse failure but would change every client (JSON base64, Python bytes), so the fields
// stay `string` and the server explains the refusal instead.
//
// How: CheckedService is a grpc::Service whose methods are registered by hand (the same paths and types as the
// generated Service, checked against the .proto's descriptor at construction). Each method's handler wraps gRPC's
// own one: it keeps a reference to the request's bytes (a slice reference, not a copy) while gRPC's parser runs,
// and only when that fails reads them again, without a schema, to find the field (diagnose_unparsed_request).
// The API key is not involved: a parse failure is answered before the handler, whoever the client is, exactly as
// gRPC would with its INTERNAL, and the answer names a field of the public API, nothing of the server.
#pragma once

#include <deque>
#include <memory>
#include <string>
#include <string_view>

#include <google/protobuf/descriptor.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/impl/codegen/proto_utils.h>  // SerializationTraits of protobuf messages
#include <grpcpp/impl/rpc_service_method.h>
#include <grpcpp/support/method_handler.h>

#include "common/check.h"

namespace starserve {

// The answer to a request of `type` whose bytes `wire` the protobuf parser refused: INVALID_ARGUMENT naming the
// first string field (path and index, e.g. "params.stop[1]", "messages[0].content") that is not valid UTF-8, or
// saying the bytes are not a `type` message at all.
grpc::Status diagnose_unparsed_request(const google::protobuf::Descriptor& type, std::string_view wire);

namespace internal {

// Wraps gRPC's handler of one method; see the file comment.
class DiagnosingHandler final : public grpc::internal::MethodHandler {
 public:
  DiagnosingHandler(std::unique_ptr<grpc::internal::MethodHandler> inner, const google::protobuf::Descriptor* type)
      : inner_(std::move(inner)), type_(type) {}
  void RunHandler(const HandlerParameter& param) override { inner_->RunHandler(param); }
  void* Deserialize(grpc_call* call, grpc_byte_buffer* request, grpc::Status* status, void** handler_data) override;

 private:
  std::unique_ptr<grpc::internal::MethodHandler> inner_;
  const google::protobuf::Descriptor* type_;  // the request message
};

}  // namespace internal

// Derived: the class deriving from CheckedService<Derived>, whose member functions the methods call. (Not named
// "Service": inside the class that would be grpc::Service, the base.)
template <typename Derived>
class CheckedService : public grpc::Service {
 protected:
  // service_name: the full name in the .proto ("starserve.v1.CompletionService"); it must exist in the generated
  // descriptor pool, with a method of this name, shape and request/response types (a broken invariant otherwise).
  explicit CheckedService(std::string_view service_name) : descriptor_(find_service(service_name)) {}

  template <typename Req, typename Resp>
  void add_unary(std::string_view method,
                 grpc::Status (Derived::*fn)(grpc::ServerContext*, const Req*, Resp*)) {
    add(method, grpc::internal::RpcMethod::NORMAL_RPC, Req::descriptor(), Resp::descriptor(),
        new grpc::internal::RpcMethodHandler<Derived, Req, Resp>(std::mem_fn(fn), self()));
  }
  template <typename Req, typename Resp>
  void add_server_streaming(std::string_view method, grpc::Status (Derived::*fn)(grpc::ServerContext*, const Req*,
                                                                                  grpc::ServerWriter<Resp>*)) {
    add(method, grpc::internal::RpcMethod::SERVER_STREAMING, Req::descriptor(), Resp::descriptor(),
        new grpc::internal::ServerStreamingHandler<Derived, Req, Resp>(std::mem_fn(fn), self()));
  }
  // Bidirectional streams read their messages in the handler (ServerReaderWriter::Read), not before it.
  template <typename Req, typename Resp>
  void add_bidi_streaming(std::string_view method,
                          grpc::Status (Derived::*fn)(grpc::ServerContext*, grpc::ServerReaderWriter<Resp, Req>*)) {
    add(method, grpc::internal::RpcMethod::BIDI_STREAMING, Req::descriptor(), Resp::descriptor(),
        new grpc::internal::BidiStreamingHandler<Derived, Req, Resp>(std::mem_fn(fn), self()), /*wrap=*/false);
  }

  // Called at the end of the derived constructor: every method of the .proto has a handler.
  void check_all_registered() const {
    SS_CHECK(static_cast<int>(paths_.size()) == descriptor_->method_count(), "{} registers {} of its {} methods",
             descriptor_->full_name(), paths_.size(), descriptor_->method_count());
  }

 private:
  static const google::protobuf::ServiceDescriptor* find_service(std::string_view name) {
    const auto* d = google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(std::string(name));
    SS_CHECK(d != nullptr, "service {} is not in the generated descriptor pool", name);
    return d;
  }
  Derived* self() { return static_cast<Derived*>(this); }

  void add(std::string_view method, grpc::internal::RpcMethod::RpcType type, const google::protobuf::Descriptor* req,
           const google::protobuf::Descriptor* resp, grpc::internal::MethodHandler* handler, bool wrap = true) {
    std::unique_ptr<grpc::internal::MethodHandler> owned(handler);
    const google::protobuf::MethodDescriptor* m = descriptor_->FindMethodByName(std::string(method));
    SS_CHECK(m != nullptr, "{} has no method {}", descriptor_->full_name(), method);
    const bool client_streams = type == grpc::internal::RpcMethod::BIDI_STREAMING;
    const bool server_streams = type != grpc::internal::RpcMethod::NORMAL_RPC;
    SS_CHECK(m->input_type() == req && m->output_type() == resp && m->client_streaming() == client_streams &&
                 m->server_streaming() == server_streams,
             "{} is registered with another shape or other types than the .proto's", m->full_name());
    // RpcMethod keeps the name's pointer: the strings live as long as the service (a deque never moves them).
    const std::string& path = paths_.emplace_back("/" + descriptor_->full_name() + "/" + m->name());
    if (wrap) owned = std::make_unique<internal::DiagnosingHandler>(std::move(owned), req);
    AddMethod(new grpc::internal::RpcServiceMethod(path.c_str(), type, owned.release()));
  }

  const google::protobuf::ServiceDescriptor* descriptor_;
  std::deque<std::string> paths_;
};

}  // namespace starserve
