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
#include "common/status.h"
#include "kernels/ref/attention_ref.h"
#include "kernels/ref/rope_style.h"
#include "kernels/ref/ssm_ref.h"

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

// One run of cached keys and values on a backend's device: k, v are (n_tokens, n_kv_heads, head_dim)
// in the backend's compute dtype. A sequence's keys are a list of runs (KV pages, anchor + block);
// the logical key index runs over their concatenation in order.
struct KvView {
  Tensor k, v;
  int64_t n_tokens() const { return k.ndim == 0 ? 0 : k.shape[0]; }
};

// One partial-attention call on a backend (the device-side form of PartialAttentionParams).
// out: (n_q, n_heads, head_dim) in the compute dtype or fp32 (partials headed for a merge);
// lse, entropy: (n_q * n_heads) fp32 on the device; entropy may be null. An empty kv list gives
// O = 0, LSE = -inf, H = 0.
struct AttentionCall {
  Tensor out;
  float* lse = nullptr;
  float* entropy = nullptr;
  Tensor q;  // (n_q, n_heads, head_dim), compute dtype
  std::span<const KvView> kv;
  int n_heads = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
  float scale = 1.0f;
  AttentionMask mask;    // mask.window > 0: a sliding window (attention_ref.h)
  float softcap = 0.0f;  // attention logit soft-capping (PartialAttentionParams::softcap); 0 = off
  int64_t n_q() const { return q.shape[0]; }
};

// What a model needs of a backend beyond the Llama ops: the model factories ask
// Backend::check_features before uploading anything, so that a backend without an op or an
// attention feature refuses the model with a Status naming it instead of failing mid-forward.
struct BackendFeatures {
  bool bias = false;           // add_bias (Qwen2 q/k/v biases)
  bool gelu_tanh = false;      // gelu_tanh_mul (Gemma's GeGLU)
  bool scale_softcap = false;  // scale_softcap (Gemma's embedding scale, final logit soft-capping)
  int64_t window = 0;          // the largest sliding window of any layer (0 = none)
  float attn_softcap = 0.0f;   // attention logit soft-capping (0 = none)
  bool kv_shift = false;       // split_qkv_shift_rope and kv_shift_rope (KV-shifting attention)
  bool ssm = false;            // causal_conv1d_silu, ssd_scan, gated_rms_norm (Attamba's chunk-local SSMs)
  bool layer_norm = false;     // layer_norm and gelu_tanh (GPT-2's LayerNorm and plain GELU MLP)
  bool head_temperature = false;  // head_temperature (the LayerNorm-free GPT-2's t[h, i])
};

// Sizes of one Mamba-2 SSD (Attamba's k_ssm / v_ssm): H heads of Pd values, G groups of N states.
struct SsmDims {
  int n_heads = 0, head_dim = 0, n_groups = 1, d_state = 0;
  int64_t d_inner() const { return int64_t{n_heads} * head_dim; }
  int64_t conv_dim() const { return d_inner() + 2 * int64_t{n_groups} * d_state; }
};

// One layer's KV-shifting mix (arXiv 2411.19574; kernels/ref/ops_ref.h kv_shift_ref): each token's
// raw k and v mixed with the previous token's before RoPE.
struct KvShiftArgs {
  // (n_prev, 2, n_kv_heads, head_dim) in the compute dtype: per sequence of the batch the raw k
  // (row 0) and v (row 1) of the token before its first one (zeros at a sequence's start).
  Tensor prev;
  // Host (n_tokens): -1 = the previous token is the batch's previous row, s >= 0 = row s of prev.
  std::span<const int32_t> prev_index;
  Tensor k_shift, v_shift;  // (n_kv_heads, 2) fp32: column 0 weighs the previous token, column 1 the current
};

