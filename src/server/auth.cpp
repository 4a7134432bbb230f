#include "server/auth.h"

#include <cctype>
#include <cstring>
#include <string_view>

namespace starserve {
namespace {

constexpr std::string_view kStarservePrefix = "/starserve.v1.";
constexpr std::string_view kHealthPrefix = "/grpc.health.v1.Health/";

bool starts_with(const char* s, std::string_view prefix) {
  return s != nullptr && std::strncmp(s, prefix.data(), prefix.size()) == 0;
}

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

class AuthInterceptor final : public grpc::experimental::Interceptor {
 public:
  AuthInterceptor(grpc::experimental::ServerRpcInfo* info, std::shared_ptr<const ApiKeyCheck> check)
      : info_(info), check_(std::move(check)) {}

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    using Hook = grpc::experimental::InterceptionHookPoints;
    if (methods->QueryInterceptionHookPoint(Hook::POST_RECV_INITIAL_METADATA)) {
      verdict_ = check_->check(*methods->GetRecvInitialMetadata());
      if (!verdict_.ok() && info_->type() != grpc::experimental::ServerRpcInfo::Type::UNARY) {
        info_->server_context()->TryCancel();
      }
    }
    if (!verdict_.ok()) {
      if (methods->QueryInterceptionHookPoint(Hook::PRE_SEND_MESSAGE)) {
        // Nothing of the real answer leaves the server: an empty message parses as the default response.
        if (grpc::ByteBuffer* buffer = methods->GetSerializedSendMessage()) {
          grpc::Slice empty;
          *buffer = grpc::ByteBuffer(&empty, 1);
        }
      }
      if (methods->QueryInterceptionHookPoint(Hook::PRE_SEND_STATUS)) methods->ModifySendStatus(verdict_);
    }
    methods->Proceed();
  }

 private:
  grpc::experimental::ServerRpcInfo* info_;
  std::shared_ptr<const ApiKeyCheck> check_;
  grpc::Status verdict_;
};

class AuthInterceptorFactory final : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  AuthInterceptorFactory(std::shared_ptr<const ApiKeyCheck> check, bool auth_health)
      : check_(std::move(check)), auth_health_(auth_health) {}

  grpc::experimental::Interceptor* CreateServerInterceptor(grpc::experimental::ServerRpcInfo* info) override {
    if (!check_->enabled()) return nullptr;
    const char* method = info->method();
    // starserve.v1 handlers check the key themselves, before doing any work.
    if (starts_with(method, kStarservePrefix)) return nullptr;
    if (starts_with(method, kHealthPrefix) && !auth_health_) return nullptr;
    return new AuthInterceptor(info, check_);
  }

 private:
  std::shared_ptr<const ApiKeyCheck> check_;
  bool auth_health_;
};

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

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> make_auth_interceptor_factory(
    std::shared_ptr<const ApiKeyCheck> check, bool auth_health) {
  return std::make_unique<AuthInterceptorFactory>(std::move(check), auth_health);
}

}  // namespace starserve
