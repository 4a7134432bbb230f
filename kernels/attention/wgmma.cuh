// Hopper (sm_90a) warpgroup matrix multiply building blocks: shared-memory matrix descriptors for
// the 128-byte swizzled layout, the wgmma fences, and the bf16 -> fp32 shapes the prefill kernel
// issues (prefill_wgmma.cuh). Facts from the PTX ISA (asynchronous warpgroup-level matrix
// instructions); everything here compiles to nothing useful below sm_90a, so callers guard with
// STARSERVE_WGMMA_ENABLED.
//
// Shared-memory layout (both operands are stored the same way, rows of 64 bf16 = 128 bytes):
//   a "panel" is R rows x 64 columns, row r at byte 128 r, its 16-byte chunk c (columns 8c..8c+7)
//   at chunk position c ^ (r % 8): the 128-byte swizzle, which the hardware applies to address
//   bits [4, 7) from bits [7, 10), so every panel starts on a 1024-byte boundary. A matrix with
//   D = 64 P columns is P panels one after the other.
//   K-major operand (Q as A, K as B of Q K^T: the reduced dimension is the contiguous one): one
//   k16 step reads 32 bytes of each row, at byte 32 (k % 4) of panel k / 4; groups of 8 rows are
//   1024 bytes apart (the stride byte offset); the leading byte offset is unused.
//   MN-major operand (V as B of P V: the keys are the reduced dimension, the head dims the
//   contiguous one): a k16 step is 16 rows (2048 bytes); 8-row groups are 1024 bytes apart
//   (stride byte offset) and the next 64 output columns are the next panel (leading byte offset =
//   panel bytes).
#pragma once

#include <cstdint>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define STARSERVE_WGMMA_ENABLED 1
#else
#define STARSERVE_WGMMA_ENABLED 0
#endif

namespace starserve::wgmma {

constexpr int kRowBytes = 128;
constexpr int kSwizzleAtomBytes = 1024;  // 8 rows

// Byte offset of 16-byte chunk `chunk` (of D / 8) of row `row` in a matrix of `rows` rows stored as
// D / 64 swizzled panels.
__host__ __device__ constexpr uint32_t swizzled_offset(int row, int chunk, int rows) {
  return static_cast<uint32_t>((chunk / 8) * rows * kRowBytes + row * kRowBytes + (((chunk % 8) ^ (row % 8)) * 16));
}

// Matrix descriptor: start address >> 4 (bits 0-13), leading byte offset >> 4 (16-29), stride
// byte offset >> 4 (32-45), base offset 0 (panels are 1024-aligned), swizzle mode 1 = 128 bytes (62-63).
__device__ __forceinline__ uint64_t make_desc(uint32_t smem_addr, uint32_t lead_bytes, uint32_t stride_bytes) {
  return static_cast<uint64_t>((smem_addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>((lead_bytes >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((stride_bytes >> 4) & 0x3FFF) << 32) | (uint64_t{1} << 62);
}

// Orders this thread's earlier register writes (accumulators, A fragments) before the warpgroup's
// next wgmma reads them.
__device__ __forceinline__ void fence() {
#if STARSERVE_WGMMA_ENABLED
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void commit() {
#if STARSERVE_WGMMA_ENABLED
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wait() {
#if STARSERVE_WGMMA_ENABLED
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Shared memory written through the generic proxy (st.shared, cp.async) and read next by wgmma
// (the async proxy): each writing thread fences before the barrier that publishes the data.
__device__ __forceinline__ void fence_proxy_async() {
#if STARSERVE_WGMMA_ENABLED
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Keeps the accumulator registers in place across the asynchronous multiply (no reads, no moves).
template <int N>
__device__ __forceinline__ void hold(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// The same for A fragments still read by an issued multiply: live, unmoved, until after its wait.
template <int N>
__device__ __forceinline__ void hold(uint32_t (&a)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
    asm volatile("" : "+r"(a[i][0]), "+r"(a[i][1]), "+r"(a[i][2]), "+r"(a[i][3])::"memory");
}

#if STARSERVE_WGMMA_ENABLED
// The 64 accumulator operands %0 .. %63 of an m64n128 product, as they appear in the instruction.
#define STARSERVE_WGMMA_D64                                                                                 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                                 \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "                       \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                       \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
// Eight accumulator registers d[i] .. d[i + 7] as read-write asm operands.
#define STARSERVE_WGMMA_ACC8(d, i)                                                                          \
  "+f"(d[(i) + 0]), "+f"(d[(i) + 1]), "+f"(d[(i) + 2]), "+f"(d[(i) + 3]), "+f"(d[(i) + 4]), "+f"(d[(i) + 5]), \
      "+f"(d[(i) + 6]), "+f"(d[(i) + 7])

// d (64 x 128, fp32) = (scale_d ? d : 0) + A (64 x 16, shared, K-major) B (16 x 128, shared, K-major).
__device__ __forceinline__ void wgmma_m64n128k16_ss(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{"
      STARSERVE_WGMMA_D64
      "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
      : STARSERVE_WGMMA_ACC8(d, 0), STARSERVE_WGMMA_ACC8(d, 8), STARSERVE_WGMMA_ACC8(d, 16), STARSERVE_WGMMA_ACC8(d, 24),
        STARSERVE_WGMMA_ACC8(d, 32), STARSERVE_WGMMA_ACC8(d, 40), STARSERVE_WGMMA_ACC8(d, 48), STARSERVE_WGMMA_ACC8(d, 56)
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

// d (64 x 96, fp32) = (scale_d ? d : 0) + A (64 x 16, shared, K-major) B (16 x 96, shared, K-major).
__device__ __forceinline__ void wgmma_m64n96k16_ss(float (&d)[48], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %50, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n96k16.f32.bf16.bf16 "
      "{"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47"
      "}, %48, %49, p, 1, 1, 0, 0;\n}\n"
      : STARSERVE_WGMMA_ACC8(d, 0), STARSERVE_WGMMA_ACC8(d, 8), STARSERVE_WGMMA_ACC8(d, 16), STARSERVE_WGMMA_ACC8(d, 24),
        STARSERVE_WGMMA_ACC8(d, 32), STARSERVE_WGMMA_ACC8(d, 40)
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

// d (64 x 128, fp32) += A (64 x 16, bf16 registers) B (16 x 128, shared, MN-major).
__device__ __forceinline__ void wgmma_m64n128k16_rs(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{"
      STARSERVE_WGMMA_D64
      "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
      : STARSERVE_WGMMA_ACC8(d, 0), STARSERVE_WGMMA_ACC8(d, 8), STARSERVE_WGMMA_ACC8(d, 16), STARSERVE_WGMMA_ACC8(d, 24),
        STARSERVE_WGMMA_ACC8(d, 32), STARSERVE_WGMMA_ACC8(d, 40), STARSERVE_WGMMA_ACC8(d, 48), STARSERVE_WGMMA_ACC8(d, 56)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}

// d (64 x 64, fp32) += A (64 x 16, bf16 registers) B (16 x 64, shared, MN-major).
__device__ __forceinline__ void wgmma_m64n64k16_rs(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
      : STARSERVE_WGMMA_ACC8(d, 0), STARSERVE_WGMMA_ACC8(d, 8), STARSERVE_WGMMA_ACC8(d, 16), STARSERVE_WGMMA_ACC8(d, 24)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}
#undef STARSERVE_WGMMA_ACC8
#undef STARSERVE_WGMMA_D64
#endif  // STARSERVE_WGMMA_ENABLED

}  // namespace starserve::wgmma
