#include "server/auth.h"

#include <cctype>
#include <string_view>

namespace starserve {
namespace {

// Constant-time in the content of the strings (the length of the expected key is not a secret worth hiding).
bool equal_constant_time(std::string_view a, std::string_view b) {
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  const size_t n = a.size();
  for (size_t i = 0; i < n; ++i) {
    const unsigned char bc = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    diff |= static_cast<unsigned char>(a[i]) ^ bc;
  }
  return diff == 0;
}

}  // namespace

grpc::Status ApiKeyCheck::check(const std::multimap<grpc::string_ref, grpc::string_ref>& metadata) const {
  if (key_.empty()) return grpc::Status::OK;
  const auto it = metadata.find("authorization");
  if (it == metadata.end()) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "missing \"authorization: Bearer <key>\" metadata (this server requires an API key)");
  }
  const std::string_view value(it->second.data(), it->second.size());
  constexpr std::string_view kScheme = "bearer ";
  bool is_bearer = value.size() > kScheme.size();
  for (size_t i = 0; is_bearer && i < kScheme.size(); ++i) {
    is_bearer = std::tolower(static_cast<unsigned char>(value[i])) == kScheme[i];
  }
  if (!is_bearer) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "authorization metadata must be \"Bearer <key>\"");
  }
  if (!equal_constant_time(key_, value.substr(kScheme.size()))) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "invalid API key");
  }
  return grpc::Status::OK;
}

}  // namespace starserve
