// The CPU backend: fp32 everywhere, GEMMs through OpenBLAS, everything else from kernels/ref.
#include <cblas.h>

#include <cstdlib>
#include <cstring>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu_attention.h"
#include "kernels/ref/attention_ref.h"
#include "kernels/ref/ops_ref.h"
#include "kernels/ref/ssm_ref.h"

namespace starserve {

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    reset();
    backend_ = o.backend_;
    ptr_ = o.ptr_;
    bytes_ = o.bytes_;
    o.backend_ = nullptr;
    o.ptr_ = nullptr;
    o.bytes_ = 0;
  }
  return *this;
}

void DeviceBuffer::reset() {
  if (backend_ && ptr_) backend_->free_raw(ptr_);
  backend_ = nullptr;
  ptr_ = nullptr;
  bytes_ = 0;
}

namespace {

class CpuBackend final : public Backend {
 public:
  DeviceKind kind() const override { return DeviceKind::kCpu; }
  std::string name() const override { return "cpu"; }
  DType compute_dtype() const override { return DType::kF32; }

  DeviceBuffer alloc(size_t bytes) override {
    // 64-byte alignment for vector loads; aligned_alloc needs a multiple of the alignment.
    const size_t rounded = (bytes + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, rounded == 0 ? 64 : rounded);
    SS_CHECK(p != nullptr, "out of host memory allocating {} bytes", bytes);
    return DeviceBuffer(this, p, bytes);
  }
  void free_raw(void* ptr) override { std::free(ptr); }
  void upload_f32(Tensor dst, const float* src) override { std::memcpy(dst.f32(), src, dst.bytes()); }
  void download_f32(float* dst, Tensor src) override { std::memcpy(dst, src.f32(), src.bytes()); }
  void copy(Tensor dst, Tensor src) override {
    SS_CHECK(dst.bytes() == src.bytes(), "copy {} -> {} bytes", src.bytes(), dst.bytes());
    std::memmove(dst.data, src.data, src.bytes());
  }
  void convert(Tensor dst, Tensor src) override {
    SS_CHECK(dst.dtype == DType::kF32 && src.dtype == DType::kF32 && dst.numel() == src.numel(),
             "the CPU backend holds fp32 only");
    std::memmove(dst.data, src.data, src.bytes());
  }
  void upload_bytes(void* dst, const void* src, size_t bytes) override { std::memmove(dst, src, bytes); }
  void download_bytes(void* dst, const void* src, size_t bytes) override { std::memmove(dst, src, bytes); }
  void synchronize() override {}