// One logits row to pick a token from on the device, with the host Sampler's semantics
// (src/engine/sampling.h): the penalty entries applied, then the argmax (temperature 0) or
// temperature, top-k, top-p, min-p and the inverse-CDF draw at u over the survivors in increasing
// id. Built by the engine from its Sampler (DecodeController::prepare_device_sample).
struct SampleRow {
  int64_t n_vocab = 0;               // columns [0, n_vocab) of the row are candidates
  float temperature = 1.0f;          // 0: greedy
  int top_k = 0;
  float top_p = 1.0f;
  float min_p = 0.0f;
  float repetition_penalty = 1.0f;
  float frequency_penalty = 0.0f;
  float presence_penalty = 0.0f;
  double u = 0.0;                    // the step's uniform draw in [0, 1) (Sampler::draw_uniform); unused when greedy
  std::span<const int32_t> penalty_tokens;  // Sampler::penalty_entries: distinct tokens in [0, n_vocab)
  std::span<const int32_t> penalty_counts;  // their occurrences in the generated tokens
};

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
  // Row i of src (its first dimension; dst_rows.size() of them) copied to device memory at
  // dst_rows[i], same dtype and bytes; a null entry skips its row. Destinations do not overlap src
  // or each other. A decode step's new KV rows into many sequences' pages, in one op (the CUDA
  // backend: one launch) instead of one copy per row.
  virtual void scatter_rows(std::span<void* const> dst_rows, Tensor src) {
    SS_CHECK(src.ndim >= 1 && static_cast<int64_t>(dst_rows.size()) == src.shape[0], "scatter of {} rows to {} places",
             src.ndim >= 1 ? src.shape[0] : 0, dst_rows.size());
    for (size_t i = 0; i < dst_rows.size(); ++i) {
      if (dst_rows[i] == nullptr) continue;
      Tensor row = src.slice_rows(static_cast<int64_t>(i), 1);
      Tensor to = row;
      to.data = dst_rows[i];
      copy(to, row);
    }
  }
  // Same element count, any dtypes (fp32 <-> compute dtype), device to device.
  virtual void convert(Tensor dst, Tensor src) = 0;
  // Raw bytes between host memory and this device (host-to-host on the CPU backend).
  virtual void upload_bytes(void* dst, const void* src, size_t bytes) = 0;
  virtual void download_bytes(void* dst, const void* src, size_t bytes) = 0;
  virtual void synchronize() = 0;
  // The stream device work is ordered on (a cudaStream_t on CUDA; null on the CPU).
  virtual void* stream() { return nullptr; }

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
  // Fused forms of a decode step's small ops; each gives what its unfused sequence gives.
  // qkv: (T, (n_heads + 2 n_kv_heads) * head_dim), rows [q | k | v] of one fused projection; q:
  // (T, n_heads, head_dim) and k: (T, n_kv_heads, head_dim) receive their parts rotated as by
  // rope(), v: (T, n_kv_heads, head_dim) its part as is.
  virtual void split_qkv_rope(Tensor q, Tensor k, Tensor v, Tensor qkv, std::span<const int32_t> positions,
                              Tensor inv_freq, int rope_dim, RopeStyle style) = 0;
  // out: (T, ffn) = swiglu(gate_up[:, :ffn], gate_up[:, ffn:]); gate_up: (T, 2 ffn), not aliased by out.
  virtual void swiglu_fused(Tensor out, Tensor gate_up) = 0;
  // add(x, x, h) then rms_norm(out, x, weight, eps); out (T, hidden) aliases neither x nor h.
  virtual void add_rms_norm(Tensor out, Tensor x, Tensor h, Tensor weight, float eps) = 0;
  // --- ops of model families beyond Llama (BackendFeatures); a backend that lacks one refuses it in
  // check_features, and the model factories ask first, so the defaults below are never reached. ---
  // x: (rows, C) += bias (C), row by row.
  virtual void add_bias(Tensor x, Tensor bias) {
    SS_CHECK(false, "backend {} has no add_bias ({} x {})", name(), x.rows(), bias.numel());
  }
  // out = gelu_tanh(gate) * up over all elements (GELU with the tanh approximation); out may alias gate.
  virtual void gelu_tanh_mul(Tensor out, Tensor gate, Tensor up) {
    SS_CHECK(false, "backend {} has no gelu_tanh_mul ({} elements, {} {})", name(), out.numel(), gate.numel(),
             up.numel());
  }
  // out = gelu_tanh(in) over all elements (GELU with the tanh approximation); out may alias in.
  virtual void gelu_tanh(Tensor out, Tensor in) {
    SS_CHECK(false, "backend {} has no gelu_tanh ({} elements, {})", name(), out.numel(), in.numel());
  }
  // out, in: (T, hidden); weight, bias: (hidden). out = (in - mean) / sqrt(var + eps) * weight + bias
  // per row (kernels/ref/ops_ref.h layer_norm_ref); out may alias in.
  virtual void layer_norm(Tensor out, Tensor in, Tensor /*weight*/, Tensor /*bias*/, float eps) {
    SS_CHECK(false, "backend {} has no layer_norm ({} x {} -> {} elements, eps {})", name(), in.rows(), in.cols(),
             out.numel(), eps);
  }
  // x = cap > 0 ? cap * tanh(x * scale / cap) : x * scale, in place.
  virtual void scale_softcap(Tensor x, float scale, float cap) {
    SS_CHECK(false, "backend {} has no scale_softcap ({} elements, scale {}, cap {})", name(), x.numel(), scale, cap);
  }
  // x (T, n_heads, head_dim) in the compute dtype: row (i, h) divided by temperature[h, positions[i]],
  // in place; temperature (n_heads, n_positions) fp32; positions host (T), each in [0, n_positions)
  // (kernels/ref/ops_ref.h head_temperature_ref).
  virtual void head_temperature(Tensor x, Tensor temperature, std::span<const int32_t> positions) {
    SS_CHECK(false, "backend {} has no head_temperature ({} rows, table {}, {} positions)", name(), x.numel(),
             temperature.numel(), positions.size());
  }
  // split_qkv_rope with the KV-shifting mix of k and v (KvShiftArgs) between the split and RoPE.
  virtual void split_qkv_shift_rope(Tensor /*q*/, Tensor /*k*/, Tensor /*v*/, Tensor qkv, const KvShiftArgs& shift,
                                    std::span<const int32_t> /*positions*/, Tensor /*inv_freq*/, int rope_dim,
                                    RopeStyle style) {
    SS_CHECK(false, "backend {} has no split_qkv_shift_rope ({} tokens, {} prev rows, {} rope dims, style {})", name(),
             qkv.rows(), shift.prev.rows(), rope_dim, static_cast<int>(style));
  }
  // The unfused form: k, v (T, n_kv_heads, head_dim) = the mix of k_raw, v_raw (same shape, not
  // aliased by k, v), then k rotated as by rope().
  virtual void kv_shift_rope(Tensor /*k*/, Tensor /*v*/, Tensor k_raw, Tensor /*v_raw*/, const KvShiftArgs& shift,
                             std::span<const int32_t> /*positions*/, Tensor /*inv_freq*/, int rope_dim,
                             RopeStyle style) {
    SS_CHECK(false, "backend {} has no kv_shift_rope ({} tokens, {} prev rows, {} rope dims, style {})", name(),
             k_raw.shape[0], shift.prev.rows(), rope_dim, static_cast<int>(style));
  }
  // Attamba's chunk-local SSM (kernels/ref/ssm_ref.h, the same semantics and argument order); rows
  // describes the batch (each row's sequence and whether it starts a chunk). Weights and states fp32.
  // out (T, conv_dim) = silu(conv1d(in[:, in_col : in_col + conv_dim]) + bias); in (T, in_cols) in the
  // compute dtype; weight (conv_dim, W); bias (conv_dim); tail (n_seqs, W - 1, conv_dim) in/out.
  virtual void causal_conv1d_silu(Tensor out, Tensor /*in*/, int64_t in_col, Tensor weight, Tensor /*bias*/,
                                  Tensor /*tail*/, SsmRows /*rows*/) {
    SS_CHECK(false, "backend {} has no causal_conv1d_silu ({} rows from column {}, width {})", name(), out.rows(),
             in_col, weight.cols());
  }
  // y (T, d_inner) = the SSD scan of x = xbc[:, :d_inner], B, C = xbc's next G N columns each, dt =
  // dt_src[:, dt_col : dt_col + H]; A_log, D, dt_bias (H); state (n_seqs, H, Pd, N) in/out.
  virtual void ssd_scan(Tensor y, Tensor xbc, Tensor dt_src, int64_t dt_col, Tensor /*A_log*/, Tensor /*D*/,
                        Tensor /*dt_bias*/, Tensor /*state*/, const SsmDims& d, SsmRows /*rows*/) {
    SS_CHECK(false, "backend {} has no ssd_scan ({} rows, {} columns of x, {} of dt from {}, {} heads)", name(),
             y.rows(), xbc.cols(), dt_src.cols(), dt_col, d.n_heads);
  }
  // out (T, d) = RMSNorm(y * silu(z)) * weight with z = z_src[:, z_col : z_col + d]; out may alias y.
  virtual void gated_rms_norm(Tensor out, Tensor /*y*/, Tensor z_src, int64_t z_col, Tensor /*weight*/,
                              float eps) {
    SS_CHECK(false, "backend {} has no gated_rms_norm ({} rows, z of {} columns from {}, eps {})", name(), out.rows(),
             z_src.cols(), z_col, eps);
  }
  // OK when every feature asked for is available; else kUnimplemented naming the first one missing.
  virtual Status check_features(const BackendFeatures& f) const {
    if (f.bias) return unimplemented("backend {} has no bias op (add_bias)", name());
    if (f.gelu_tanh) return unimplemented("backend {} has no GeGLU op (gelu_tanh_mul)", name());
    if (f.scale_softcap) return unimplemented("backend {} has no scale / soft-capping op (scale_softcap)", name());
    if (f.kv_shift) return unimplemented("backend {} has no KV-shifting op (split_qkv_shift_rope)", name());
    if (f.ssm) return unimplemented("backend {} has no SSM ops (causal_conv1d_silu, ssd_scan, gated_rms_norm)", name());
    if (f.layer_norm) return unimplemented("backend {} has no LayerNorm / GELU ops (layer_norm, gelu_tanh)", name());
    if (f.head_temperature) {
      return unimplemented("backend {} has no per-head, per-position temperature op (head_temperature)", name());
    }
    if (f.window > 0) return unimplemented("backend {} cannot apply a sliding attention window ({} tokens)", name(), f.window);
    if (f.attn_softcap > 0.0f) {
      return unimplemented("backend {} cannot soft-cap attention logits (softcap {})", name(), f.attn_softcap);
    }
    return Status();
  }

  // Partial attention over local keys: O normalised within them, LSE, entropy. See attention_ref.h.
  virtual void partial_attention(const AttentionCall& c) = 0;
  // Several independent calls (one per sequence of a batch, each writing its own outputs), which a
  // backend may run together: the CUDA backend runs decode-sized ones in one launch per kernel.
  virtual void partial_attentions(std::span<const AttentionCall> calls) {
    for (const AttentionCall& c : calls) partial_attention(c);
  }
  // Exact merge of shards; every pointer (and the parts' pointers) is fp32 device memory.
  virtual void merge_partials(float* out, float* lse, float* entropy, std::span<const AttentionPartial> parts,
                              int64_t n_rows, int head_dim) = 0;
  // The all-reduce form of that merge around a world's collectives (attention_ref.h
  // merge_sum_terms_ref / merge_sum_finish_ref): terms (n_rows, merge_sum_width(head_dim)) from this
  // shard's partials and the all-reduced max LSE; then O, LSE, H from the all-reduced terms.
  virtual void merge_sum_terms(float* terms, const float* out, const float* lse, const float* entropy,
                               const float* max_lse, int64_t n_rows, int head_dim) = 0;
  virtual void merge_sum_finish(float* out, float* lse, float* entropy, const float* terms, const float* max_lse,
                                int64_t n_rows, int head_dim) = 0;

  // --- a decode step's ops as CUDA graphs (the CUDA backend; no-ops elsewhere) ---
  // Between begin_graph_step() and end_graph_step() a backend may record the ops it is given into
  // graphs of a few dozen ops and launch each graph once it is recorded, instead of launching the
  // ops one by one. Results are bit for bit those of the same ops launched one by one. An op that
  // waits for the device or allocates (download, synchronize, alloc, free) closes the open graph
  // first and runs as usual; the next op opens a new one. The graphs of a step are kept and updated
  // in place by the next step's, which for decode steps holds the same ops with new arguments.
  struct GraphStats {
    int64_t launches = 0;        // graphs launched
    int64_t instantiations = 0;  // of which built anew (the rest updated a kept graph)
    int64_t ops = 0;             // ops recorded into them
  };
  virtual void begin_graph_step() {}
  virtual void end_graph_step() {}
  virtual GraphStats graph_stats() const { return {}; }
  // Seconds the host has spent blocked waiting for the device (downloads, synchronize); 0 where
  // work runs on the calling thread. With a step's wall time it splits the step into the host's
  // own work (enqueueing) and the device running ahead of it.
  virtual double wait_seconds() const { return 0; }

  // --- token sampling on the device (the CUDA backend); others keep the logits on the host path ---
  virtual bool can_sample_rows() const { return false; }
  // tokens[r] = the token the host Sampler picks from row r of logits (rows, >= n_vocab columns,
  // any dtype) given rows[r]: the same token except where u * total or the top-p target is within
  // double rounding of a cumulative sum. logits may be overwritten (penalised in place). Aborts,
  // like the host Sampler, on a row with a NaN or no finite logit.
  virtual void sample_rows(std::span<int32_t> tokens, Tensor logits, std::span<const SampleRow> rows) {
    SS_CHECK(false, "backend {} does not sample on the device ({} rows, {} tokens, {} logits)", name(), rows.size(),
             tokens.size(), logits.rows());
  }
};

