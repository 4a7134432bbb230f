#include "server/request_registry.h"

#include <fmt/format.h>

namespace starserve {

RequestRegistry::Handle& RequestRegistry::Handle::operator=(Handle&& o) noexcept {
  if (this != &o) {
    release();
    registry_ = o.registry_;
    id_ = std::move(o.id_);
    o.registry_ = nullptr;
  }
  return *this;
}

void RequestRegistry::Handle::bind(Engine& engine, RequestId engine_id) {
  if (!registry_) return;
  bool cancel_now = false;
  {
    std::lock_guard<std::mutex> lock(registry_->mu_);
    auto it = registry_->slots_.find(id_);
    if (it == registry_->slots_.end()) return;
    it->second.engine = &engine;
    it->second.engine_id = engine_id;
    it->second.bound = true;
    cancel_now = it->second.aborted;
  }
  // Engine::cancel only queues the id for the engine thread; called outside the registry's lock all the same.
  if (cancel_now) engine.cancel(engine_id);
}

bool RequestRegistry::Handle::aborted() const {
  if (!registry_) return false;
  std::lock_guard<std::mutex> lock(registry_->mu_);
  auto it = registry_->slots_.find(id_);
  return it != registry_->slots_.end() && it->second.aborted;
}

void RequestRegistry::Handle::release() {
  if (!registry_) return;
  {
    std::lock_guard<std::mutex> lock(registry_->mu_);
    registry_->slots_.erase(id_);
  }
  registry_ = nullptr;
}

std::string RequestRegistry::check_client_id(std::string_view id) {
  if (id.empty()) return "a request id must not be empty";
  if (id.size() > kMaxClientRequestIdBytes) {
    return fmt::format("a request id has at most {} bytes; this one has {}", kMaxClientRequestIdBytes, id.size());
  }
  for (size_t i = 0; i < id.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(id[i]);
    if (c <= 0x20 || c >= 0x7f) {
      return fmt::format("a request id is printable ASCII without spaces; byte {} is 0x{:02x}", i, c);
    }
  }
  return {};
}

bool RequestRegistry::reserve(const std::string& id, Handle* out) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!slots_.emplace(id, Slot{}).second) return false;
  }
  *out = Handle(this, id);
  return true;
}

bool RequestRegistry::abort(const std::string& id) {
  Engine* engine = nullptr;
  RequestId engine_id{};
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = slots_.find(id);
    if (it == slots_.end()) return false;
    it->second.aborted = true;
    if (!it->second.bound) return true;  // bind() cancels it
    engine = it->second.engine;
    engine_id = it->second.engine_id;
  }
  engine->cancel(engine_id);
  return true;
}

size_t RequestRegistry::running() const {
  std::lock_guard<std::mutex> lock(mu_);
  return slots_.size();
}

}  // namespace starserve
