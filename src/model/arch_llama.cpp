// Llama-family architecture: pre-norm blocks of RMSNorm -> GQA attention with RoPE -> residual,
// RMSNorm -> SwiGLU MLP -> residual; final RMSNorm and an output projection (tied or separate).
// Every size comes from ModelHParams.
#include <cmath>
#include <numbers>

#include <spdlog/spdlog.h>

#include "model/model.h"

namespace starserve {

std::vector<float> rope_inv_freq(const ModelHParams& hp, std::span<const float> rope_freqs) {
  const int half = hp.rope_dim / 2;
  std::vector<float> inv(half);
  for (int i = 0; i < half; ++i) {
    // theta^(-2i/d), as the references compute it (fp32 result).
    inv[i] = static_cast<float>(1.0 / std::pow(static_cast<double>(hp.rope_theta), (2.0 * i) / hp.rope_dim));
  }
  const RopeScaling& rs = hp.rope_scaling;
  if (rs.type == RopeScaling::Type::kLinear) {
    for (float& f : inv) f /= rs.factor;
  } else if (rs.type == RopeScaling::Type::kLlama3) {
    // Llama 3.1 scaling: long wavelengths are stretched by `factor`, short ones kept, and the band
    // between low_freq_wavelen and high_freq_wavelen interpolated smoothly.
    const double low_wavelen = rs.original_context / rs.low_freq_factor;
    const double high_wavelen = rs.original_context / rs.high_freq_factor;
    for (float& f : inv) {
      const double wavelen = 2.0 * std::numbers::pi / f;
      if (wavelen < high_wavelen) continue;
      if (wavelen > low_wavelen) {
        f = static_cast<float>(f / rs.factor);
        continue;
      }
      const double smooth = (rs.original_context / wavelen - rs.low_freq_factor) /
                            (rs.high_freq_factor - rs.low_freq_factor);
      f = static_cast<float>((1.0 - smooth) * f / rs.factor + smooth * f);
    }
  }
  if (!rope_freqs.empty()) {
    for (int i = 0; i < half && i < static_cast<int>(rope_freqs.size()); ++i) inv[i] /= rope_freqs[i];
  }
  return inv;
}

namespace {

struct LayerWeights {
  Tensor attn_norm, wq, wk, wv, wo, ffn_norm, w_gate, w_up, w_down;
};

class LlamaModel final : public Model {
 public:
  LlamaModel(const ModelHParams& hp, Backend& backend) : hp_(hp), backend_(backend) {}

  const ModelHParams& hparams() const override { return hp_; }
  Backend& backend() override { return backend_; }

  Status load(const WeightSource& src) {
    SS_ASSIGN_OR_RETURN(tok_embd_, upload(src, "token_embd.weight", {hp_.n_vocab, hp_.hidden}));
    SS_ASSIGN_OR_RETURN(output_norm_, upload(src, "output_norm.weight", {hp_.hidden}));
    if (hp_.tied_embeddings) {
      output_ = tok_embd_;
    } else {
      SS_ASSIGN_OR_RETURN(output_, upload(src, "output.weight", {hp_.n_vocab, hp_.hidden}));
    }
    const int64_t q_dim = static_cast<int64_t>(hp_.n_heads) * hp_.head_dim;
    const int64_t kv_dim = static_cast<int64_t>(hp_.n_kv_heads) * hp_.head_dim;
    for (int l = 0; l < hp_.n_layers; ++l) {
      const std::string p = "blk." + std::to_string(l) + ".";
      LayerWeights w;
      SS_ASSIGN_OR_RETURN(w.attn_norm, upload(src, p + "attn_norm.weight", {hp_.hidden}));
      SS_ASSIGN_OR_RETURN(w.wq, upload(src, p + "attn_q.weight", {q_dim, hp_.hidden}));
      SS_ASSIGN_OR_RETURN(w.wk, upload(src, p + "attn_k.weight", {kv_dim, hp_.hidden}));
      SS_ASSIGN_OR_RETURN(w.wv, upload(src, p + "attn_v.weight", {kv_dim, hp_.hidden}));
      SS_ASSIGN_OR_RETURN(w.wo, upload(src, p + "attn_output.weight", {hp_.hidden, q_dim}));
      SS_ASSIGN_OR_RETURN(w.ffn_norm, upload(src, p + "ffn_norm.weight", {hp_.hidden}));
      SS_ASSIGN_OR_RETURN(w.w_gate, upload(src, p + "ffn_gate.weight", {hp_.ffn_hidden, hp_.hidden}));
      SS_ASSIGN_OR_RETURN(w.w_up, upload(src, p + "ffn_up.weight", {hp_.ffn_hidden, hp_.hidden}));
      SS_ASSIGN_OR_RETURN(w.w_down, upload(src, p + "ffn_down.weight", {hp_.hidden, hp_.ffn_hidden}));
      layers_.push_back(w);
      if ((l + 1) % 8 == 0 || l + 1 == hp_.n_layers) spdlog::debug("loaded layer {}/{}", l + 1, hp_.n_layers);
    }
    std::vector<float> rope_freqs;
    if (src.has("rope_freqs.weight")) {
      SS_ASSIGN_OR_RETURN(HostTensor rf, src.load("rope_freqs.weight"));
      rope_freqs = std::move(rf.data);
    }
    const std::vector<float> inv = rope_inv_freq(hp_, rope_freqs);
    buffers_.push_back(backend_.alloc(inv.size() * sizeof(float)));
    inv_freq_ = buffers_.back().view(DType::kF32, {static_cast<int64_t>(inv.size())});
    backend_.upload_f32(inv_freq_, inv.data());
    return Status();
  }

