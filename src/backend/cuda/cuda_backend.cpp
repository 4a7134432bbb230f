// The CUDA backend: bf16 weights and activations, fp32 accumulation, one stream per process.
// GEMMs through cuBLASLt; everything else through kernels/*.cu. Memory comes from the device's
// stream-ordered pool, so per-forward activations cost no cudaMalloc/cudaFree round trips.
// Host inputs of ops (token ids, positions, KV page tables) go through a pinned ring, so a decode
// step is enqueued without waiting for the GPU.
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <bit>
#include <chrono>
#include <cstring>
#include <limits>
#include <map>
#include <tuple>
#include <vector>

#include "common/log.h"

#include "backend/backend.h"
#include "backend/cuda/cublas_check.h"
#include "backend/page_pool.h"
#include "kernels/attention/attention.h"
#include "common/cuda_call.h"
#include "kernels/bias.h"
#include "kernels/elementwise.h"
#include "kernels/embedding.h"
#include "kernels/geglu.h"
#include "kernels/gemv.h"
#include "kernels/head_temperature.h"
#include "kernels/rms_norm.h"
#include "kernels/kv_shift.h"
#include "kernels/layer_norm.h"
#include "kernels/rope.h"
#include "kernels/sampling.h"
#include "kernels/softcap.h"
#include "kernels/ssm.h"
#include "kernels/swiglu.h"

namespace starserve {

namespace {

__nv_bfloat16* bf16(Tensor t) {
  SS_CHECK(t.dtype == DType::kBF16, "expected a bf16 tensor");
  return static_cast<__nv_bfloat16*>(t.data);
}

// Host bytes that must reach the device in stream order: copied into a pinned ring, then an
// asynchronous H2D copy. When the ring wraps, the stream is drained first (rare: the ring holds
// many decode steps' worth of ids, positions and page tables).
class PinnedRing {
 public:
  explicit PinnedRing(size_t bytes) : size_(bytes) { SS_CHECK_CALL(cudaMallocHost(&base_, bytes)); }
  ~PinnedRing() { cudaFreeHost(base_); }
  // Starts the ring over when it is past half full (waiting for the stream first): called where
  // the stream is idle anyway, so that no upload of the next steps must wait.
  void rewind(cudaStream_t stream) {
    if (head_ <= size_ / 2) return;
    SS_CHECK_CALL(cudaStreamSynchronize(stream));
    head_ = 0;
  }
  // Whether upload(bytes) goes without waiting for the stream (no wrap, not a large copy).
  bool fits(size_t bytes) const { return bytes <= size_ / 2 && head_ + (bytes + 255) / 256 * 256 <= size_; }
  void upload(void* dst, const void* src, size_t bytes, cudaStream_t stream) {
    if (bytes > size_ / 2) {  // large: synchronous pageable copy
      SS_CHECK_CALL(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream));
      SS_CHECK_CALL(cudaStreamSynchronize(stream));
      return;
    }
    const size_t aligned = (bytes + 255) / 256 * 256;
    if (head_ + aligned > size_) {
      SS_CHECK_CALL(cudaStreamSynchronize(stream));
      head_ = 0;
    }
    char* slot = static_cast<char*>(base_) + head_;
    std::memcpy(slot, src, bytes);
    SS_CHECK_CALL(cudaMemcpyAsync(dst, slot, bytes, cudaMemcpyHostToDevice, stream));
    head_ += aligned;
  }