  void embedding(Tensor out, Tensor table, std::span<const int32_t> ids) override {
    embedding_ref(out.f32(), table.f32(), ids.data(), static_cast<int64_t>(ids.size()),
                  static_cast<int>(table.cols()));
  }
  void rms_norm(Tensor out, Tensor in, Tensor weight, float eps) override {
    rms_norm_ref(out.f32(), in.f32(), weight.f32(), in.rows(), static_cast<int>(in.cols()), eps);
  }
  void matmul(Tensor out, Tensor in, Tensor weight) override {
    const int64_t t = in.rows(), k = in.cols(), n = weight.rows();
    SS_CHECK(weight.cols() == k && out.rows() == t && out.cols() == n, "matmul ({}x{}) x ({}x{})^T -> ({}x{})",
             t, k, n, weight.cols(), out.rows(), out.cols());
    if (t == 1) {
      cblas_sgemv(CblasRowMajor, CblasNoTrans, static_cast<int>(n), static_cast<int>(k), 1.0f, weight.f32(),
                  static_cast<int>(k), in.f32(), 1, 0.0f, out.f32(), 1);
      return;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(t), static_cast<int>(n),
                static_cast<int>(k), 1.0f, in.f32(), static_cast<int>(k), weight.f32(), static_cast<int>(k), 0.0f,
                out.f32(), static_cast<int>(n));
  }
  void rope(Tensor x, std::span<const int32_t> positions, Tensor inv_freq, int rope_dim, RopeStyle style) override {
    rope_ref(x.f32(), positions.data(), inv_freq.f32(), x.shape[0], static_cast<int>(x.shape[1]),
             static_cast<int>(x.shape[2]), rope_dim, style);
  }
  void swiglu(Tensor out, Tensor gate, Tensor up) override { swiglu_ref(out.f32(), gate.f32(), up.f32(), out.numel()); }
  void add(Tensor out, Tensor a, Tensor b) override { add_ref(out.f32(), a.f32(), b.f32(), out.numel()); }
  void split_qkv_rope(Tensor q, Tensor k, Tensor v, Tensor qkv, std::span<const int32_t> positions, Tensor inv_freq,
                      int rope_dim, RopeStyle style) override {
    check_split_qkv_rope(q, k, v, qkv, positions.size());
    split_qkv_rope_ref(q.f32(), k.f32(), v.f32(), qkv.f32(), positions.data(), inv_freq.f32(), q.shape[0],
                       static_cast<int>(q.shape[1]), static_cast<int>(k.shape[1]), static_cast<int>(q.shape[2]),
                       rope_dim, style);
  }
  void split_qkv_shift_rope(Tensor q, Tensor k, Tensor v, Tensor qkv, const KvShiftArgs& a,
                            std::span<const int32_t> positions, Tensor inv_freq, int rope_dim,
                            RopeStyle style) override {
    check_split_qkv_rope(q, k, v, qkv, positions.size());
    check_kv_shift(k, a);
    split_qkv_shift_rope_ref(q.f32(), k.f32(), v.f32(), qkv.f32(), a.prev.f32(), a.prev_index.data(), a.k_shift.f32(),
                             a.v_shift.f32(), positions.data(), inv_freq.f32(), q.shape[0],
                             static_cast<int>(q.shape[1]), static_cast<int>(k.shape[1]),
                             static_cast<int>(q.shape[2]), rope_dim, style);
  }
  void kv_shift_rope(Tensor k, Tensor v, Tensor k_raw, Tensor v_raw, const KvShiftArgs& a,
                     std::span<const int32_t> positions, Tensor inv_freq, int rope_dim, RopeStyle style) override {
    SS_CHECK(k.numel() == v.numel() && k_raw.numel() == k.numel() && v_raw.numel() == k.numel() &&
                 positions.size() == static_cast<size_t>(k.shape[0]) && k.data != k_raw.data && v.data != v_raw.data,
             "kv_shift_rope: k {} v {} from {} / {} elements for {} positions", k.numel(), v.numel(), k_raw.numel(),
             v_raw.numel(), positions.size());
    check_kv_shift(k, a);
    const int nkv = static_cast<int>(k.shape[1]), hd = static_cast<int>(k.shape[2]);
    kv_shift_ref(k.f32(), v.f32(), k_raw.f32(), v_raw.f32(), int64_t{nkv} * hd, a.prev.f32(), a.prev_index.data(),
                 a.k_shift.f32(), a.v_shift.f32(), k.shape[0], nkv, hd);
    rope_ref(k.f32(), positions.data(), inv_freq.f32(), k.shape[0], nkv, hd, rope_dim, style);
  }
  void swiglu_fused(Tensor out, Tensor gate_up) override {
    SS_CHECK(gate_up.rows() == out.rows() && gate_up.cols() == 2 * out.cols(), "swiglu_fused ({}x{}) -> ({}x{})",
             gate_up.rows(), gate_up.cols(), out.rows(), out.cols());
    swiglu_fused_ref(out.f32(), gate_up.f32(), out.rows(), out.cols());
  }
  void add_rms_norm(Tensor out, Tensor x, Tensor h, Tensor weight, float eps) override {
    SS_CHECK(x.numel() == h.numel() && out.numel() == x.numel() && out.data != x.data && out.data != h.data,
             "add_rms_norm: {} + {} -> {} elements", x.numel(), h.numel(), out.numel());
    add_rms_norm_ref(out.f32(), x.f32(), h.f32(), weight.f32(), x.rows(), static_cast<int>(x.cols()), eps);
  }
  void add_bias(Tensor x, Tensor bias) override {
    SS_CHECK(bias.numel() == x.cols(), "add_bias: {} columns, bias of {}", x.cols(), bias.numel());
    add_bias_ref(x.f32(), bias.f32(), x.rows(), x.cols());
  }
  void gelu_tanh_mul(Tensor out, Tensor gate, Tensor up) override {
    SS_CHECK(out.numel() == gate.numel() && out.numel() == up.numel(), "gelu_tanh_mul {} {} {}", out.numel(),
             gate.numel(), up.numel());
    gelu_tanh_mul_ref(out.f32(), gate.f32(), up.f32(), out.numel());
  }
  void gelu_tanh(Tensor out, Tensor in) override {
    SS_CHECK(out.numel() == in.numel(), "gelu_tanh {} -> {}", in.numel(), out.numel());
    gelu_tanh_ref(out.f32(), in.f32(), out.numel());
  }
  void layer_norm(Tensor out, Tensor in, Tensor weight, Tensor bias, float eps) override {
    SS_CHECK(out.numel() == in.numel() && weight.numel() == in.cols() && bias.numel() == in.cols(),
             "layer_norm: {} x {} -> {}, weight {}, bias {}", in.rows(), in.cols(), out.numel(), weight.numel(),
             bias.numel());
    layer_norm_ref(out.f32(), in.f32(), weight.f32(), bias.f32(), in.rows(), static_cast<int>(in.cols()), eps);
  }
  void scale_softcap(Tensor x, float scale, float cap) override { scale_softcap_ref(x.f32(), scale, cap, x.numel()); }
  void head_temperature(Tensor x, Tensor temperature, std::span<const int32_t> positions) override {
    SS_CHECK(x.ndim == 3 && temperature.ndim == 2 && temperature.shape[0] == x.shape[1] &&
                 static_cast<int64_t>(positions.size()) == x.shape[0],
             "head_temperature: x {} x {} x {}, temperature {} x {}, {} positions", x.shape[0], x.shape[1],
             x.shape[2], temperature.shape[0], temperature.shape[1], positions.size());
    for (int32_t p : positions) {
      SS_CHECK(p >= 0 && p < temperature.shape[1], "head_temperature: position {} outside {} temperature columns", p,
               temperature.shape[1]);
    }
    head_temperature_ref(x.f32(), temperature.f32(), positions.data(), x.shape[0], static_cast<int>(x.shape[1]),
                         static_cast<int>(x.shape[2]), temperature.shape[1]);
  }
  void causal_conv1d_silu(Tensor out, Tensor in, int64_t in_col, Tensor weight, Tensor bias, Tensor tail,
                          SsmRows rows) override {
    const int64_t conv_dim = out.cols();
    const int width = static_cast<int>(weight.numel() / (conv_dim > 0 ? conv_dim : 1));
    SS_CHECK(in.rows() == out.rows() && in_col + conv_dim <= in.cols() && bias.numel() == conv_dim &&
                 weight.numel() == conv_dim * width && width >= 1 &&
                 tail.numel() % (int64_t{width - 1 > 0 ? width - 1 : 1} * conv_dim) == 0 &&
                 rows.seq.size() == static_cast<size_t>(out.rows()) && rows.reset.size() == rows.seq.size(),
             "causal_conv1d_silu: {} rows of {} from column {} of {}, weight {}, bias {}, tail {}", out.rows(),
             conv_dim, in_col, in.cols(), weight.numel(), bias.numel(), tail.numel());
    causal_conv1d_silu_ref(out.f32(), in.f32() + in_col, in.cols(), weight.f32(), bias.f32(), tail.f32(), out.rows(),
                           conv_dim, width, rows);
  }
  void ssd_scan(Tensor y, Tensor xbc, Tensor dt_src, int64_t dt_col, Tensor A_log, Tensor D, Tensor dt_bias,
                Tensor state, const SsmDims& d, SsmRows rows) override {
    SS_CHECK(y.cols() == d.d_inner() && xbc.cols() == d.conv_dim() && xbc.rows() == y.rows() &&
                 dt_src.rows() == y.rows() && dt_col + d.n_heads <= dt_src.cols() && A_log.numel() == d.n_heads &&
                 D.numel() == d.n_heads && dt_bias.numel() == d.n_heads &&
                 state.numel() % (d.d_inner() * d.d_state) == 0 && rows.seq.size() == static_cast<size_t>(y.rows()),
             "ssd_scan: {} rows, y {} x {}, xbc {} columns, dt {} from {}, {} heads x {} x {} states", y.rows(),
             y.cols(), d.d_inner(), xbc.cols(), dt_src.cols(), dt_col, d.n_heads, d.head_dim, d.d_state);
    const float* x = xbc.f32();
    const float* b = x + d.d_inner();
    const float* c = b + int64_t{d.n_groups} * d.d_state;
    ssd_scan_ref(y.f32(), x, xbc.cols(), b, c, xbc.cols(), dt_src.f32() + dt_col, dt_src.cols(), A_log.f32(), D.f32(),
                 dt_bias.f32(), state.f32(), y.rows(), d.n_heads, d.head_dim, d.n_groups, d.d_state, rows);
  }
  void gated_rms_norm(Tensor out, Tensor y, Tensor z_src, int64_t z_col, Tensor weight, float eps) override {
    SS_CHECK(out.numel() == y.numel() && y.rows() == z_src.rows() && z_col + y.cols() <= z_src.cols() &&
                 weight.numel() == y.cols(),
             "gated_rms_norm: {} x {}, z {} columns from {}, weight {}", y.rows(), y.cols(), z_src.cols(), z_col,
             weight.numel());
    gated_rms_norm_ref(out.f32(), y.f32(), z_src.f32() + z_col, z_src.cols(), weight.f32(), y.rows(), y.cols(), eps);
  }
  Status check_features(const BackendFeatures&) const override { return Status(); }