  Status forward(std::span<const BatchSeq> batch, AttentionHandler& attn, std::vector<float>* logits) override {
    DeviceBuffer lg_buf;
    Tensor lg;
    SS_RETURN_IF_ERROR(run(batch, attn, logits != nullptr, &lg_buf, &lg));
    if (logits == nullptr) return Status();
    logits->resize(static_cast<size_t>(lg.numel()));
    backend_.download_f32(logits->data(), lg);
    return Status();
  }

  Status forward_sample(std::span<const BatchSeq> batch, AttentionHandler& attn, std::span<const SampleRow> rows,
                        std::span<int32_t> tokens) override {
    SS_CHECK(backend_.can_sample_rows(), "backend {} does not sample on the device", backend_.name());
    DeviceBuffer lg_buf;
    Tensor lg;
    SS_RETURN_IF_ERROR(run(batch, attn, true, &lg_buf, &lg));
    SS_CHECK(static_cast<int64_t>(rows.size()) == lg.rows(), "{} sampling rows for {} logits rows", rows.size(),
             lg.rows());
    backend_.sample_rows(tokens, lg, rows);
    return Status();
  }

 private:
  // Every layer over the batch; with want_logits, *lg = (rows, n_vocab) logits on the device in
  // the compute dtype (per sequence in batch order: every token if all_logits, else the last),
  // held by *lg_buf.
  Status run(std::span<const BatchSeq> batch, AttentionHandler& attn, bool want_logits, DeviceBuffer* lg_buf,
             Tensor* lg) {
    std::vector<int32_t> ids, pos;
    int64_t n_out = 0;
    for (const BatchSeq& s : batch) {
      SS_CHECK(s.tokens.size() == s.positions.size() && !s.tokens.empty(), "seq {} tokens {} positions {}",
               s.seq_id, s.tokens.size(), s.positions.size());
      for (int32_t t : s.tokens) {
        if (t < 0 || t >= hp_.n_vocab) return invalid_argument("token id {} out of range [0, {})", t, hp_.n_vocab);
      }
      ids.insert(ids.end(), s.tokens.begin(), s.tokens.end());
      pos.insert(pos.end(), s.positions.begin(), s.positions.end());
      n_out += s.all_logits ? static_cast<int64_t>(s.tokens.size()) : 1;
    }
    const int64_t t = static_cast<int64_t>(ids.size());
    const int64_t hd = hp_.head_dim, nh = hp_.n_heads, nkv = hp_.n_kv_heads;
    const DType dt = backend_.compute_dtype();

    // Activations for this call. (T, hidden) residual, (T, ffn) MLP scratch.
    DeviceBuffer x_buf = backend_.alloc(t * hp_.hidden * dtype_size(dt));
    DeviceBuffer h_buf = backend_.alloc(t * hp_.hidden * dtype_size(dt));
    DeviceBuffer q_buf = backend_.alloc(t * nh * hd * dtype_size(dt));
    DeviceBuffer k_buf = backend_.alloc(t * nkv * hd * dtype_size(dt));
    DeviceBuffer v_buf = backend_.alloc(t * nkv * hd * dtype_size(dt));
    DeviceBuffer a_buf = backend_.alloc(t * nh * hd * dtype_size(dt));
    DeviceBuffer g_buf = backend_.alloc(t * hp_.ffn_hidden * dtype_size(dt));
    DeviceBuffer u_buf = backend_.alloc(t * hp_.ffn_hidden * dtype_size(dt));
    Tensor x = x_buf.view(dt, {t, hp_.hidden}), h = h_buf.view(dt, {t, hp_.hidden});
    Tensor q = q_buf.view(dt, {t, nh, hd}), k = k_buf.view(dt, {t, nkv, hd}), v = v_buf.view(dt, {t, nkv, hd});
    Tensor a = a_buf.view(dt, {t, nh, hd});
    Tensor g = g_buf.view(dt, {t, hp_.ffn_hidden}), u = u_buf.view(dt, {t, hp_.ffn_hidden});
    auto flat = [](Tensor m) { return Tensor::make(m.data, m.dtype, {m.shape[0], m.numel() / m.shape[0]}); };

    SS_RETURN_IF_ERROR(attn.begin_forward(batch));
    backend_.embedding(x, tok_embd_, ids);
    for (int l = 0; l < hp_.n_layers; ++l) {
      const LayerWeights& w = layers_[l];
      backend_.rms_norm(h, x, w.attn_norm, hp_.rms_eps);
      backend_.matmul(flat(q), h, w.wq);
      backend_.matmul(flat(k), h, w.wk);
      backend_.matmul(flat(v), h, w.wv);
      backend_.rope(q, pos, inv_freq_, hp_.rope_dim, hp_.rope_style);
      backend_.rope(k, pos, inv_freq_, hp_.rope_dim, hp_.rope_style);
      Status st = attn.attend(l, batch, q, k, v, a);
      if (!st.ok()) {
        attn.end_forward({});
        return st;
      }
      backend_.matmul(h, flat(a), w.wo);
      backend_.add(x, x, h);
      backend_.rms_norm(h, x, w.ffn_norm, hp_.rms_eps);
      backend_.matmul(g, h, w.w_gate);
      backend_.matmul(u, h, w.w_up);
      backend_.swiglu(g, g, u);
      backend_.matmul(h, g, w.w_down);
      backend_.add(x, x, h);
    }
    attn.end_forward(batch);
    if (!want_logits) return Status();

    // Gather the rows that need logits, then norm + output projection on those rows only.
    DeviceBuffer sel_buf = backend_.alloc(n_out * hp_.hidden * dtype_size(dt));
    Tensor sel = sel_buf.view(dt, {n_out, hp_.hidden});
    int64_t row = 0, start = 0;
    for (const BatchSeq& s : batch) {
      const int64_t n = static_cast<int64_t>(s.tokens.size());
      if (s.all_logits) {
        backend_.copy(sel.slice_rows(row, n), x.slice_rows(start, n));
        row += n;
      } else {
        backend_.copy(sel.slice_rows(row, 1), x.slice_rows(start + n - 1, 1));
        row += 1;
      }
      start += n;
    }
    backend_.rms_norm(sel, sel, output_norm_, hp_.rms_eps);
    *lg_buf = backend_.alloc(n_out * hp_.n_vocab * dtype_size(dt));
    *lg = lg_buf->view(dt, {n_out, hp_.n_vocab});
    backend_.matmul(*lg, sel, output_);
    return Status();
  }

