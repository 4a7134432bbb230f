// Status / Result<T>: how expected failures travel (bad file, bad request, KV full, peer timeout).
// No exception crosses a module boundary; broken invariants use SS_CHECK (check.h) instead.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

#include <fmt/format.h>

namespace starserve {

enum class StatusCode : int {
  kOk = 0,
  kInvalidArgument,    // the caller passed something wrong (request field, CLI flag)
  kNotFound,           // a file, tensor or key that must exist does not
  kDataLoss,           // a file is malformed or truncated
  kOutOfRange,         // a value is beyond a configured limit
  kResourceExhausted,  // queue full, KV budget exhausted
  kUnavailable,        // not ready, shutting down, peer gone
  kCancelled,          // the client cancelled
  kDeadlineExceeded,   // the client's deadline passed
  kUnauthenticated,    // missing or bad credentials
  kUnimplemented,      // a feature this build or model does not have
  kInternal,           // an error from a library we called (MPI, CUDA, OS)
};

std::string_view status_code_name(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status ok_status() { return Status(); }
  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }
  // "INVALID_ARGUMENT: max_tokens = 0 must be >= 1"
  std::string to_string() const;

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

template <typename... Args>
Status make_status(StatusCode code, fmt::format_string<Args...> f, Args&&... args) {
  return Status(code, fmt::format(f, std::forward<Args>(args)...));
}
#define SS_ERROR_FACTORY(fn, code)                                      \
  template <typename... Args>                                           \
  Status fn(fmt::format_string<Args...> f, Args&&... args) {            \
    return Status(StatusCode::code, fmt::format(f, std::forward<Args>(args)...)); \
  }
SS_ERROR_FACTORY(invalid_argument, kInvalidArgument)
SS_ERROR_FACTORY(not_found, kNotFound)
SS_ERROR_FACTORY(data_loss, kDataLoss)
SS_ERROR_FACTORY(out_of_range, kOutOfRange)
SS_ERROR_FACTORY(resource_exhausted, kResourceExhausted)
SS_ERROR_FACTORY(unavailable, kUnavailable)
SS_ERROR_FACTORY(cancelled, kCancelled)
SS_ERROR_FACTORY(deadline_exceeded, kDeadlineExceeded)
SS_ERROR_FACTORY(unauthenticated, kUnauthenticated)
SS_ERROR_FACTORY(unimplemented, kUnimplemented)
SS_ERROR_FACTORY(internal_error, kInternal)
#undef SS_ERROR_FACTORY

// Result<T>: a value or a non-OK Status.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}  // NOLINT(google-explicit-constructor)
  Result(Status status) : v_(std::move(status)) {  // NOLINT(google-explicit-constructor)
    if (std::get<Status>(v_).ok()) v_ = Status(StatusCode::kInternal, "Result built from an OK status");
  }
  bool ok() const { return std::holds_alternative<T>(v_); }
  const Status& status() const {
    static const Status kOkStatus;
    return ok() ? kOkStatus : std::get<Status>(v_);
  }
  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace starserve

#define SS_CONCAT_INNER(a, b) a##b
#define SS_CONCAT(a, b) SS_CONCAT_INNER(a, b)

// Propagate a non-OK Status.
#define SS_RETURN_IF_ERROR(expr)                 \
  do {                                           \
    ::starserve::Status ss_status_ = (expr);     \
    if (!ss_status_.ok()) return ss_status_;     \
  } while (0)

// SS_ASSIGN_OR_RETURN(auto x, make_x()); propagates the error of a Result<T>.
#define SS_ASSIGN_OR_RETURN(lhs, expr) SS_ASSIGN_OR_RETURN_IMPL(SS_CONCAT(ss_result_, __LINE__), lhs, expr)
#define SS_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                             \
  if (!tmp.ok()) return tmp.status();            \
  lhs = std::move(tmp).value()
