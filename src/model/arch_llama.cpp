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

// The q, k, v projections are stored as one matrix (rows [q | k | v]) and gate, up as another
// (rows [gate | up]): a decode step reads each group in one GEMM, while a prefill multiplies by the
// row ranges wq, wk, wv, w_gate, w_up (views into them) and keeps its activations smaller.
struct LayerWeights {
  Tensor attn_norm, wqkv, wq, wk, wv, wo, ffn_norm, w_gate_up, w_gate, w_up, w_down;
};

class LlamaModel final : public Model {
 public:
  LlamaModel(const ModelHParams& hp, Backend& backend, const ModelOptions& options)
      : hp_(hp), backend_(backend), options_(options) {}

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
      SS_ASSIGN_OR_RETURN(w.wqkv, upload_rows(src, {{p + "attn_q.weight", q_dim}, {p + "attn_k.weight", kv_dim},
                                                    {p + "attn_v.weight", kv_dim}},
                                              hp_.hidden));
      w.wq = w.wqkv.slice_rows(0, q_dim);
      w.wk = w.wqkv.slice_rows(q_dim, kv_dim);
      w.wv = w.wqkv.slice_rows(q_dim + kv_dim, kv_dim);
      SS_ASSIGN_OR_RETURN(w.wo, upload(src, p + "attn_output.weight", {hp_.hidden, q_dim}));
      SS_ASSIGN_OR_RETURN(w.ffn_norm, upload(src, p + "ffn_norm.weight", {hp_.hidden}));
      SS_ASSIGN_OR_RETURN(w.w_gate_up, upload_rows(src, {{p + "ffn_gate.weight", hp_.ffn_hidden},
                                                         {p + "ffn_up.weight", hp_.ffn_hidden}},
                                                   hp_.hidden));
      w.w_gate = w.w_gate_up.slice_rows(0, hp_.ffn_hidden);
      w.w_up = w.w_gate_up.slice_rows(hp_.ffn_hidden, hp_.ffn_hidden);
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

    // Activations for this call. (T, hidden) residual x, normed xn, projection h; (T, ffn) MLP
    // scratch; on the fused path also (T, q + 2 kv) and (T, 2 ffn) for the fused projections.
    // Fused path (ModelOptions): one GEMM for q|k|v and one for gate|up, RoPE fused with the q|k|v
    // split, each residual add fused with the norm after it. A decode step is bound by its launches
    // and small GEMMs; large batches are GEMM bound and skip the (T, q + 2 kv), (T, 2 ffn) buffers.
    const bool fused = t <= options_.fused_max_tokens;
    const int64_t ffn = hp_.ffn_hidden, qkv_cols = (nh + 2 * nkv) * hd;
    std::vector<DeviceBuffer> bufs;  // freed in stream order when this call returns
    auto make = [&](std::initializer_list<int64_t> dims) {
      Tensor m = Tensor::make(nullptr, dt, dims);
      bufs.push_back(backend_.alloc(m.bytes()));
      m.data = bufs.back().data();
      return m;
    };
    Tensor x = make({t, hp_.hidden}), h = make({t, hp_.hidden});
    Tensor xn = fused ? make({t, hp_.hidden}) : h;  // unfused: the norm's output may take h's place
    Tensor q = make({t, nh, hd}), k = make({t, nkv, hd}), v = make({t, nkv, hd}), a = make({t, nh, hd});
    Tensor g = make({t, ffn});
    Tensor u = fused ? Tensor() : make({t, ffn});
    Tensor qkv = fused ? make({t, qkv_cols}) : Tensor();
    Tensor gu = fused ? make({t, 2 * ffn}) : Tensor();
    auto flat = [](Tensor m) { return Tensor::make(m.data, m.dtype, {m.shape[0], m.numel() / m.shape[0]}); };

    // A decode step (one token per sequence) may run as CUDA graphs (Backend::begin_graph_step);
    // the step ends when this call returns, before its activations are freed.
    struct GraphStep {
      Backend* backend;
      ~GraphStep() {
        if (backend) backend->end_graph_step();
      }
    } graph_step{t == static_cast<int64_t>(batch.size()) ? &backend_ : nullptr};
    if (graph_step.backend) backend_.begin_graph_step();