  Result<Tensor> upload(const WeightSource& src, const std::string& name, std::initializer_list<int64_t> dims) {
    SS_ASSIGN_OR_RETURN(HostTensor ht, src.load(name));
    std::vector<int64_t> want(dims);
    if (ht.numel() != Tensor::make(nullptr, DType::kF32, dims).numel() || ht.shape.back() != want.back()) {
      std::string got, exp;
      for (int64_t d : ht.shape) got += (got.empty() ? "" : "x") + std::to_string(d);
      for (int64_t d : want) exp += (exp.empty() ? "" : "x") + std::to_string(d);
      return data_loss("tensor {} has shape {}, the hyper-parameters say {}", name, got, exp);
    }
    const DType dt = backend_.compute_dtype();
    Tensor t = Tensor::make(nullptr, dt, dims);
    buffers_.push_back(backend_.alloc(t.bytes()));
    t.data = buffers_.back().data();
    backend_.upload_f32(t, ht.data.data());
    return t;
  }

  ModelHParams hp_;
  Backend& backend_;
  std::vector<DeviceBuffer> buffers_;  // owns every weight
  Tensor tok_embd_, output_norm_, output_, inv_freq_;
  std::vector<LayerWeights> layers_;
};

}  // namespace

Result<std::unique_ptr<Model>> create_model(const WeightSource& source, Backend& backend) {
  const ModelHParams& hp = source.hparams();
  switch (hp.arch) {
    case Arch::kLlama: {
      auto m = std::make_unique<LlamaModel>(hp, backend);
      SS_RETURN_IF_ERROR(m->load(source));
      return std::unique_ptr<Model>(std::move(m));
    }
  }
  return unimplemented("architecture {} is not supported", hp.arch_name);
}

}  // namespace starserve