// The shapes Backend::split_qkv_rope requires (every backend checks them the same way).
inline void check_split_qkv_rope(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& qkv,
                                 size_t n_positions) {
  SS_CHECK(q.ndim == 3 && k.ndim == 3 && v.numel() == k.numel() &&
               qkv.numel() == q.numel() + k.numel() + v.numel() && q.shape[0] == static_cast<int64_t>(n_positions),
           "split_qkv_rope: q {} k {} v {} elements from {} for {} positions", q.numel(), k.numel(), v.numel(),
           qkv.numel(), n_positions);
}

// The shapes Backend::split_qkv_shift_rope / kv_shift_rope require besides their split's.
inline void check_kv_shift(const Tensor& k, const KvShiftArgs& a) {
  const int64_t kv_row = k.numel() / (k.shape[0] > 0 ? k.shape[0] : 1);
  SS_CHECK(k.ndim == 3 && static_cast<int64_t>(a.prev_index.size()) == k.shape[0] &&
               a.k_shift.numel() == 2 * k.shape[1] && a.v_shift.numel() == 2 * k.shape[1] &&
               a.k_shift.dtype == DType::kF32 && a.v_shift.dtype == DType::kF32 && a.prev.dtype == k.dtype &&
               a.prev.numel() % (2 * kv_row) == 0,
           "kv_shift: {} tokens, {} prev indices, shift weights {} / {} for {} KV heads, prev {} elements", k.shape[0],
           a.prev_index.size(), a.k_shift.numel(), a.v_shift.numel(), k.shape[1], a.prev.numel());
  const int64_t n_prev = a.prev.numel() / (2 * kv_row);
  for (size_t t = 0; t < a.prev_index.size(); ++t) {
    SS_CHECK(a.prev_index[t] < n_prev && (a.prev_index[t] >= 0 || t > 0),
             "kv_shift: token {} takes prev row {} of {}", t, a.prev_index[t], n_prev);
  }
}

