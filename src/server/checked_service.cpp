#include "server/checked_service.h"

#include <map>
#include <optional>

#include <fmt/format.h>
#include <google/protobuf/unknown_field_set.h>
#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/slice.h>

#include "model/tokenizer.h"

namespace starserve {
namespace {

using google::protobuf::Descriptor;
using google::protobuf::FieldDescriptor;
using google::protobuf::UnknownField;
using google::protobuf::UnknownFieldSet;

// Nesting followed at most; deeper messages are not searched (the parser itself stops at 100).
constexpr int kMaxDepth = 32;

// The path of the first string field under `type` in `wire` that is not valid UTF-8; "" when every string field is
// valid; nullopt when `wire` (or a nested message's bytes) does not parse as protobuf at all. Parsed without the
// schema (UnknownFieldSet checks no UTF-8), then matched to `type`'s fields by number.
std::optional<std::string> find_invalid_string(const Descriptor& type, std::string_view wire,
                                               const std::string& prefix, int depth) {
  UnknownFieldSet fields;
  if (!fields.ParseFromArray(wire.data(), static_cast<int>(wire.size()))) return std::nullopt;
  std::map<int, int> seen;  // field number -> occurrences so far: the index in a repeated field
  for (int i = 0; i < fields.field_count(); ++i) {
    const UnknownField& f = fields.field(i);
    const int index = seen[f.number()]++;
    const FieldDescriptor* field = type.FindFieldByNumber(f.number());
    if (field == nullptr || f.type() != UnknownField::TYPE_LENGTH_DELIMITED) continue;
    std::string path = prefix + field->name();
    if (field->is_repeated()) path += fmt::format("[{}]", index);
    if (field->type() == FieldDescriptor::TYPE_STRING) {
      if (!is_valid_utf8(f.length_delimited())) return path;
    } else if (field->type() == FieldDescriptor::TYPE_MESSAGE && depth < kMaxDepth) {
      std::optional<std::string> inner =
          find_invalid_string(*field->message_type(), f.length_delimited(), path + ".", depth + 1);
      if (!inner || !inner->empty()) return inner;
    }
  }
  return std::string();
}

}  // namespace

grpc::Status diagnose_unparsed_request(const Descriptor& type, std::string_view wire) {
  const std::optional<std::string> field = find_invalid_string(type, wire, "", 0);
  if (field && !field->empty()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        fmt::format("{} is not valid UTF-8 (string fields must be; {} cannot be parsed)", *field,
                                    type.full_name()));
  }
  return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                      fmt::format("the request is not a valid {} message ({} bytes that do not parse as one)",
                                  type.full_name(), wire.size()));
}

namespace internal {

void* DiagnosingHandler::Deserialize(grpc_call* call, grpc_byte_buffer* request, grpc::Status* status,
                                     void** handler_data) {
  // gRPC's parser takes `request` and destroys it; a copy shares its slices, so keeping it costs no bytes.
  grpc_byte_buffer* kept = request != nullptr ? grpc_byte_buffer_copy(request) : nullptr;
  void* parsed = inner_->Deserialize(call, request, status, handler_data);
  if (!status->ok() && kept != nullptr) {
    grpc_byte_buffer_reader reader;
    if (grpc_byte_buffer_reader_init(&reader, kept)) {
      grpc_slice all = grpc_byte_buffer_reader_readall(&reader);
      *status = diagnose_unparsed_request(
          *type_, std::string_view(reinterpret_cast<const char*>(GRPC_SLICE_START_PTR(all)), GRPC_SLICE_LENGTH(all)));
      grpc_slice_unref(all);
      grpc_byte_buffer_reader_destroy(&reader);
    }
  }
  if (kept != nullptr) grpc_byte_buffer_destroy(kept);
  return parsed;
}

}  // namespace internal
}  // namespace starserve