    Status st = attn.begin_forward(batch);
    if (!st.ok()) return st;
    backend_.embedding(x, tok_embd_, ids);
    for (int l = 0; l < hp_.n_layers; ++l) {
      const LayerWeights& w = layers_[l];
      // xn = attn_norm(x); on the fused path the previous layer's last add already produced it.
      if (!fused || l == 0) backend_.rms_norm(xn, x, w.attn_norm, hp_.rms_eps);
      if (fused) {
        backend_.matmul(qkv, xn, w.wqkv);
        backend_.split_qkv_rope(q, k, v, qkv, pos, inv_freq_, hp_.rope_dim, hp_.rope_style);
      } else {
        backend_.matmul(flat(q), xn, w.wq);
        backend_.matmul(flat(k), xn, w.wk);
        backend_.matmul(flat(v), xn, w.wv);
        backend_.rope(q, pos, inv_freq_, hp_.rope_dim, hp_.rope_style);
        backend_.rope(k, pos, inv_freq_, hp_.rope_dim, hp_.rope_style);
      }
      st = attn.attend(l, batch, q, k, v, a);
      if (!st.ok()) {
        attn.end_forward({});
        return st;
      }
      backend_.matmul(h, flat(a), w.wo);
      if (fused) {
        backend_.add_rms_norm(xn, x, h, w.ffn_norm, hp_.rms_eps);
        backend_.matmul(gu, xn, w.w_gate_up);
        backend_.swiglu_fused(g, gu);
        backend_.matmul(h, g, w.w_down);
        if (l + 1 < hp_.n_layers) {
          backend_.add_rms_norm(xn, x, h, layers_[l + 1].attn_norm, hp_.rms_eps);
        } else {
          backend_.add(x, x, h);
        }
      } else {
        backend_.add(x, x, h);
        backend_.rms_norm(xn, x, w.ffn_norm, hp_.rms_eps);
        backend_.matmul(g, xn, w.w_gate);
        backend_.matmul(u, xn, w.w_up);
        backend_.swiglu(g, g, u);
        backend_.matmul(h, g, w.w_down);
        backend_.add(x, x, h);
      }
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

  // Several (rows_i, cols) tensors stacked row-wise into one device matrix, in the order given.
  Result<Tensor> upload_rows(const WeightSource& src, std::initializer_list<std::pair<std::string, int64_t>> parts,
                             int64_t cols) {
    int64_t rows = 0;
    for (const auto& part : parts) rows += part.second;
    std::vector<float> all;
    all.reserve(static_cast<size_t>(rows * cols));
    for (const auto& [name, part_rows] : parts) {
      SS_ASSIGN_OR_RETURN(HostTensor ht, src.load(name));
      if (ht.numel() != part_rows * cols || ht.shape.back() != cols) {
        std::string got;
        for (int64_t d : ht.shape) got += (got.empty() ? "" : "x") + std::to_string(d);
        return data_loss("tensor {} has shape {}, the hyper-parameters say {}x{}", name, got, part_rows, cols);
      }
      all.insert(all.end(), ht.data.begin(), ht.data.end());
    }
    Tensor t = Tensor::make(nullptr, backend_.compute_dtype(), {rows, cols});
    buffers_.push_back(backend_.alloc(t.bytes()));
    t.data = buffers_.back().data();
    backend_.upload_f32(t, all.data());
    return t;
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
  ModelOptions options_;
  std::vector<DeviceBuffer> buffers_;  // owns every weight
  Tensor tok_embd_, output_norm_, output_, inv_freq_;
  std::vector<LayerWeights> layers_;
};

}  // namespace

Result<std::unique_ptr<Model>> create_model(const WeightSource& source, Backend& backend,
                                            const ModelOptions& options) {
  const ModelHParams& hp = source.hparams();
  switch (hp.arch) {
    case Arch::kLlama: {
      auto m = std::make_unique<LlamaModel>(hp, backend, options);
      SS_RETURN_IF_ERROR(m->load(source));
      return std::unique_ptr<Model>(std::move(m));
    }
  }
  return unimplemented("architecture {} is not supported", hp.arch_name);
}

}  // namespace starserve