// Device scratch that grows on demand and is reused across calls.
class Scratch {
 public:
  void* ensure(Backend& backend, size_t bytes) {
    if (buf_.bytes() < bytes) buf_ = backend.alloc(bytes + bytes / 4);
    return buf_.data();
  }
  Tensor view(Backend& backend, DType dtype, std::initializer_list<int64_t> dims) {
    Tensor t = Tensor::make(nullptr, dtype, dims);
    t.data = ensure(backend, t.bytes());
    return t;
  }
  float* floats(Backend& backend, int64_t n) {
    return static_cast<float*>(ensure(backend, static_cast<size_t>(n) * sizeof(float)));
  }

 private:
  DeviceBuffer buf_;
};

// threads: BLAS threads for this process (0 = leave the library's default).
std::unique_ptr<Backend> make_cpu_backend(int threads = 0);

// Choices of the CUDA backend (config slice ParallelConfig).
struct CudaBackendOptions {
  // Prefill attention kernel, among those that ship (kernels/attention/attention.h): auto (the
  // wgmma kernel on sm_90, the mma.sync one elsewhere), the wgmma kernel, or the mma.sync kernel.
  enum class Prefill { kAuto, kWgmma, kMma };
  Prefill prefill = Prefill::kAuto;
  // GEMMs of up to this many rows go through the bandwidth-bound skinny kernel (kernels/gemv.h)
  // instead of cuBLASLt; 0 = never. 1 (single-sequence decode steps) is where it measured faster
  // on the H200 (docs/perf.md); with 4 rows cuBLASLt is faster.
  int gemv_max_tokens = 1;
  // partial_attentions: decode-sized calls of several sequences in one launch per kernel
  // (launch_decode_attention_batch) instead of one per sequence.
  bool batch_decode = true;
  // Decode steps recorded as CUDA graphs (Backend::begin_graph_step) of graph_segment_ops ops
  // each, launched as each is recorded, so the host records the next while the GPU runs one (on
  // the H200: docs/perf.md, "Decode steps as CUDA graphs"). Off here; the runtime turns it on for a
  // single rank (the collectives of several ranks stay outside graphs).
  bool decode_graphs = false;
  int graph_segment_ops = 48;
};
// "auto" (the default), "wgmma", "mma"; kInvalidArgument naming the value and these otherwise.
Result<CudaBackendOptions::Prefill> parse_prefill_kernel(const std::string& name);

// The CUDA backend on one device (bf16 weights and activations, fp32 accumulation). kUnimplemented
// in builds without CUDA; kUnavailable when the device cannot be used.
Result<std::unique_ptr<Backend>> make_cuda_backend(int device, const CudaBackendOptions& options = {});
// Number of CUDA devices this process sees (0 in builds without CUDA).
int cuda_device_count();

}  // namespace starserve