  void partial_attention(const AttentionCall& c) override {
    segs_.clear();
    for (const KvView& kv : c.kv) segs_.push_back({kv.k.f32(), kv.v.f32(), kv.n_tokens()});
    PartialAttentionParams p;
    p.out = c.out.f32();
    p.lse = c.lse;
    p.entropy = c.entropy;
    p.q = c.q.f32();
    p.kv = segs_;
    p.n_q = c.n_q();
    p.n_heads = c.n_heads;
    p.n_kv_heads = c.n_kv_heads;
    p.head_dim = c.head_dim;
    p.scale = c.scale;
    p.softcap = c.softcap;
    p.mask = c.mask;
    partial_attention_cpu(p);
  }
  void merge_partials(float* out, float* lse, float* entropy, std::span<const AttentionPartial> parts,
                      int64_t n_rows, int head_dim) override {
    merge_partials_ref(out, lse, entropy, parts, n_rows, head_dim);
  }
  void merge_sum_terms(float* terms, const float* out, const float* lse, const float* entropy, const float* max_lse,
                       int64_t n_rows, int head_dim) override {
    merge_sum_terms_ref(terms, out, lse, entropy, max_lse, n_rows, head_dim);
  }
  void merge_sum_finish(float* out, float* lse, float* entropy, const float* terms, const float* max_lse,
                        int64_t n_rows, int head_dim) override {
    merge_sum_finish_ref(out, lse, entropy, terms, max_lse, n_rows, head_dim);
  }

 private:
  std::vector<KvSegment> segs_;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(int threads) {
  if (threads > 0) openblas_set_num_threads(threads);
  return std::make_unique<CpuBackend>();
}

Result<CudaBackendOptions::Prefill> parse_prefill_kernel(const std::string& name) {
  using Prefill = CudaBackendOptions::Prefill;
  if (name == "auto") return Prefill::kAuto;
  if (name == "wgmma") return Prefill::kWgmma;
  if (name == "mma") return Prefill::kMma;
  return invalid_argument("prefill kernel \"{}\" is not one of auto, wgmma, mma", name);
}

#if !STARSERVE_HAVE_CUDA
Result<std::unique_ptr<Backend>> make_cuda_backend(int device, const CudaBackendOptions&) {
  return unimplemented("--backend cuda (device {}): this build has no CUDA backend (nvcc was not found at configure "
                       "time); use --backend cpu",
                       device);
}
int cuda_device_count() { return 0; }
#endif

}  // namespace starserve
