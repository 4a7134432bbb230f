// The backend layer: device memory, copies and the ops a forward pass needs. The model code is
// written once against this interface; the CPU backend (fp32, OpenBLAS, kernels/ref) and the CUDA
// backend (bf16 storage, fp32 accumulation, kernels/*.cu, cuBLASLt) fill it.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "common/check.h"
#include "kernels/ref/attention_ref.h"
#include "model/hparams.h"

namespace starserve {

enum class DType : uint8_t { kF32, kBF16 };
inline size_t dtype_size(DType t) { return t == DType::kF32 ? 4 : 2; }

enum class DeviceKind : uint8_t { kCpu, kCuda };

// A non-owning view of memory on a backend's device. shape is row-major, outermost first.
struct Tensor {
  void* data = nullptr;
  DType dtype = DType::kF32;
  int ndim = 0;
  std::array<int64_t, 4> shape{};

  static Tensor make(void* data, DType dtype, std::initializer_list<int64_t> dims) {
    Tensor t;
    t.data = data;
    t.dtype = dtype;
    SS_CHECK(dims.size() <= 4, "ndim {}", dims.size());
    for (int64_t d : dims) t.shape[t.ndim++] = d;
    return t;
  }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
  size_t bytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype); }
  int64_t rows() const { return ndim == 0 ? 0 : numel() / shape[ndim - 1]; }
  int64_t cols() const { return ndim == 0 ? 0 : shape[ndim - 1]; }
  float* f32() const {
    SS_CHECK(dtype == DType::kF32, "tensor is not fp32");
    return static_cast<float*>(data);
  }
  // Rows [begin, begin + n) of the outermost dimension.
  Tensor slice_rows(int64_t begin, int64_t n) const {
    Tensor t = *this;
    const int64_t row_elems = numel() / shape[0];
    t.data = static_cast<char*>(data) + begin * row_elems * dtype_size(dtype);
    t.shape[0] = n;
    return t;
  }
};

class Backend;

// Owning device memory; frees through its backend.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(Backend* backend, void* ptr, size_t bytes) : backend_(backend), ptr_(ptr), bytes_(bytes) {}
  DeviceBuffer(DeviceBuffer&& o) noexcept { *this = std::move(o); }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { reset(); }
  void reset();
  void* data() const { return ptr_; }
  size_t bytes() const { return bytes_; }
  Tensor view(DType dtype, std::initializer_list<int64_t> dims) const {
    Tensor t = Tensor::make(ptr_, dtype, dims);
    SS_CHECK(t.bytes() <= bytes_, "view of {} bytes on a buffer of {}", t.bytes(), bytes_);
    return t;
  }

 private:
  Backend* backend_ = nullptr;
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual DeviceKind kind() const = 0;
  virtual std::string name() const = 0;
  // Storage type of weights and activations on this backend (fp32 on CPU, bf16 on CUDA).
  virtual DType compute_dtype() const = 0;

  virtual DeviceBuffer alloc(size_t bytes) = 0;
  virtual void free_raw(void* ptr) = 0;
  // Host fp32 -> device tensor (converted to dst.dtype), and back.
  virtual void upload_f32(Tensor dst, const float* src) = 0;
  virtual void download_f32(float* dst, Tensor src) = 0;
  virtual void copy(Tensor dst, Tensor src) = 0;  // same dtype and size
  virtual void synchronize() = 0;

  // --- ops: outputs first. All activations (T, ...) row-major. ---
  // out: (T, hidden); table: (n_vocab, hidden); ids: host (T), already range-checked.
  virtual void embedding(Tensor out, Tensor table, std::span<const int32_t> ids) = 0;
  // out, in: (T, hidden); weight: (hidden).
  virtual void rms_norm(Tensor out, Tensor in, Tensor weight, float eps) = 0;
  // out: (T, N) = in (T, K) x weight (N, K)^T.
  virtual void matmul(Tensor out, Tensor in, Tensor weight) = 0;
  // x: (T, n_heads, head_dim) rotated in place; positions host (T); inv_freq device (rope_dim / 2) fp32.
  virtual void rope(Tensor x, std::span<const int32_t> positions, Tensor inv_freq, int rope_dim,
                    RopeStyle style) = 0;
  virtual void swiglu(Tensor out, Tensor gate, Tensor up) = 0;
  virtual void add(Tensor out, Tensor a, Tensor b) = 0;
  // Partial attention over local keys; outputs fp32 (O normalised, LSE, entropy). See attention_ref.h.
  virtual void partial_attention(const PartialAttentionParams& p) = 0;
  virtual void merge_partials(float* out, float* lse, float* entropy, std::span<const AttentionPartial> parts,
                              int64_t n_rows, int head_dim) = 0;
};

// threads: BLAS threads for this process (0 = leave the library's default).
std::unique_ptr<Backend> make_cpu_backend(int threads = 0);

}  // namespace starserve
