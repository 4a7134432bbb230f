#include "engine/context_cache.h"

#include <algorithm>
#include <cstdio>

#include "common/check.h"

namespace starserve {

std::string ContextCache::id_of(std::span<const int32_t> tokens) {
  uint64_t h = 14695981039346656037ull;
  for (int32_t t : tokens) {
    auto u = static_cast<uint32_t>(t);
    for (int b = 0; b < 4; ++b) {
      h ^= (u >> (8 * b)) & 0xffu;
      h *= 1099511628211ull;
    }
  }
  char buf[32];
  std::snprintf(buf, sizeof(buf), "ctx-%016llx", static_cast<unsigned long long>(h));
  return buf;
}

std::vector<int64_t> ContextCache::layout_key(const StarLayout& layout, AttentionMode mode) {
  std::vector<int64_t> key{static_cast<int64_t>(mode),
                           layout.n_context,
                           layout.anchor_size,
                           layout.world_size,
                           layout.query_host,
                           static_cast<int64_t>(layout.exact_layout)};
  for (const StarBlock& b : layout.blocks) key.insert(key.end(), {b.begin, b.end, b.rank});
  return key;
}

ContextCache::Entry* ContextCache::find(std::span<const int32_t> tokens, const std::vector<int64_t>& key) {
  const std::string id = id_of(tokens);
  for (auto& [seq, e] : entries_) {
    if (e.id == id && e.layout_key == key && std::equal(tokens.begin(), tokens.end(), e.tokens.begin(), e.tokens.end())) {
      e.last_use = ++clock_;
      return &e;
    }
  }
  return nullptr;
}

const ContextCache::Entry* ContextCache::get(SeqId seq) const {
  auto it = entries_.find(seq);
  return it == entries_.end() ? nullptr : &it->second;
}

const std::vector<int32_t>* ContextCache::tokens_of(const std::string& id) const {
  for (const auto& [seq, e] : entries_) {
    if (e.id == id) return &e.tokens;
  }
  return nullptr;
}

SeqId ContextCache::insert(std::vector<int32_t> tokens, const StarLayout& layout, AttentionMode mode,
                           int64_t pages) {
  Entry e;
  e.seq = next_seq_++;
  e.id = id_of(tokens);
  e.tokens = std::move(tokens);
  e.layout_key = layout_key(layout, mode);
  e.layout = layout;
  e.mode = mode;
  e.pages = pages;
  e.last_use = ++clock_;
  pages_ += pages;
  const SeqId seq = e.seq;
  entries_.emplace(seq, std::move(e));
  return seq;
}

void ContextCache::pin(SeqId seq) {
  Entry& e = entries_.at(seq);
  ++e.users;
  e.last_use = ++clock_;
}

void ContextCache::unpin(SeqId seq) {
  auto it = entries_.find(seq);
  SS_CHECK(it != entries_.end() && it->second.users > 0, "unpin of context entry {} that is not pinned", seq);
  --it->second.users;
}

std::optional<SeqId> ContextCache::lru_idle(SeqId keep) const {
  std::optional<SeqId> best;
  uint64_t oldest = 0;
  for (const auto& [seq, e] : entries_) {
    if (e.users > 0 || seq == keep) continue;
    if (!best || e.last_use < oldest) {
      best = seq;
      oldest = e.last_use;
    }
  }
  return best;
}

int64_t ContextCache::erase(SeqId seq) {
  auto it = entries_.find(seq);
  SS_CHECK(it != entries_.end() && it->second.users == 0, "erase of context entry {} in use", seq);
  const int64_t pages = it->second.pages;
  pages_ -= pages;
  entries_.erase(it);
  return pages;
}

}  // namespace starserve
