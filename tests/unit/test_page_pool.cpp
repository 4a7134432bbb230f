// page_pool_span: the row range a tensor map over the KV pool must cover (src/backend/page_pool.h).
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "backend/page_pool.h"

namespace starserve {
namespace {

TEST(PagePool, CoversPagesInAnyOrder) {
  constexpr uint64_t kRow = 384;  // 3 kv heads x 64 dims x 2 bytes (SmolLM2)
  constexpr int64_t kPage = 256;
  std::vector<char> pool(10 * kPage * kRow);
  const char* base = pool.data();
  // Pages 7, 2, 9 of the pool: the span runs from page 2's first row to page 9's last.
  std::vector<const void*> starts = {base + 7 * kPage * kRow, base + 2 * kPage * kRow, base + 9 * kPage * kRow};
  const auto span = page_pool_span(starts, kRow, kPage);
  ASSERT_TRUE(span.has_value());
  EXPECT_EQ(span->base, reinterpret_cast<uintptr_t>(base + 2 * kPage * kRow));
  EXPECT_EQ(span->rows, 8 * kPage);
  // Each page's first row, as the kernel computes it: its byte offset over the row's bytes.
  for (const void* s : starts) {
    const uint64_t off = reinterpret_cast<uintptr_t>(s) - span->base;
    EXPECT_EQ(off % kRow, 0u);
    EXPECT_LE(static_cast<int64_t>(off / kRow) + kPage, span->rows);
  }
}

TEST(PagePool, OnePage) {
  std::vector<char> pool(64 * 256);
  const std::vector<const void*> starts = {pool.data()};
  const auto span = page_pool_span(starts, 256, 64);
  ASSERT_TRUE(span.has_value());
  EXPECT_EQ(span->base, reinterpret_cast<uintptr_t>(pool.data()));
  EXPECT_EQ(span->rows, 64);
}

TEST(PagePool, RefusesWhatNoRowIndexNames) {
  std::vector<char> pool(4 * 64 * 256);
  const char* base = pool.data();
  // A page half a row off the others: no tensor map row starts there.
  const std::vector<const void*> off_row = {base, base + 64 * 256 + 128};
  EXPECT_FALSE(page_pool_span(off_row, 256, 64).has_value());
  EXPECT_FALSE(page_pool_span({}, 256, 64).has_value());
  const std::vector<const void*> one = {base};
  EXPECT_FALSE(page_pool_span(one, 0, 64).has_value());
  EXPECT_FALSE(page_pool_span(one, 256, 0).has_value());
}

}  // namespace
}  // namespace starserve
