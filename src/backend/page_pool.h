// The run of whole rows that holds every page of a page table: what a backend hands a kernel that
// reads pages through one tensor map (the TMA), instead of through each page's pointer.
#pragma once

#include <cstdint>
#include <optional>
#include <span>

namespace starserve {

struct PagePool {
  uintptr_t base = 0;  // the lowest page's address
  int64_t rows = 0;    // rows from base to the end of the highest page
};

// Pages start at `starts` (any order) and hold page_rows rows of row_bytes each. nullopt when there
// are no pages, row_bytes is 0, or some page starts a fraction of a row away from the lowest (then
// no row index names it).
inline std::optional<PagePool> page_pool_span(std::span<const void* const> starts, uint64_t row_bytes,
                                              int64_t page_rows) {
  if (starts.empty() || row_bytes == 0 || page_rows <= 0) return std::nullopt;
  uintptr_t lo = UINTPTR_MAX, hi = 0;
  for (const void* s : starts) {
    const auto a = reinterpret_cast<uintptr_t>(s);
    lo = a < lo ? a : lo;
    hi = a > hi ? a : hi;
  }
  for (const void* s : starts)
    if ((reinterpret_cast<uintptr_t>(s) - lo) % row_bytes != 0) return std::nullopt;
  return PagePool{lo, static_cast<int64_t>((hi - lo) / row_bytes) + page_rows};
}

}  // namespace starserve
