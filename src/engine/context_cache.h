// Context reuse, rank 0's bookkeeping: the contexts whose phase-1 KV the ranks keep after the
// request that encoded them, so that later requests with the same context skip phase 1.
//
// An entry is the KV of one context under one layout: the same tokens encoded in another mode or
// with other blocks are other KV (star's blocks see an anchor, global's see everything), so the key
// is the tokens and the layout together. Every rank holds an entry's share as a sequence of its own
// (KvCache::fork: the whole pages shared with the requests that use it, never written). A request
// forks its sequence from the entry at admission; the entry is pinned while such a request runs,
// and only unpinned entries are evicted, least recently used first, when pages are needed.
// `id` (the client's context_id) names the tokens alone, so a request that sends it back instead
// of the text finds the tokens under any layout. Plain bookkeeping, one thread (the engine's, under
// its lock), unit-tested alone (tests/unit/test_context_cache.cpp).
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "common/config.h"
#include "kv/kv_cache.h"
#include "star/partition.h"

namespace starserve {

class ContextCache {
 public:
  struct Entry {
    SeqId seq = 0;                    // the sequence holding the KV on every rank
    std::string id;                   // id_of(tokens)
    std::vector<int32_t> tokens;
    std::vector<int64_t> layout_key;  // layout_key(layout, mode)
    StarLayout layout;
    AttentionMode mode = AttentionMode::kStar;
    int64_t pages = 0;                // pages it holds on the busiest rank (the scheduler's count)
    int users = 0;                    // running requests forked from it
    uint64_t last_use = 0;
  };
  struct Stats {
    int64_t hits = 0, misses = 0, evictions = 0;
  };

  // "ctx-" and 16 hex digits of a 64-bit FNV-1a hash of the token ids.
  static std::string id_of(std::span<const int32_t> tokens);
  static std::vector<int64_t> layout_key(const StarLayout& layout, AttentionMode mode);
  // Sequence ids of entries: apart from requests' (small) and the anchor's (bit 62).
  static constexpr SeqId kSeqBase = int64_t{1} << 61;

  // The entry of these tokens under this layout, marked used now; null when none.
  Entry* find(std::span<const int32_t> tokens, const std::vector<int64_t>& key);
  const Entry* get(SeqId seq) const;
  // The tokens of a context_id, from any entry that has them; null when none does.
  const std::vector<int32_t>* tokens_of(const std::string& id) const;
  // A new entry (no other holds these tokens under this key); returns its sequence id.
  SeqId insert(std::vector<int32_t> tokens, const StarLayout& layout, AttentionMode mode, int64_t pages);
  void pin(SeqId seq);
  void unpin(SeqId seq);
  // The least recently used entry that no request uses, other than `keep`.
  std::optional<SeqId> lru_idle(SeqId keep = -1) const;
  // Removes an entry; returns the pages it held.
  int64_t erase(SeqId seq);

  int64_t pages() const { return pages_; }
  int64_t size() const { return static_cast<int64_t>(entries_.size()); }
  Stats& stats() { return stats_; }
  const Stats& stats() const { return stats_; }

 private:
  std::map<SeqId, Entry> entries_;
  SeqId next_seq_ = kSeqBase;
  uint64_t clock_ = 0;
  int64_t pages_ = 0;
  Stats stats_;
};

}  // namespace starserve
