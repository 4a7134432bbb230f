// The running requests of both front ends (gRPC and the OpenAI HTTP API) by their public id, so that the Abort RPC
// can end any of them. The id is the one responses carry: the server's own ("cmpl-…", "chatcmpl-…") or the one the
// client chose (gRPC metadata `x-request-id`, HTTP header `X-Request-Id`), which must be unique among the running.
//
// A request reserves its id before it is submitted (a duplicate is refused before any work), binds the engine's
// request id once submitted, and releases the id when its handler returns. An abort that arrives between the
// reservation and the binding is applied at the binding. Thread-safe.
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>

#include "engine/engine.h"

namespace starserve {

inline constexpr size_t kMaxClientRequestIdBytes = 128;

class RequestRegistry {
 public:
  // Held by the request's handler: the id is registered while the handle lives.
  class Handle {
   public:
    Handle() = default;
    Handle(Handle&& o) noexcept : registry_(o.registry_), id_(std::move(o.id_)) { o.registry_ = nullptr; }
    Handle& operator=(Handle&& o) noexcept;
    Handle(const Handle&) = delete;
    Handle& operator=(const Handle&) = delete;
    ~Handle() { release(); }

    const std::string& id() const { return id_; }
    // The request was submitted as `engine_id` to `engine` (which outlives the handle). Cancels it at once when an
    // abort came first.
    void bind(Engine& engine, RequestId engine_id);
    // Whether Abort named this request.
    bool aborted() const;

   private:
    friend class RequestRegistry;
    Handle(RequestRegistry* registry, std::string id) : registry_(registry), id_(std::move(id)) {}
    void release();
    RequestRegistry* registry_ = nullptr;
    std::string id_;
  };

  // Empty when `id` is a valid client-chosen request id, else why not (1 to kMaxClientRequestIdBytes bytes of
  // printable ASCII without spaces).
  static std::string check_client_id(std::string_view id);

  // Registers `id`; false when a running request already has it.
  bool reserve(const std::string& id, Handle* out);
  // Cancels the request registered as `id` in its engine (it ends with FINISH_REASON_CANCELLED and the output it
  // has); false when no running request has that id (unknown, or already finished).
  bool abort(const std::string& id);
  size_t running() const;

 private:
  struct Slot {
    Engine* engine = nullptr;
    RequestId engine_id{};
    bool bound = false;
    bool aborted = false;
  };
  mutable std::mutex mu_;
  std::unordered_map<std::string, Slot> slots_;  // guarded by mu_
};

}  // namespace starserve
