#include "server/reflection_service.h"

#include <algorithm>
#include <set>

#include <fmt/format.h>
#include <google/protobuf/descriptor.pb.h>

namespace starserve {
namespace {

using google::protobuf::DescriptorPool;
using google::protobuf::FileDescriptor;

// The file, then its transitive imports (each once), as serialized FileDescriptorProtos.
template <typename Response>
void add_file_with_imports(const FileDescriptor* file, Response* response) {
  std::set<const FileDescriptor*> seen;
  std::vector<const FileDescriptor*> todo = {file};
  auto* out = response->mutable_file_descriptor_response();
  while (!todo.empty()) {
    const FileDescriptor* f = todo.back();
    todo.pop_back();
    if (!seen.insert(f).second) continue;
    google::protobuf::FileDescriptorProto proto;
    f->CopyTo(&proto);
    proto.SerializeToString(out->add_file_descriptor_proto());
    for (int i = f->dependency_count() - 1; i >= 0; --i) todo.push_back(f->dependency(i));
  }
}

template <typename Response>
void set_error(grpc::StatusCode code, std::string message, Response* response) {
  auto* e = response->mutable_error_response();
  e->set_error_code(static_cast<int32_t>(code));
  e->set_error_message(std::move(message));
}

}  // namespace

template <typename Request, typename Response>
ReflectionService<Request, Response>::ReflectionService(std::string_view service_name,
                                                        std::vector<std::string> services,
                                                        std::shared_ptr<const ApiKeyCheck> api_key)
    : CheckedService<ReflectionService>(service_name), services_(std::move(services)), api_key_(std::move(api_key)) {
  this->add_bidi_streaming("ServerReflectionInfo", &ReflectionService::ServerReflectionInfo);
  this->check_all_registered();
}

template <typename Request, typename Response>
grpc::Status ReflectionService<Request, Response>::ServerReflectionInfo(
    grpc::ServerContext* ctx, grpc::ServerReaderWriter<Response, Request>* stream) {
  if (api_key_) {
    if (grpc::Status s = api_key_->check(ctx->client_metadata()); !s.ok()) return s;
  }
  Request request;
  while (stream->Read(&request)) {
    if (!stream->Write(answer(request))) break;
  }
  return grpc::Status::OK;
}

template <typename Request, typename Response>
Response ReflectionService<Request, Response>::answer(const Request& request) const {
  const DescriptorPool* pool = DescriptorPool::generated_pool();
  Response response;
  response.set_valid_host(request.host());
  *response.mutable_original_request() = request;
  switch (request.message_request_case()) {
    case Request::kFileByFilename: {
      const FileDescriptor* file = pool->FindFileByName(request.file_by_filename());
      if (file == nullptr) {
        set_error(grpc::StatusCode::NOT_FOUND, fmt::format("no file \"{}\"", request.file_by_filename()), &response);
      } else {
        add_file_with_imports(file, &response);
      }
      break;
    }
    case Request::kFileContainingSymbol: {
      const FileDescriptor* file = pool->FindFileContainingSymbol(request.file_containing_symbol());
      if (file == nullptr) {
        set_error(grpc::StatusCode::NOT_FOUND, fmt::format("no symbol \"{}\"", request.file_containing_symbol()),
                  &response);
      } else {
        add_file_with_imports(file, &response);
      }
      break;
    }
    case Request::kFileContainingExtension: {
      const auto& ext = request.file_containing_extension();
      const google::protobuf::Descriptor* type = pool->FindMessageTypeByName(ext.containing_type());
      const google::protobuf::FieldDescriptor* field =
          type != nullptr ? pool->FindExtensionByNumber(type, ext.extension_number()) : nullptr;
      if (field == nullptr) {
        set_error(grpc::StatusCode::NOT_FOUND,
                  fmt::format("no extension {} of \"{}\"", ext.extension_number(), ext.containing_type()), &response);
      } else {
        add_file_with_imports(field->file(), &response);
      }
      break;
    }
    case Request::kAllExtensionNumbersOfType: {
      const google::protobuf::Descriptor* type = pool->FindMessageTypeByName(request.all_extension_numbers_of_type());
      if (type == nullptr) {
        set_error(grpc::StatusCode::NOT_FOUND, fmt::format("no message type \"{}\"",
                                                           request.all_extension_numbers_of_type()), &response);
        break;
      }
      std::vector<const google::protobuf::FieldDescriptor*> extensions;
      pool->FindAllExtensions(type, &extensions);
      std::vector<int32_t> numbers;
      for (const auto* e : extensions) numbers.push_back(e->number());
      std::sort(numbers.begin(), numbers.end());
      auto* out = response.mutable_all_extension_numbers_response();
      out->set_base_type_name(type->full_name());
      for (int32_t n : numbers) out->add_extension_number(n);
      break;
    }
    case Request::kListServices: {
      auto* out = response.mutable_list_services_response();
      for (const std::string& name : services_) out->add_service()->set_name(name);
      break;
    }
    default:
      set_error(grpc::StatusCode::INVALID_ARGUMENT, "the request asks nothing (set one of file_by_filename, "
                "file_containing_symbol, file_containing_extension, all_extension_numbers_of_type, list_services)",
                &response);
      break;
  }
  return response;
}

template class ReflectionService<grpc::reflection::v1::ServerReflectionRequest,
                                 grpc::reflection::v1::ServerReflectionResponse>;
template class ReflectionService<grpc::reflection::v1alpha::ServerReflectionRequest,
                                 grpc::reflection::v1alpha::ServerReflectionResponse>;

}  // namespace starserve
