#include "engine/scheduler.h"

#include "common/check.h"
#include "kv/kv_cache.h"

#include <algorithm>

namespace starserve {

int prefill_layers_per_chunk(int n_layers, int64_t chunk_tokens, int64_t block_tokens) {
  if (chunk_tokens <= 0 || block_tokens <= chunk_tokens || n_layers <= 1) return 0;
  const int64_t layers = (static_cast<int64_t>(n_layers) * chunk_tokens + block_tokens - 1) / block_tokens;
  return static_cast<int>(std::clamp<int64_t>(layers, 1, n_layers));
}

int64_t prefill_step_tokens(int n_layers, int layers_per_chunk, int64_t block_tokens) {
  if (layers_per_chunk <= 0 || n_layers <= 0 || layers_per_chunk >= n_layers) return block_tokens;
  return (block_tokens * layers_per_chunk + n_layers - 1) / n_layers;
}

KvDemand kv_demand(const StarLayout& layout, AttentionMode mode, int64_t query_and_generated, int64_t page_size,
                   int chunks_per_block, int compressed_chunk) {
  KvCacheShape shape;
  shape.compressed_chunk = compressed_chunk;
  auto pages_for = [&](int64_t n) { return (shape.rows_for(n) + page_size - 1) / page_size; };
  KvDemand d;
  int max_blocks = 0;
  for (int r = 0; r < layout.world_size; ++r) {
    const std::vector<StarBlock> mine = layout.blocks_of(r);
    const int64_t share = layout.tokens_of(r);
    // Phase 1: the rank's blocks, plus the anchor's scratch on a star rank without c1 (freed when
    // phase 1 ends, before the query's KV is written: StepExecutor's first DECODE of the request).
    int64_t phase1 = pages_for(share);
    if (!mine.empty() && mine.front().index != 0 && layout.anchor_size > 0 && mode == AttentionMode::kStar) {
      phase1 += pages_for(layout.anchor_size);
    }
    // Phase 2: the blocks, plus the query and generated tokens on the query host.
    const int64_t phase2 = pages_for(share + (r == layout.query_host ? query_and_generated : 0));
    d.pages = std::max({d.pages, phase1, phase2});
    max_blocks = std::max(max_blocks, static_cast<int>(mine.size()));
  }
  d.encode_steps = (mode == AttentionMode::kExact ? (layout.n_context == 0 ? 0 : 1) : max_blocks) * chunks_per_block;
  return d;
}

int64_t context_entry_pages(const StarLayout& layout, int64_t page_size, int compressed_chunk) {
  KvCacheShape shape;
  shape.compressed_chunk = compressed_chunk;
  int64_t most = 0;
  for (int r = 0; r < layout.world_size; ++r) {
    most = std::max(most, (shape.rows_for(layout.tokens_of(r)) + page_size - 1) / page_size);
  }
  return most;
}

KvDemand kv_demand_cached(const StarLayout& layout, int64_t query_and_generated, int64_t page_size,
                          int compressed_chunk) {
  KvCacheShape shape;
  shape.compressed_chunk = compressed_chunk;
  KvDemand d;
  for (int r = 0; r < layout.world_size; ++r) {
    const int64_t share = layout.tokens_of(r);
    const int64_t total = share + (r == layout.query_host ? query_and_generated : 0);
    const int64_t own = (shape.rows_for(total) + page_size - 1) / page_size - shape.rows_for(share) / page_size;
    d.pages = std::max(d.pages, own);
  }
  return d;
}

KvDemand kv_demand_fork(const StarLayout& layout, int64_t query, int64_t generated, int64_t page_size,
                        int compressed_chunk) {
  KvCacheShape shape;
  shape.compressed_chunk = compressed_chunk;
  KvDemand d;
  for (int r = 0; r < layout.world_size; ++r) {
    const bool host = r == layout.query_host;
    const int64_t held = layout.tokens_of(r) + (host ? query : 0);
    const int64_t total = held + (host ? generated : 0);
    const int64_t own = (shape.rows_for(total) + page_size - 1) / page_size - shape.rows_for(held) / page_size;
    d.pages = std::max(d.pages, own);
  }
  return d;
}

Scheduler::Scheduler(const SchedulerConfig& config, int64_t pages_total)
    : config_(config), pages_total_(pages_total), pages_free_(pages_total) {}

Status Scheduler::enqueue(RequestId id, const KvDemand& demand) {
  if (demand.pages > pages_total_) {
    return resource_exhausted("request needs {} KV pages on one rank, each rank has {} in total", demand.pages,
                              pages_total_);
  }
  if (static_cast<int>(waiting_.size()) >= config_.max_queue) {
    return resource_exhausted("request queue is full ({} waiting, limit {})", waiting_.size(), config_.max_queue);
  }
  waiting_.emplace_back(id, demand);
  return Status();
}

bool Scheduler::drop_waiting(RequestId id) {
  auto it = std::find_if(waiting_.begin(), waiting_.end(), [&](const auto& w) { return w.first == id; });
  if (it == waiting_.end()) return false;
  waiting_.erase(it);
  return true;
}

std::vector<RequestId> Scheduler::admit() {
  std::vector<RequestId> out;
  while (const std::optional<RequestId> id = admit_front()) out.push_back(*id);
  return out;
}

std::optional<RequestId> Scheduler::front() const {
  if (waiting_.empty()) return std::nullopt;
  return waiting_.front().first;
}

void Scheduler::set_front_demand(const KvDemand& demand) {
  SS_CHECK(!waiting_.empty(), "set_front_demand with nothing waiting");
  waiting_.front().second = demand;
}

int64_t Scheduler::front_shortfall() const {
  if (waiting_.empty() || running_slots_ + waiting_.front().second.slots > config_.max_running) return -1;
  return std::max<int64_t>(0, waiting_.front().second.pages - pages_free_);
}

std::optional<RequestId> Scheduler::admit_front() {
  if (front_shortfall() != 0) return std::nullopt;
  const auto [id, demand] = waiting_.front();
  waiting_.pop_front();
  pages_free_ -= demand.pages;
  running_slots_ += demand.slots;
  running_[id] = Running{demand, 0, false};
  return id;
}

void Scheduler::split(RequestId parent, RequestId child, const KvDemand& demand) {
  Running& p = running_.at(parent);
  SS_CHECK(p.demand.pages >= demand.pages && p.demand.slots > demand.slots && running_.count(child) == 0,
           "split of request {} ({} pages, {} slots) for {} pages", parent, p.demand.pages, p.demand.slots,
           demand.pages);
  p.demand.pages -= demand.pages;
  p.demand.slots -= demand.slots;
  KvDemand d = demand;
  d.encode_steps = 0;
  running_[child] = Running{d, 0, false};
}

bool Scheduler::hold_pages(int64_t pages) {
  if (pages > pages_free_) return false;
  pages_free_ -= pages;
  return true;
}

void Scheduler::return_pages(int64_t pages) { pages_free_ += pages; }

std::vector<std::pair<RequestId, int>> Scheduler::encode_batch(int64_t decode_tokens) const {
  std::vector<std::pair<RequestId, int>> out;
  const bool budgeted = config_.max_batch_tokens > 0;
  int64_t left = config_.max_batch_tokens - decode_tokens;
  for (const auto& [id, r] : running_) {
    if (r.finished || r.encode_done >= r.demand.encode_steps) continue;
    if (budgeted && !out.empty() && r.demand.step_tokens > left) continue;
    out.emplace_back(id, r.encode_done);
    left -= r.demand.step_tokens;
  }
  return out;
}

std::vector<RequestId> Scheduler::decode_batch() const {
  std::vector<RequestId> out;
  for (const auto& [id, r] : running_) {
    if (!r.finished && r.encode_done >= r.demand.encode_steps) out.push_back(id);
  }
  return out;
}

bool Scheduler::encoded(RequestId id) {
  Running& r = running_.at(id);
  ++r.encode_done;
  return r.encode_done == r.demand.encode_steps;
}

bool Scheduler::phase1_done(RequestId id) const {
  const Running& r = running_.at(id);
  return r.encode_done >= r.demand.encode_steps;
}

void Scheduler::finish(RequestId id) {
  auto it = running_.find(id);
  if (it != running_.end()) it->second.finished = true;
}

void Scheduler::release(RequestId id) {
  auto it = running_.find(id);
  if (it == running_.end()) return;
  pages_free_ += it->second.demand.pages;
  running_slots_ -= it->second.demand.slots;
  running_.erase(it);
}

}  // namespace starserve