 private:
  void* base_ = nullptr;
  size_t size_;
  size_t head_ = 0;
};

class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, const CudaBackendOptions& options)
      : device_(device), options_(options), ring_(size_t{32} << 20) {}

  Status init() {
    SS_CHECK_CALL(cudaSetDevice(device_));
    cudaDeviceProp prop{};
    SS_CHECK_CALL(cudaGetDeviceProperties(&prop, device_));
    name_ = fmt::format("cuda:{} ({}, sm_{}{})", device_, prop.name, prop.major, prop.minor);
    SS_CHECK_CALL(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    cudaMemPool_t pool;
    SS_CHECK_CALL(cudaDeviceGetDefaultMemPool(&pool, device_));
    uint64_t keep = std::numeric_limits<uint64_t>::max();  // keep freed memory in the pool
    SS_CHECK_CALL(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
    SS_CHECK_CALL(cublasLtCreate(&lt_));
    SS_CHECK_CALL(cudaMalloc(&lt_ws_, kLtWorkspace));
    return Status();
  }

  ~CudaBackend() override {
    if (recording_) {
      cudaGraph_t g = nullptr;
      cudaStreamEndCapture(stream_, &g);
      if (g) cudaGraphDestroy(g);
    }
    cudaStreamSynchronize(stream_);
    for (cudaGraphExec_t e : execs_)
      if (e) cudaGraphExecDestroy(e);
    for (auto& [key, plan] : plans_) {
      cublasLtMatmulDescDestroy(plan.desc);
      cublasLtMatrixLayoutDestroy(plan.a);
      cublasLtMatrixLayoutDestroy(plan.b);
      cublasLtMatrixLayoutDestroy(plan.c);
    }
    // Scratch buffers free through this backend (cudaFreeAsync on stream_): release every DeviceBuffer member
    // here, before the stream goes; one left to the implicit destructor frees on a destroyed stream.
    ids_ = DeviceBuffer();
    pos_ = DeviceBuffer();
    shift_idx_ = DeviceBuffer();
    key_limit_ = DeviceBuffer();
    ssm_rows_ = DeviceBuffer();
    tables_ = DeviceBuffer();
    batch_tables_ = DeviceBuffer();
    scatter_table_ = DeviceBuffer();
    decode_table_ = DeviceBuffer();
    gather_k_ = DeviceBuffer();
    gather_v_ = DeviceBuffer();
    attn_ws_ = DeviceBuffer();
    staging_ = DeviceBuffer();
    neg_inf_ = DeviceBuffer();
    sample_logits_ = DeviceBuffer();
    sample_in_ = DeviceBuffer();
    sample_out_ = DeviceBuffer();
    cudaStreamSynchronize(stream_);
    if (lt_ws_) cudaFree(lt_ws_);
    if (lt_) cublasLtDestroy(lt_);
    if (stream_) cudaStreamDestroy(stream_);
  }

  DeviceKind kind() const override { return DeviceKind::kCuda; }
  std::string name() const override { return name_; }
  DType compute_dtype() const override { return DType::kBF16; }
  void* stream() override { return stream_; }

  DeviceBuffer alloc(size_t bytes) override {
    flush_graph();
    void* p = nullptr;
    const cudaError_t e = cudaMallocAsync(&p, std::max<size_t>(bytes, 256), stream_);
    if (e != cudaSuccess) {
      size_t free_b = 0, total_b = 0;
      cudaMemGetInfo(&free_b, &total_b);
      SS_CHECK(false, "CUDA out of memory allocating {} MiB ({} MiB free of {} MiB): {}", bytes >> 20, free_b >> 20,
               total_b >> 20, cudaGetErrorString(e));
    }
    return DeviceBuffer(this, p, bytes);
  }
  void free_raw(void* ptr) override {
    flush_graph();
    cudaFreeAsync(ptr, stream_);
  }

  void upload_f32(Tensor dst, const float* src) override {
    flush_graph();
    const int64_t n = dst.numel();
    if (dst.dtype == DType::kF32) {
      SS_CHECK_CALL(cudaMemcpyAsync(dst.data, src, n * sizeof(float), cudaMemcpyHostToDevice, stream_));
      wait_for_stream();
      return;
    }
    // fp32 host -> fp32 staging on the device -> bf16, in chunks.
    constexpr int64_t kChunk = int64_t{16} << 20;  // floats
    float* stage = static_cast<float*>(grow(staging_, std::min(n, kChunk) * sizeof(float)));
    for (int64_t off = 0; off < n; off += kChunk) {
      const int64_t m = std::min(kChunk, n - off);
      SS_CHECK_CALL(cudaMemcpyAsync(stage, src + off, m * sizeof(float), cudaMemcpyHostToDevice, stream_));
      SS_CHECK_CALL(launch_f32_to_bf16(bf16(dst) + off, stage, m, stream_));
    }
    wait_for_stream();
  }
  void download_f32(float* dst, Tensor src) override {
    flush_graph();
    const int64_t n = src.numel();
    if (src.dtype == DType::kF32) {
      SS_CHECK_CALL(cudaMemcpyAsync(dst, src.data, n * sizeof(float), cudaMemcpyDeviceToHost, stream_));
    } else {
      float* stage = static_cast<float*>(grow(staging_, n * sizeof(float)));
      SS_CHECK_CALL(launch_bf16_to_f32(stage, bf16(src), n, stream_));
      SS_CHECK_CALL(cudaMemcpyAsync(dst, stage, n * sizeof(float), cudaMemcpyDeviceToHost, stream_));
    }
    wait_for_stream();
  }
  void copy(Tensor dst, Tensor src) override {
    OpScope op(this);
    SS_CHECK(dst.bytes() == src.bytes() && dst.dtype == src.dtype, "copy {} -> {} bytes", src.bytes(), dst.bytes());
    if (dst.data == src.data || src.bytes() == 0) return;
    SS_CHECK_CALL(cudaMemcpyAsync(dst.data, src.data, src.bytes(), cudaMemcpyDeviceToDevice, stream_));
  }
  void scatter_rows(std::span<void* const> dst_rows, Tensor src) override {
    OpScope op(this);
    SS_CHECK(src.ndim >= 1 && static_cast<int64_t>(dst_rows.size()) == src.shape[0], "scatter of {} rows to {} places",
             src.ndim >= 1 ? src.shape[0] : 0, dst_rows.size());
    const int64_t n = static_cast<int64_t>(dst_rows.size());
    if (n == 0 || src.bytes() == 0) return;
    auto* table = static_cast<void**>(grow(scatter_table_, n * sizeof(void*)));
    ring_upload(table, dst_rows.data(), n * sizeof(void*));
    SS_CHECK_CALL(launch_scatter_rows(table, src.data, n, static_cast<int64_t>(src.bytes()) / n, stream_));
  }
  void convert(Tensor dst, Tensor src) override {
    OpScope op(this);
    SS_CHECK(dst.numel() == src.numel(), "convert {} -> {} elements", src.numel(), dst.numel());
    if (dst.dtype == src.dtype) return copy(dst, src);
    if (dst.dtype == DType::kBF16) {
      SS_CHECK_CALL(launch_f32_to_bf16(bf16(dst), src.f32(), src.numel(), stream_));
    } else {
      SS_CHECK_CALL(launch_bf16_to_f32(dst.f32(), bf16(src), src.numel(), stream_));
    }
  }
  void upload_bytes(void* dst, const void* src, size_t bytes) override {
    OpScope op(this);
    if (bytes) ring_upload(dst, src, bytes);
  }
  void download_bytes(void* dst, const void* src, size_t bytes) override {
    flush_graph();
    if (bytes == 0) return;
    SS_CHECK_CALL(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_));
    wait_for_stream();
  }
  void synchronize() override {
    flush_graph();
    wait_for_stream();
  }

  void begin_graph_step() override {
    if (!options_.decode_graphs || graph_step_) return;
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    SS_CHECK_CALL(cudaStreamIsCapturing(stream_, &status));
    if (status != cudaStreamCaptureStatusNone) return;  // the caller records this stream itself
    ring_.rewind(stream_);  // a decode step follows the previous step's download: the stream is idle
    graph_step_ = true;
    segment_ = 0;
  }
  void end_graph_step() override {
    flush_graph();
    graph_step_ = false;
  }
  GraphStats graph_stats() const override { return graph_stats_; }
  double wait_seconds() const override { return 1e-9 * static_cast<double>(wait_ns_); }

  void embedding(Tensor out, Tensor table, std::span<const int32_t> ids) override {
    OpScope op(this);
    const int64_t n = static_cast<int64_t>(ids.size());
    auto* d_ids = static_cast<int32_t*>(grow(ids_, n * sizeof(int32_t)));
    ring_upload(d_ids, ids.data(), n * sizeof(int32_t));
    SS_CHECK_CALL(launch_embedding_bf16(bf16(out), bf16(table), d_ids, n, static_cast<int>(table.cols()), stream_));
  }
  void rms_norm(Tensor out, Tensor in, Tensor weight, float eps) override {
    OpScope op(this);
    SS_CHECK_CALL(launch_rms_norm(bf16(out), bf16(in), bf16(weight), in.rows(), static_cast<int>(in.cols()), eps, stream_));
  }
  void matmul(Tensor out, Tensor in, Tensor weight) override {
    OpScope op(this);
    const int64_t t = in.rows(), k = in.cols(), n = weight.rows();
    SS_CHECK(weight.cols() == k && out.rows() == t && out.cols() == n, "matmul ({}x{}) x ({}x{})^T -> ({}x{})", t, k,
             n, weight.cols(), out.rows(), out.cols());
    // Row-major out (t x n) = in (t x k) . W (n x k)^T is, column-major, out^T (n x t) = W^T' . in^T'
    // with W read transposed: D (n x t) = op(A) (n x k) . B (k x t), A = W stored (k x n), op = T.
    // Decode-sized: the skinny kernel, when its layout holds (else cuBLASLt, e.g. for an unaligned view).
    auto aligned16 = [](const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; };
    if (t <= std::min<int64_t>(options_.gemv_max_tokens, kGemvMaxTokens) && k % 8 == 0 && aligned16(in.data) && aligned16(weight.data) &&
        out.data != in.data && out.data != weight.data) {
      SS_CHECK_CALL(launch_gemv(out.data, out.dtype == DType::kF32, bf16(in), bf16(weight), t, n, k, stream_));
      return;
    }
    const Plan& plan = plan_for(n, t, k, out.dtype);
    const float alpha = 1.0f, beta = 0.0f;
    SS_CHECK_CALL(cublasLtMatmul(lt_, plan.desc, &alpha, weight.data, plan.a, in.data, plan.b, &beta, out.data, plan.c,
                                out.data, plan.c, plan.has_algo ? &plan.algo : nullptr, lt_ws_, kLtWorkspace,
                                stream_));
  }
  void rope(Tensor x, std::span<const int32_t> positions, Tensor inv_freq, int rope_dim, RopeStyle style) override {
    OpScope op(this);
    SS_CHECK_CALL(launch_rope(bf16(x), device_positions(positions), inv_freq.f32(), x.shape[0],
                           static_cast<int>(x.shape[1]), static_cast<int>(x.shape[2]), rope_dim, style, stream_));
  }
  void split_qkv_rope(Tensor q, Tensor k, Tensor v, Tensor qkv, std::span<const int32_t> positions, Tensor inv_freq,
                      int rope_dim, RopeStyle style) override {
    OpScope op(this);
    check_split_qkv_rope(q, k, v, qkv, positions.size());
    SS_CHECK_CALL(launch_split_qkv_rope(bf16(q), bf16(k), bf16(v), bf16(qkv), device_positions(positions),
                                     inv_freq.f32(), q.shape[0], static_cast<int>(q.shape[1]),
                                     static_cast<int>(k.shape[1]), static_cast<int>(q.shape[2]), rope_dim, style,
                                     stream_));
  }
  void split_qkv_shift_rope(Tensor q, Tensor k, Tensor v, Tensor qkv, const KvShiftArgs& a,
                            std::span<const int32_t> positions, Tensor inv_freq, int rope_dim,
                            RopeStyle style) override {
    OpScope op(this);
    check_split_qkv_rope(q, k, v, qkv, positions.size());
    check_kv_shift(k, a);
    const int nh = static_cast<int>(q.shape[1]), nkv = static_cast<int>(k.shape[1]), hd = static_cast<int>(q.shape[2]);
    KvShiftParams p = shift_params(k, v, a, positions, inv_freq, rope_dim, style);
    p.q = bf16(q);
    p.q_src = bf16(qkv);
    p.k_src = p.q_src + int64_t{nh} * hd;
    p.v_src = p.k_src + int64_t{nkv} * hd;
    p.src_stride = int64_t{nh + 2 * nkv} * hd;
    p.n_heads = nh;
    SS_CHECK_CALL(launch_kv_shift_rope(p, stream_));
  }
  void kv_shift_rope(Tensor k, Tensor v, Tensor k_raw, Tensor v_raw, const KvShiftArgs& a,
                     std::span<const int32_t> positions, Tensor inv_freq, int rope_dim, RopeStyle style) override {
    OpScope op(this);
    SS_CHECK(k.numel() == v.numel() && k_raw.numel() == k.numel() && v_raw.numel() == k.numel() &&
                 positions.size() == static_cast<size_t>(k.shape[0]) && k.data != k_raw.data && v.data != v_raw.data,
             "kv_shift_rope: k {} v {} from {} / {} elements for {} positions", k.numel(), v.numel(), k_raw.numel(),
             v_raw.numel(), positions.size());
    check_kv_shift(k, a);
    KvShiftParams p = shift_params(k, v, a, positions, inv_freq, rope_dim, style);
    p.k_src = bf16(k_raw);
    p.v_src = bf16(v_raw);
    p.src_stride = k.shape[1] * k.shape[2];
    SS_CHECK_CALL(launch_kv_shift_rope(p, stream_));
  }
  void swiglu_fused(Tensor out, Tensor gate_up) override {
    OpScope op(this);
    SS_CHECK(gate_up.rows() == out.rows() && gate_up.cols() == 2 * out.cols(), "swiglu_fused ({}x{}) -> ({}x{})",
             gate_up.rows(), gate_up.cols(), out.rows(), out.cols());
    SS_CHECK_CALL(launch_swiglu_fused(bf16(out), bf16(gate_up), out.rows(), out.cols(), stream_));
  }
  void add_rms_norm(Tensor out, Tensor x, Tensor h, Tensor weight, float eps) override {
    OpScope op(this);
    SS_CHECK(x.numel() == h.numel() && out.numel() == x.numel(), "add_rms_norm: {} + {} -> {} elements", x.numel(),
             h.numel(), out.numel());
    SS_CHECK_CALL(launch_add_rms_norm(bf16(out), bf16(x), bf16(h), bf16(weight), x.rows(), static_cast<int>(x.cols()),
                                   eps, stream_));
  }
  void swiglu(Tensor out, Tensor gate, Tensor up) override {
    OpScope op(this);
    SS_CHECK_CALL(launch_swiglu(bf16(out), bf16(gate), bf16(up), out.numel(), stream_));
  }
  void add(Tensor out, Tensor a, Tensor b) override {
    OpScope op(this);
    SS_CHECK_CALL(launch_add_bf16(bf16(out), bf16(a), bf16(b), out.numel(), stream_));
  }
  // The ops of the families beyond Llama (BackendFeatures). The rest of what they need is built
  // from the ops above: (1 + w) norms are rms_norm with the offset added to the weights at load,
  // pre- and post-norms are rms_norm, partial RoPE is rope with rope_dim < head_dim, fused q|k|v
  // and gate|up projections are split_qkv_rope and swiglu_fused.
  void add_bias(Tensor x, Tensor bias) override {
    OpScope op(this);
    SS_CHECK(bias.numel() == x.cols(), "add_bias: {} columns, bias of {}", x.cols(), bias.numel());
    SS_CHECK_CALL(launch_add_bias(bf16(x), bf16(bias), x.rows(), x.cols(), stream_));
  }
  void gelu_tanh_mul(Tensor out, Tensor gate, Tensor up) override {
    OpScope op(this);
    SS_CHECK(out.numel() == gate.numel() && out.numel() == up.numel(), "gelu_tanh_mul {} {} {}", out.numel(),
             gate.numel(), up.numel());
    SS_CHECK_CALL(launch_gelu_tanh_mul(bf16(out), bf16(gate), bf16(up), out.numel(), stream_));
  }
  void gelu_tanh(Tensor out, Tensor in) override {
    OpScope op(this);
    SS_CHECK(out.numel() == in.numel(), "gelu_tanh {} -> {}", in.numel(), out.numel());
    SS_CHECK_CALL(launch_gelu_tanh(bf16(out), bf16(in), out.numel(), stream_));
  }
  void layer_norm(Tensor out, Tensor in, Tensor weight, Tensor bias, float eps) override {
    OpScope op(this);
    SS_CHECK(out.numel() == in.numel() && weight.numel() == in.cols() && bias.numel() == in.cols(),
             "layer_norm: {} x {} -> {}, weight {}, bias {}", in.rows(), in.cols(), out.numel(), weight.numel(),
             bias.numel());
    SS_CHECK_CALL(launch_layer_norm(bf16(out), bf16(in), bf16(weight), bf16(bias), in.rows(),
                                    static_cast<int>(in.cols()), eps, stream_));
  }
  void scale_softcap(Tensor x, float scale, float cap) override {
    OpScope op(this);
    if (x.dtype == DType::kF32) {
      SS_CHECK_CALL(launch_scale_softcap(x.f32(), scale, cap, x.numel(), stream_));
    } else {
      SS_CHECK_CALL(launch_scale_softcap(bf16(x), scale, cap, x.numel(), stream_));
    }
  }
  // The LayerNorm-free GPT-2's t[h, i] (kernels/head_temperature.h): q of every row divided by its
  // head's temperature at the row's position, the table fp32 on the device.
  void head_temperature(Tensor x, Tensor temperature, std::span<const int32_t> positions) override {
    OpScope op(this);
    SS_CHECK(x.ndim == 3 && temperature.ndim == 2 && temperature.dtype == DType::kF32 &&
                 temperature.shape[0] == x.shape[1] && static_cast<int64_t>(positions.size()) == x.shape[0],
             "head_temperature: x {} x {} x {}, temperature {} x {}, {} positions", x.shape[0], x.shape[1],
             x.shape[2], temperature.shape[0], temperature.shape[1], positions.size());
    for (int32_t p : positions) {
      SS_CHECK(p >= 0 && p < temperature.shape[1], "head_temperature: position {} outside {} temperature columns", p,
               temperature.shape[1]);
    }
    const int32_t* pos = device_positions(positions);
    const int n_heads = static_cast<int>(x.shape[1]);
    const int head_dim = static_cast<int>(x.shape[2]);
    if (x.dtype == DType::kF32) {
      SS_CHECK_CALL(launch_head_temperature(x.f32(), temperature.f32(), pos, x.shape[0], n_heads, head_dim,
                                            temperature.shape[1], stream_));
    } else {
      SS_CHECK_CALL(launch_head_temperature(bf16(x), temperature.f32(), pos, x.shape[0], n_heads, head_dim,
                                            temperature.shape[1], stream_));
    }
  }
  // Every feature of BackendFeatures is here: the ops above, and the sliding window and logit
  // soft-capping inside every attention kernel (kernels/attention/attention.h). What stays refused
  // lies outside BackendFeatures and is refused where the weights are read, for every backend
  // (unsupported RoPE scalings and architectures: model/gguf_source.cpp, model/hf_source.cpp);
  // attention head sizes above kSmallHeadMaxDim abort in partial_attention.
  Status check_features(const BackendFeatures&) const override { return Status(); }

  // Attamba's chunk-local SSMs (kernels/ssm.h): row data in the compute dtype, weights, tails and
  // states fp32; each row's sequence and reset flag go to the device once per distinct batch.
  void causal_conv1d_silu(Tensor out, Tensor in, int64_t in_col, Tensor weight, Tensor bias, Tensor tail,
                          SsmRows rows) override {
    OpScope op(this);
    const int64_t conv_dim = out.cols();
    const int width = static_cast<int>(weight.numel() / (conv_dim > 0 ? conv_dim : 1));
    SS_CHECK(in.rows() == out.rows() && in.dtype == out.dtype && in_col + conv_dim <= in.cols() &&
                 bias.numel() == conv_dim && weight.numel() == conv_dim * width && width >= 1 &&
                 weight.dtype == DType::kF32 && bias.dtype == DType::kF32 && tail.dtype == DType::kF32 &&
                 rows.seq.size() == static_cast<size_t>(out.rows()) && rows.reset.size() == rows.seq.size(),
             "causal_conv1d_silu: {} rows of {} from column {} of {}, weight {}, bias {}, tail {}", out.rows(),
             conv_dim, in_col, in.cols(), weight.numel(), bias.numel(), tail.numel());
    if (out.rows() == 0) return;
    CausalConv1dParams p;
    p.out = out.data;
    p.in = static_cast<const char*>(in.data) + in_col * static_cast<int64_t>(dtype_size(in.dtype));
    p.in_stride = in.cols();
    p.weight = weight.f32();
    p.bias = bias.f32();
    p.tail = tail.f32();
    std::tie(p.seq, p.reset) = device_ssm_rows(rows);
    p.n_rows = out.rows();
    p.conv_dim = conv_dim;
    p.width = width;
    p.dtype = ssm_dtype(out);
    SS_CHECK_CALL(launch_causal_conv1d_silu(p, stream_));
  }
  void ssd_scan(Tensor y, Tensor xbc, Tensor dt_src, int64_t dt_col, Tensor A_log, Tensor D, Tensor dt_bias,
                Tensor state, const SsmDims& d, SsmRows rows) override {
    OpScope op(this);
    SS_CHECK(y.cols() == d.d_inner() && xbc.cols() == d.conv_dim() && xbc.rows() == y.rows() &&
                 xbc.dtype == y.dtype && dt_src.dtype == y.dtype && dt_src.rows() == y.rows() &&
                 dt_col + d.n_heads <= dt_src.cols() && A_log.numel() == d.n_heads && D.numel() == d.n_heads &&
                 dt_bias.numel() == d.n_heads && state.dtype == DType::kF32 &&
                 state.numel() % (d.d_inner() * d.d_state) == 0 && rows.seq.size() == static_cast<size_t>(y.rows()) &&
                 d.d_state <= 256,
             "ssd_scan: {} rows, y {} x {}, xbc {} columns, dt {} from {}, {} heads x {} x {} states", y.rows(),
             y.cols(), d.d_inner(), xbc.cols(), dt_src.cols(), dt_col, d.n_heads, d.head_dim, d.d_state);
    if (y.rows() == 0) return;
    const int64_t es = static_cast<int64_t>(dtype_size(y.dtype));
    SsdScanParams p;
    p.y = y.data;
    p.x = xbc.data;
    p.B = static_cast<const char*>(xbc.data) + d.d_inner() * es;
    p.C = static_cast<const char*>(xbc.data) + (d.d_inner() + int64_t{d.n_groups} * d.d_state) * es;
    p.dt_raw = static_cast<const char*>(dt_src.data) + dt_col * es;
    p.x_stride = xbc.cols();
    p.bc_stride = xbc.cols();
    p.dt_stride = dt_src.cols();
    p.A_log = A_log.f32();
    p.D = D.f32();
    p.dt_bias = dt_bias.f32();
    p.state = state.f32();
    std::tie(p.seq, p.reset) = device_ssm_rows(rows);
    p.n_rows = y.rows();
    p.H = d.n_heads;
    p.Pd = d.head_dim;
    p.G = d.n_groups;
    p.N = d.d_state;
    p.dtype = ssm_dtype(y);
    SS_CHECK_CALL(launch_ssd_scan(p, stream_));
  }
  void gated_rms_norm(Tensor out, Tensor y, Tensor z_src, int64_t z_col, Tensor weight, float eps) override {
    OpScope op(this);
    SS_CHECK(out.numel() == y.numel() && out.dtype == y.dtype && z_src.dtype == y.dtype && y.rows() == z_src.rows() &&
                 z_col + y.cols() <= z_src.cols() && weight.numel() == y.cols() && weight.dtype == DType::kF32,
             "gated_rms_norm: {} x {}, z {} columns from {}, weight {}", y.rows(), y.cols(), z_src.cols(), z_col,
             weight.numel());
    if (y.rows() == 0) return;
    GatedRmsNormParams p;
    p.out = out.data;
    p.y = y.data;
    p.z = static_cast<const char*>(z_src.data) + z_col * static_cast<int64_t>(dtype_size(z_src.dtype));
    p.z_stride = z_src.cols();
    p.weight = weight.f32();
    p.n_rows = y.rows();
    p.d = y.cols();
    p.eps = eps;
    p.dtype = ssm_dtype(y);
    SS_CHECK_CALL(launch_gated_rms_norm(p, stream_));
  }

  void partial_attention(const AttentionCall& c) override {
    OpScope op(this);
    const int64_t n_q = c.n_q();
    if (n_q == 0) return;
    SS_CHECK(c.head_dim >= 1 && c.head_dim <= kSmallHeadMaxDim, "the CUDA attention kernels take head_dim 1..{}, not {}",
             kSmallHeadMaxDim, c.head_dim);
    const int64_t rows = n_q * c.n_heads;
    int64_t n_kv = 0;
    for (const KvView& kv : c.kv) n_kv += kv.n_tokens();
    if (n_kv == 0) {  // nothing visible: O = 0, LSE = -inf, H = 0
      SS_CHECK_CALL(cudaMemsetAsync(c.out.data, 0, c.out.bytes(), stream_));
      fill_neg_inf(c.lse, rows);
      if (c.entropy) SS_CHECK_CALL(cudaMemsetAsync(c.entropy, 0, rows * sizeof(float), stream_));
      return;
    }
    AttentionGpuParams p = gpu_params(c, n_kv);
    bind_keys(c.kv, n_kv, &p);
    if (c.mask.key_limit) {  // per-row key limits (Attamba's compressed keys): the small-head kernel takes them
      auto* d = static_cast<int32_t*>(grow(key_limit_, static_cast<size_t>(n_q) * sizeof(int32_t)));
      ring_upload(d, c.mask.key_limit, static_cast<size_t>(n_q) * sizeof(int32_t));
      p.key_limit = d;
      SS_CHECK_CALL(launch_attention_small_head(p, stream_));
    } else if (c.head_dim != 64 && c.head_dim != 128) {  // the tensor-core kernels' head sizes only
      SS_CHECK_CALL(launch_attention_small_head(p, stream_));
    } else if (n_q <= kDecodeRows) {
      const size_t ws = decode_attention_workspace_bytes(p);
      void* w = grow(attn_ws_, ws);
      SS_CHECK_CALL(launch_decode_attention(p, w, ws, stream_));
    } else {
      if (p.k_pages) bind_pools(int64_t{1} << p.page_shift, &p);  // decode reads pages by pointer only
      using Prefill = CudaBackendOptions::Prefill;
      switch (options_.prefill) {
        case Prefill::kAuto: SS_CHECK_CALL(launch_prefill_attention(p, stream_)); break;
        case Prefill::kWgmma: SS_CHECK_CALL(launch_prefill_attention_wgmma(p, stream_)); break;
        case Prefill::kMma: SS_CHECK_CALL(launch_prefill_attention_mma(p, stream_)); break;
      }
    }
  }

  void partial_attentions(std::span<const AttentionCall> calls) override {
    OpScope op(this);
    // Decode-sized calls whose keys are one run or a page table join batches by kernel
    // (decode_attention_batch_key); the rest (empty, prefill-sized, keys to gather) run alone.
    // Scratch kept between calls (a decode step makes one such call per layer).
    std::vector<AttentionGpuParams>& batchable = pa_.batchable;
    std::vector<int>& keys = pa_.keys;
    std::vector<const AttentionCall*>& paged = pa_.paged;  // batchable calls that need a page table, in order
    batchable.clear();
    keys.clear();
    paged.clear();
    for (const AttentionCall& c : calls) {
      const int64_t n_q = c.n_q();
      int64_t n_kv = 0;
      for (const KvView& kv : c.kv) n_kv += kv.n_tokens();
      const bool decode = options_.batch_decode && calls.size() > 1 && n_q >= 1 && n_q <= kDecodeRows && n_kv > 0 &&
                          (c.head_dim == 64 || c.head_dim == 128) && !c.mask.key_limit;
      const bool bindable = c.kv.size() == 1 || page_table_shift(c.kv) > 0;
      AttentionGpuParams p;
      if (decode && bindable) {
        p = gpu_params(c, n_kv);
        if (decode_attention_batch_key(p) >= 0) {  // the shape can be batched (paging is set below)
          if (c.kv.size() == 1) {
            p.k = bf16(c.kv[0].k);
            p.v = bf16(c.kv[0].v);
          } else {
            p.page_shift = page_table_shift(c.kv);
            paged.push_back(&c);
          }
          batchable.push_back(p);
          continue;
        }
      }
      partial_attention(c);
    }
    if (batchable.empty()) return;
    // Every page table in one upload; the calls point at their slices.
    size_t n_ptrs = 0;
    for (const AttentionCall* c : paged) n_ptrs += 2 * c->kv.size();
    void** tables = n_ptrs ? static_cast<void**>(grow(batch_tables_, n_ptrs * sizeof(void*))) : nullptr;
    table_host_.clear();
    for (const AttentionCall* c : paged) {
      for (const KvView& kv : c->kv) table_host_.push_back(kv.k.data);
      for (const KvView& kv : c->kv) table_host_.push_back(kv.v.data);
    }
    if (n_ptrs) ring_upload(tables, table_host_.data(), n_ptrs * sizeof(void*));
    size_t at = 0, next_paged = 0;
    for (AttentionGpuParams& p : batchable) {
      if (p.page_shift == 0) continue;
      const size_t pages = paged[next_paged++]->kv.size();
      p.k_pages = reinterpret_cast<const __nv_bfloat16* const*>(tables + at);
      p.v_pages = reinterpret_cast<const __nv_bfloat16* const*>(tables + at + pages);
      at += 2 * pages;
    }
    for (const AttentionGpuParams& p : batchable) keys.push_back(decode_attention_batch_key(p));
    // Workspaces side by side, 256-byte aligned.
    std::vector<size_t>& offsets = pa_.offsets;
    offsets.resize(batchable.size());
    size_t total = 0;
    for (size_t i = 0; i < batchable.size(); ++i) {
      offsets[i] = total;
      total += (decode_attention_workspace_bytes(batchable[i]) + 255) / 256 * 256;
    }
    char* ws = static_cast<char*>(grow(attn_ws_, total));
    // Batches: the calls of one key together (a decode step's calls usually share one), each batch's
    // table in device memory (launch_decode_attention_table); all tables in one upload.
    std::vector<bool>& done = pa_.done;
    done.assign(batchable.size(), false);
    std::vector<AttentionGpuParams>& group = pa_.group;
    std::vector<void*>& group_ws = pa_.group_ws;
    std::vector<std::pair<size_t, DecodeTableShape>>& launches = pa_.launches;  // table offset, shape
    launches.clear();
    decode_table_host_.clear();
    for (size_t i = 0; i < batchable.size(); ++i) {
      if (done[i]) continue;
      group.clear();
      group_ws.clear();
      for (size_t j = i; j < batchable.size() && static_cast<int>(group.size()) < kDecodeTableMax; ++j) {
        if (done[j] || keys[j] != keys[i]) continue;
        done[j] = true;
        group.push_back(batchable[j]);
        group_ws.push_back(ws + offsets[j]);
      }
      const size_t at = (decode_table_host_.size() + 255) / 256 * 256;
      decode_table_host_.resize(at + decode_attention_table_bytes(static_cast<int>(group.size())));
      DecodeTableShape shape;
      SS_CHECK_CALL(build_decode_attention_table(group.data(), group_ws.data(), static_cast<int>(group.size()),
                                                 decode_table_host_.data() + at, &shape));
      launches.emplace_back(at, shape);
    }
    char* batch_tables = static_cast<char*>(grow(decode_table_, decode_table_host_.size()));
    ring_upload(batch_tables, decode_table_host_.data(), decode_table_host_.size());
    for (const auto& [at, shape] : launches)
      SS_CHECK_CALL(launch_decode_attention_table(batch_tables + at, shape, stream_));
  }

  void merge_partials(float* out, float* lse, float* entropy, std::span<const AttentionPartial> parts, int64_t n_rows,
                      int head_dim) override {
    OpScope op(this);
    SS_CHECK(!parts.empty() && parts.size() <= static_cast<size_t>(kMergeMaxParts), "merge of {} parts (1..{})",
             parts.size(), kMergeMaxParts);
    AttentionPartialGpu table[kMergeMaxParts];
    for (size_t i = 0; i < parts.size(); ++i) table[i] = {parts[i].out, parts[i].lse, parts[i].entropy};
    SS_CHECK_CALL(launch_merge_partials(out, lse, entropy, table, static_cast<int>(parts.size()), n_rows, head_dim,
                                     stream_));
  }
  void merge_sum_terms(float* terms, const float* out, const float* lse, const float* entropy, const float* max_lse,
                       int64_t n_rows, int head_dim) override {
    OpScope op(this);
    SS_CHECK_CALL(launch_merge_sum_terms(terms, out, lse, entropy, max_lse, n_rows, head_dim, stream_));
  }
  void merge_sum_finish(float* out, float* lse, float* entropy, const float* terms, const float* max_lse,
                        int64_t n_rows, int head_dim) override {
    OpScope op(this);
    SS_CHECK_CALL(launch_merge_sum_finish(out, lse, entropy, terms, max_lse, n_rows, head_dim, stream_));
  }

  bool can_sample_rows() const override { return true; }

  void sample_rows(std::span<int32_t> tokens, Tensor logits, std::span<const SampleRow> rows) override {
    OpScope op(this);
    const int64_t n_rows = static_cast<int64_t>(rows.size());
    SS_CHECK(logits.rows() == n_rows && static_cast<int64_t>(tokens.size()) == n_rows,
             "sample_rows: {} rows, {} logits rows, {} tokens", n_rows, logits.rows(), tokens.size());
    if (n_rows == 0) return;
    const int64_t ld = logits.cols();
    // The kernel reads fp32 and penalises in place: bf16 rows go through an fp32 copy.
    float* f32 = nullptr;
    if (logits.dtype == DType::kF32) {
      f32 = logits.f32();
    } else {
      f32 = static_cast<float*>(grow(sample_logits_, n_rows * ld * sizeof(float)));
      SS_CHECK_CALL(launch_bf16_to_f32(f32, bf16(logits), n_rows * ld, stream_));
    }
    // One upload: the rows' parameters, then every row's penalty tokens, then their counts.
    size_t n_pen = 0;
    for (const SampleRow& r : rows) {
      SS_CHECK(r.n_vocab >= 1 && r.n_vocab <= ld, "sample_rows: n_vocab {} not in [1, {}]", r.n_vocab, ld);
      SS_CHECK(r.penalty_tokens.size() == r.penalty_counts.size(), "{} penalty tokens, {} counts",
               r.penalty_tokens.size(), r.penalty_counts.size());
      n_pen += r.penalty_tokens.size();
    }
    SS_CHECK(n_pen <= static_cast<size_t>(std::numeric_limits<int32_t>::max()), "{} penalty entries", n_pen);
    sample_params_.resize(n_rows);
    sample_penalties_.resize(2 * n_pen);
    int32_t* pen_tokens = sample_penalties_.data();
    int32_t* pen_counts = pen_tokens + n_pen;
    size_t at = 0;
    for (int64_t i = 0; i < n_rows; ++i) {
      const SampleRow& r = rows[i];
      SampleRowParams& p = sample_params_[i];
      p = SampleRowParams{};
      p.u = r.u;
      p.temperature = r.temperature;
      p.top_p = r.top_p;
      p.min_p = r.min_p;
      p.repetition_penalty = r.repetition_penalty;
      p.frequency_penalty = r.frequency_penalty;
      p.presence_penalty = r.presence_penalty;
      p.top_k = r.top_k;
      p.n_vocab = static_cast<int32_t>(r.n_vocab);
      p.penalty_begin = static_cast<int32_t>(at);
      p.penalty_count = static_cast<int32_t>(r.penalty_tokens.size());
      std::copy(r.penalty_tokens.begin(), r.penalty_tokens.end(), pen_tokens + at);
      std::copy(r.penalty_counts.begin(), r.penalty_counts.end(), pen_counts + at);
      at += r.penalty_tokens.size();
    }
    const size_t params_bytes = n_rows * sizeof(SampleRowParams);
    char* d_in = static_cast<char*>(grow(sample_in_, params_bytes + 2 * n_pen * sizeof(int32_t)));
    ring_upload(d_in, sample_params_.data(), params_bytes);
    if (n_pen > 0) ring_upload(d_in + params_bytes, sample_penalties_.data(), 2 * n_pen * sizeof(int32_t));
    auto* d_out = static_cast<int32_t*>(grow(sample_out_, n_rows * sizeof(int32_t)));
    const auto* d_tokens = reinterpret_cast<const int32_t*>(d_in + params_bytes);
    SS_CHECK_CALL(launch_sample_rows(d_out, f32, reinterpret_cast<const SampleRowParams*>(d_in), d_tokens,
                                  d_tokens + n_pen, n_rows, ld, stream_));
    download_bytes(tokens.data(), d_out, n_rows * sizeof(int32_t));
    for (int64_t i = 0; i < n_rows; ++i) {
      SS_CHECK(tokens[i] >= 0, "sample_rows: row {} holds a NaN or no finite logit: no token can be sampled", i);
    }
  }

 private:
  static constexpr size_t kLtWorkspace = size_t{32} << 20;
  // Query rows up to which the split-K decode kernel beats the tiled prefill kernel.
  static constexpr int64_t kDecodeRows = 16;

  struct Plan {
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo{};
    bool has_algo = false;
  };

  const Plan& plan_for(int64_t n, int64_t t, int64_t k, DType out_dtype) {
    const auto key = std::make_tuple(n, t, k, out_dtype);
    auto it = plans_.find(key);
    if (it != plans_.end()) return it->second;
    Plan p;
    SS_CHECK_CALL(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t op_t = CUBLAS_OP_T, op_n = CUBLAS_OP_N;
    SS_CHECK_CALL(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_t, sizeof(op_t)));
    SS_CHECK_CALL(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_n, sizeof(op_n)));
    const cudaDataType_t c_type = out_dtype == DType::kF32 ? CUDA_R_32F : CUDA_R_16BF;
    SS_CHECK_CALL(cublasLtMatrixLayoutCreate(&p.a, CUDA_R_16BF, k, n, k));
    SS_CHECK_CALL(cublasLtMatrixLayoutCreate(&p.b, CUDA_R_16BF, k, t, k));
    SS_CHECK_CALL(cublasLtMatrixLayoutCreate(&p.c, c_type, n, t, n));
    cublasLtMatmulPreference_t pref;
    SS_CHECK_CALL(cublasLtMatmulPreferenceCreate(&pref));
    const size_t ws = kLtWorkspace;
    SS_CHECK_CALL(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    if (cublasLtMatmulAlgoGetHeuristic(lt_, p.desc, p.a, p.b, p.c, p.c, pref, 1, &result, &found) ==
            CUBLAS_STATUS_SUCCESS &&
        found > 0) {
      p.algo = result.algo;
      p.has_algo = true;
    }
    cublasLtMatmulPreferenceDestroy(pref);
    SS_CHECK(p.has_algo, "cuBLASLt has no algorithm for a ({}x{}) x ({}x{})^T bf16 GEMM", t, k, n, k);
    return plans_.emplace(key, p).first->second;
  }

  AttentionGpuParams gpu_params(const AttentionCall& c, int64_t n_kv) {
    AttentionGpuParams p;
    p.out = c.out.data;
    p.out_fp32 = c.out.dtype == DType::kF32;
    p.lse = c.lse;
    p.entropy = c.entropy;
    p.q = bf16(c.q);
    p.n_q = c.n_q();
    p.n_kv = n_kv;
    p.n_heads = c.n_heads;
    p.n_kv_heads = c.n_kv_heads;
    p.head_dim = c.head_dim;
    p.scale = c.scale;
    p.causal = c.mask.causal;
    p.causal_offset = c.mask.causal_offset;
    p.window = c.mask.window;
    p.window_offset = c.mask.window_offset;
    p.key_gap_from = c.mask.key_gap_from;
    p.key_gap = c.mask.key_gap;
    p.softcap = c.softcap;
    return p;
  }

  // log2 of the page size when the runs are equal pages of 2^s >= 64 tokens (all but the last
  // full), which the kernels read through a page table; 0 otherwise.
  static int page_table_shift(std::span<const KvView> kv) {
    if (kv.size() < 2) return 0;
    const int64_t page = kv[0].n_tokens();
    bool paged = page >= 64 && std::has_single_bit(static_cast<uint64_t>(page));
    for (size_t i = 0; paged && i + 1 < kv.size(); ++i) paged = kv[i].n_tokens() == page;
    paged = paged && kv.back().n_tokens() <= page;
    return paged ? std::countr_zero(static_cast<uint64_t>(page)) : 0;
  }

  // After bind_keys bound a page table: the ranges that hold every page of K and of V (table_host_:
  // the K pages, then the V pages), so the wgmma prefill kernel can read pages through one tensor
  // map each (one row count, the larger of the two extents: the kernel reads only the pages' rows);
  // left unset when some page is not a whole number of rows from the lowest.
  void bind_pools(int64_t page, AttentionGpuParams* p) const {
    const uint64_t row = static_cast<uint64_t>(p->n_kv_heads) * p->head_dim * sizeof(__nv_bfloat16);
    const std::span<const void* const> all(table_host_.data(), table_host_.size());
    const size_t n = all.size() / 2;
    const std::optional<PagePool> k = page_pool_span(all.first(n), row, page);
    const std::optional<PagePool> v = page_pool_span(all.subspan(n), row, page);
    if (!k || !v) return;
    p->k_pool = reinterpret_cast<const __nv_bfloat16*>(k->base);
    p->v_pool = reinterpret_cast<const __nv_bfloat16*>(v->base);
    p->pool_rows = std::max(k->rows, v->rows);
  }

  // Points the kernel at the keys: one contiguous run as is; equal pages of 2^s >= 64 tokens (all
  // but the last full) through a page table; anything else gathered into one contiguous run.
  void bind_keys(std::span<const KvView> kv, int64_t n_kv, AttentionGpuParams* p) {
    if (kv.size() == 1) {
      p->k = bf16(kv[0].k);
      p->v = bf16(kv[0].v);
      return;
    }
    const int64_t page = kv[0].n_tokens();
    if (page_table_shift(kv) > 0) {
      table_host_.resize(2 * kv.size());
      for (size_t i = 0; i < kv.size(); ++i) {
        table_host_[i] = kv[i].k.data;
        table_host_[kv.size() + i] = kv[i].v.data;
      }
      auto* d = static_cast<void**>(grow(tables_, table_host_.size() * sizeof(void*)));
      ring_upload(d, table_host_.data(), table_host_.size() * sizeof(void*));
      p->k_pages = reinterpret_cast<const __nv_bfloat16* const*>(d);
      p->v_pages = reinterpret_cast<const __nv_bfloat16* const*>(d + kv.size());
      p->page_shift = std::countr_zero(static_cast<uint64_t>(page));
      return;
    }
    const size_t row = static_cast<size_t>(p->n_kv_heads) * p->head_dim * sizeof(__nv_bfloat16);
    char* k = static_cast<char*>(grow(gather_k_, n_kv * row));
    char* v = static_cast<char*>(grow(gather_v_, n_kv * row));
    size_t off = 0;
    for (const KvView& s : kv) {
      const size_t bytes = s.n_tokens() * row;
      SS_CHECK_CALL(cudaMemcpyAsync(k + off, s.k.data, bytes, cudaMemcpyDeviceToDevice, stream_));
      SS_CHECK_CALL(cudaMemcpyAsync(v + off, s.v.data, bytes, cudaMemcpyDeviceToDevice, stream_));
      off += bytes;
    }
    p->k = reinterpret_cast<const __nv_bfloat16*>(k);
    p->v = reinterpret_cast<const __nv_bfloat16*>(v);
  }

  // The positions on the device. q and k of a layer (and every layer) rotate with the same list:
  // uploaded once per distinct list.
  const int32_t* device_positions(std::span<const int32_t> positions) {
    const int64_t n = static_cast<int64_t>(positions.size());
    if (last_pos_.size() != positions.size() || !std::equal(positions.begin(), positions.end(), last_pos_.begin())) {
      auto* d = static_cast<int32_t*>(grow(pos_, n * sizeof(int32_t)));
      ring_upload(d, positions.data(), n * sizeof(int32_t));
      last_pos_.assign(positions.begin(), positions.end());
    }
    return static_cast<const int32_t*>(pos_.data());
  }

  // What both KV-shifting ops share; prev_index goes to the device once per distinct list (every
  // layer of a forward has the same one).
  KvShiftParams shift_params(Tensor k, Tensor v, const KvShiftArgs& a, std::span<const int32_t> positions,
                             Tensor inv_freq, int rope_dim, RopeStyle style) {
    KvShiftParams p;
    p.k = bf16(k);
    p.v = bf16(v);
    p.prev = bf16(a.prev);
    const size_t n = a.prev_index.size();
    if (last_shift_idx_.size() != n || !std::equal(a.prev_index.begin(), a.prev_index.end(), last_shift_idx_.begin())) {
      auto* d = static_cast<int32_t*>(grow(shift_idx_, n * sizeof(int32_t)));
      ring_upload(d, a.prev_index.data(), n * sizeof(int32_t));
      last_shift_idx_.assign(a.prev_index.begin(), a.prev_index.end());
    }
    p.prev_index = static_cast<const int32_t*>(shift_idx_.data());
    p.k_shift = a.k_shift.f32();
    p.v_shift = a.v_shift.f32();
    p.positions = device_positions(positions);
    p.inv_freq = inv_freq.f32();
    p.n_tokens = k.shape[0];
    p.n_kv_heads = static_cast<int>(k.shape[1]);
    p.head_dim = static_cast<int>(k.shape[2]);
    p.rope_dim = rope_dim;
    p.style = style;
    return p;
  }

  static SsmDtype ssm_dtype(const Tensor& t) {
    SS_CHECK(t.dtype == DType::kBF16 || t.dtype == DType::kF32, "SSM ops take bf16 or fp32 rows, not dtype {}",
             static_cast<int>(t.dtype));
    return t.dtype == DType::kBF16 ? SsmDtype::kBf16 : SsmDtype::kF32;
  }
  // SsmRows on the device: (T) int32 sequence indices, then (T) reset bytes; every SSM op of a
  // forward has the same rows, so they are uploaded once per distinct batch.
  std::pair<const int32_t*, const uint8_t*> device_ssm_rows(SsmRows rows) {
    const size_t n = rows.seq.size();
    const size_t seq_bytes = (n * sizeof(int32_t) + 255) / 256 * 256;
    if (last_ssm_seq_.size() != n || !std::equal(rows.seq.begin(), rows.seq.end(), last_ssm_seq_.begin()) ||
        !std::equal(rows.reset.begin(), rows.reset.end(), last_ssm_reset_.begin())) {
      char* d = static_cast<char*>(grow(ssm_rows_, seq_bytes + n));
      ring_upload(d, rows.seq.data(), n * sizeof(int32_t));
      ring_upload(d + seq_bytes, rows.reset.data(), n);
      last_ssm_seq_.assign(rows.seq.begin(), rows.seq.end());
      last_ssm_reset_.assign(rows.reset.begin(), rows.reset.end());
    }
    const char* d = static_cast<const char*>(ssm_rows_.data());
    return {reinterpret_cast<const int32_t*>(d), reinterpret_cast<const uint8_t*>(d + seq_bytes)};
  }

  void fill_neg_inf(float* dst, int64_t n) {
    if (neg_inf_.bytes() < n * sizeof(float)) {
      flush_graph();  // a pageable copy and a wait follow
      neg_inf_ = alloc(n * 2 * sizeof(float));
      std::vector<float> h(n * 2, -std::numeric_limits<float>::infinity());
      SS_CHECK_CALL(cudaMemcpyAsync(neg_inf_.data(), h.data(), h.size() * sizeof(float), cudaMemcpyHostToDevice, stream_));
      SS_CHECK_CALL(cudaStreamSynchronize(stream_));
    }
    SS_CHECK_CALL(cudaMemcpyAsync(dst, neg_inf_.data(), n * sizeof(float), cudaMemcpyDeviceToDevice, stream_));
  }

  // Host bytes to the device in stream order through the pinned ring; when the ring must wait for
  // the stream, the open graph is launched first (a graph being recorded cannot be waited for).
  void ring_upload(void* dst, const void* src, size_t bytes) {
    if (!ring_.fits(bytes)) flush_graph();
    ring_.upload(dst, src, bytes, stream_);
  }

  // Brackets each op that enqueues device work. In a graph step the op opens a graph when none is
  // being recorded, and the graph is launched once it holds options_.graph_segment_ops ops. Ops
  // called from ops (partial_attentions -> partial_attention) count once.
  class OpScope {
   public:
    explicit OpScope(CudaBackend* b) : b_(b) {
      if (b_->op_depth_++ == 0) b_->record_begin();
    }
    ~OpScope() {
      if (--b_->op_depth_ == 0) b_->record_end();
    }
    OpScope(const OpScope&) = delete;
    OpScope& operator=(const OpScope&) = delete;

   private:
    CudaBackend* b_;
  };
  void record_begin() {
    if (!graph_step_ || recording_) return;
    SS_CHECK_CALL(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
    recording_ = true;
    segment_ops_ = 0;
  }
  void record_end() {
    if (!recording_) return;
    ++graph_stats_.ops;
    if (++segment_ops_ >= std::max(1, options_.graph_segment_ops)) flush_graph();
  }
  // Ends the graph being recorded (if any) and launches it: the step's graph of the same index,
  // kept from the previous step, is updated with it when their nodes match, else built anew.
  void flush_graph() {
    if (!recording_) return;
    recording_ = false;
    cudaGraph_t g = nullptr;
    SS_CHECK_CALL(cudaStreamEndCapture(stream_, &g));
    if (segment_ >= execs_.size()) execs_.push_back(nullptr);
    cudaGraphExec_t& exec = execs_[segment_++];
    if (exec) {
      cudaGraphExecUpdateResultInfo info{};
      if (cudaGraphExecUpdate(exec, g, &info) != cudaSuccess) {
        (void)cudaGetLastError();  // the update's error is not sticky: build the graph anew
        cudaGraphExecDestroy(exec);
        exec = nullptr;
      }
    }
    cudaError_t e = cudaSuccess;
    if (!exec) {
      e = cudaGraphInstantiate(&exec, g, 0);
      ++graph_stats_.instantiations;
    }
    if (e == cudaSuccess) e = cudaGraphLaunch(exec, stream_);
    cudaGraphDestroy(g);
    SS_CHECK_CALL(e);
    ++graph_stats_.launches;
  }

  // The host waits for the stream; the time it blocks counts in wait_seconds().
  void wait_for_stream() {
    const auto t0 = std::chrono::steady_clock::now();
    SS_CHECK_CALL(cudaStreamSynchronize(stream_));
    wait_ns_ += std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
  }

  void* grow(DeviceBuffer& buf, size_t bytes) {
    if (buf.bytes() < bytes) buf = alloc(bytes + bytes / 2);
    return buf.data();
  }

  int device_;
  CudaBackendOptions options_;
  std::string name_;
  cudaStream_t stream_ = nullptr;
  cublasLtHandle_t lt_ = nullptr;
  void* lt_ws_ = nullptr;
  PinnedRing ring_;
  std::map<std::tuple<int64_t, int64_t, int64_t, DType>, Plan> plans_;
  DeviceBuffer ids_, pos_, tables_, batch_tables_, scatter_table_, decode_table_, gather_k_, gather_v_, attn_ws_, staging_, neg_inf_;
  // sample_rows: fp32 copy of bf16 logits; uploaded parameters + penalty entries; chosen tokens.
  DeviceBuffer sample_logits_, sample_in_, sample_out_;
  std::vector<SampleRowParams> sample_params_;
  std::vector<int32_t> sample_penalties_;  // every row's penalty tokens, then their counts
  std::vector<int32_t> last_pos_;
  DeviceBuffer shift_idx_;                 // KvShiftArgs::prev_index on the device
  DeviceBuffer key_limit_;                 // AttentionMask::key_limit of the last call that had one
  std::vector<int32_t> last_shift_idx_;
  DeviceBuffer ssm_rows_;                  // SsmRows on the device (device_ssm_rows)
  std::vector<int32_t> last_ssm_seq_;
  std::vector<uint8_t> last_ssm_reset_;
  std::vector<void*> table_host_;
  std::vector<unsigned char> decode_table_host_;  // partial_attentions: the decode batches' tables
  struct {
    std::vector<AttentionGpuParams> batchable, group;
    std::vector<int> keys;
    std::vector<const AttentionCall*> paged;
    std::vector<size_t> offsets;
    std::vector<bool> done;
    std::vector<void*> group_ws;
    std::vector<std::pair<size_t, DecodeTableShape>> launches;
  } pa_;  // partial_attentions' scratch
  // Graph steps (begin_graph_step): whether one is open, whether a graph is being recorded, the
  // index of that graph in the step and its op count, the nesting of OpScope, the kept graphs.
  bool graph_step_ = false, recording_ = false;
  size_t segment_ = 0;
  int segment_ops_ = 0, op_depth_ = 0;
  std::vector<cudaGraphExec_t> execs_;
  GraphStats graph_stats_;
  int64_t wait_ns_ = 0;
};

}  // namespace

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

Result<std::unique_ptr<Backend>> make_cuda_backend(int device, const CudaBackendOptions& options) {
  const int n = cuda_device_count();
  if (n == 0) return unavailable("--backend cuda: no CUDA device is visible to this process");
  if (device < 0 || device >= n) return invalid_argument("CUDA device {} does not exist ({} visible)", device, n);
  auto b = std::make_unique<CudaBackend>(device, options);
  SS_RETURN_IF_ERROR(b->init());
  log_debug("backend {}", b->name());
  return std::unique_ptr<Backend>(std::move(b));
}

}  // namespace starserve
