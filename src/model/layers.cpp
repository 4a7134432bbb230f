#include "model/layers.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "common/log.h"

namespace starserve {

namespace {

std::string shape_text(std::span<const int64_t> dims) {
  std::string s;
  for (int64_t d : dims) s += (s.empty() ? "" : "x") + std::to_string(d);
  return s;
}

}  // namespace

// ---------------------------------------------------------------- weights and activations

Result<Tensor> WeightStore::load(const std::string& name, std::initializer_list<int64_t> dims) {
  SS_ASSIGN_OR_RETURN(HostTensor ht, source_.load(name));
  const std::vector<int64_t> want(dims);
  if (ht.numel() != Tensor::make(nullptr, DType::kF32, dims).numel() || ht.shape.back() != want.back()) {
    return data_loss("tensor {} has shape {}, the hyper-parameters say {}", name, shape_text(ht.shape),
                     shape_text(want));
  }
  Tensor t = Tensor::make(nullptr, backend_.compute_dtype(), dims);
  buffers_.push_back(backend_.alloc(t.bytes()));
  t.data = buffers_.back().data();
  backend_.upload_f32(t, ht.data.data());
  return t;
}

Result<Tensor> WeightStore::load_stacked(std::initializer_list<std::pair<std::string, int64_t>> parts, int64_t cols) {
  int64_t rows = 0;
  for (const auto& part : parts) rows += part.second;
  std::vector<float> all;
  all.reserve(static_cast<size_t>(rows * cols));
  for (const auto& [name, part_rows] : parts) {
    SS_ASSIGN_OR_RETURN(HostTensor ht, source_.load(name));
    if (ht.numel() != part_rows * cols || ht.shape.back() != cols) {
      return data_loss("tensor {} has shape {}, the hyper-parameters say {}x{}", name, shape_text(ht.shape),
                       part_rows, cols);
    }
    all.insert(all.end(), ht.data.begin(), ht.data.end());
  }
  Tensor t = Tensor::make(nullptr, backend_.compute_dtype(), {rows, cols});
  buffers_.push_back(backend_.alloc(t.bytes()));
  t.data = buffers_.back().data();
  backend_.upload_f32(t, all.data());
  return t;
}

Result<Tensor> WeightStore::load_offset(const std::string& name, std::initializer_list<int64_t> dims, float offset) {
  if (offset == 0.0f) return load(name, dims);
  SS_ASSIGN_OR_RETURN(HostTensor ht, source_.load(name));
  const std::vector<int64_t> want(dims);
  if (ht.numel() != Tensor::make(nullptr, DType::kF32, dims).numel() || ht.shape.back() != want.back()) {
    return data_loss("tensor {} has shape {}, the hyper-parameters say {}", name, shape_text(ht.shape),
                     shape_text(want));
  }
  for (float& v : ht.data) v += offset;
  Tensor t = Tensor::make(nullptr, backend_.compute_dtype(), dims);
  buffers_.push_back(backend_.alloc(t.bytes()));
  t.data = buffers_.back().data();
  backend_.upload_f32(t, ht.data.data());
  return t;
}

Tensor WeightStore::upload_f32(const std::vector<float>& values) {
  buffers_.push_back(backend_.alloc(values.size() * sizeof(float)));
  Tensor t = buffers_.back().view(DType::kF32, {static_cast<int64_t>(values.size())});
  backend_.upload_f32(t, values.data());
  return t;
}

Tensor Activations::make(std::initializer_list<int64_t> dims) {
  Tensor m = Tensor::make(nullptr, backend_.compute_dtype(), dims);
  bufs_.push_back(backend_.alloc(m.bytes()));
  m.data = bufs_.back().data();
  return m;
}

// ---------------------------------------------------------------- batch and positions

Result<FlatBatch> flatten_batch(std::span<const BatchSeq> batch, int n_vocab) {
  FlatBatch f;
  for (const BatchSeq& s : batch) {
    SS_CHECK(s.tokens.size() == s.positions.size() && !s.tokens.empty(), "seq {} tokens {} positions {}", s.seq_id,
             s.tokens.size(), s.positions.size());
    for (int32_t t : s.tokens) {
      if (t < 0 || t >= n_vocab) return invalid_argument("token id {} out of range [0, {})", t, n_vocab);
    }
    f.ids.insert(f.ids.end(), s.tokens.begin(), s.tokens.end());
    f.positions.insert(f.positions.end(), s.positions.begin(), s.positions.end());
    f.n_out += s.all_logits ? static_cast<int64_t>(s.tokens.size()) : 1;
  }
  return f;
}

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
  if (rs.type == RopeScaling::Type::kLongRope) {
    // LongRoPE: theta_i = theta^(-2i/d) / f_i with the long or the short factors (hparams.h); from
    // GGUF they arrive as rope_freqs (Rope::load), from config.json they are in the hparams.
    const std::vector<float>& f = hp.rope_long_factors() ? rs.long_factor : rs.short_factor;
    for (int i = 0; i < half && i < static_cast<int>(f.size()); ++i) inv[i] /= f[i];
  }
  if (!rope_freqs.empty()) {
    for (int i = 0; i < half && i < static_cast<int>(rope_freqs.size()); ++i) inv[i] /= rope_freqs[i];
  }
  return inv;
}

namespace {
// LongRoPE's preconditions: one factor per rotated pair, every dimension rotated when the
// attention factor is not 1 (it is folded into the score scale, ModelHParams::attention_scale),
// and one RoPE for every layer (the score scale is the model's).
Result<std::vector<float>> longrope_factors(WeightStore& store, const ModelHParams& hp) {
  const RopeScaling& rs = hp.rope_scaling;
  const bool use_long = hp.rope_long_factors();
  if (rs.attn_factor != 1.0f && hp.rope_dim != hp.head_dim) {
    return unimplemented("LongRoPE with attention factor {} on {} of {} rotated dimensions is not supported "
                         "(partial rotation)",
                         rs.attn_factor, hp.rope_dim, hp.head_dim);
  }
  if (hp.rope_theta_local > 0.0f) {
    return unimplemented("LongRoPE with a separate RoPE base for the windowed layers is not supported");
  }
  std::vector<float> file;  // GGUF: the factors are tensors
  const std::vector<float>* f = use_long ? &rs.long_factor : &rs.short_factor;
  const char* tensor = use_long ? "rope_factors_long.weight" : "rope_factors_short.weight";
  if (rs.long_factor.empty() && rs.short_factor.empty()) {
    if (!store.has(tensor)) return not_found("LongRoPE: the weights have no {}", tensor);
    SS_ASSIGN_OR_RETURN(HostTensor t, store.load_host(tensor));
    file = std::move(t.data);
    f = &file;
  }
  if (static_cast<int>(f->size()) != hp.rope_dim / 2) {
    return data_loss("LongRoPE: {} {} factors for {} rotated pairs", use_long ? "long" : "short", f->size(),
                     hp.rope_dim / 2);
  }
  for (float x : *f) {
    if (!(x > 0.0f) || !std::isfinite(x)) return data_loss("LongRoPE: factor {} must be a finite number > 0", x);
  }
  return file;
}
}  // namespace

Result<Rope> Rope::load(WeightStore& store, const ModelHParams& hp) {
  std::vector<float> rope_freqs;
  if (hp.rope_scaling.type == RopeScaling::Type::kLongRope) {
    SS_ASSIGN_OR_RETURN(rope_freqs, longrope_factors(store, hp));
  } else if (store.has("rope_freqs.weight")) {
    SS_ASSIGN_OR_RETURN(HostTensor rf, store.load_host("rope_freqs.weight"));
    rope_freqs = std::move(rf.data);
  }
  Rope r;
  r.inv_freq = store.upload_f32(rope_inv_freq(hp, rope_freqs));
  r.rope_dim = hp.rope_dim;
  r.style = hp.rope_style;
  return r;
}

// ---------------------------------------------------------------- norms

Result<RmsNorm> RmsNorm::load(WeightStore& store, const std::string& name, const ModelHParams& hp) {
  return load_dim(store, name, hp.hidden, hp);
}

Result<RmsNorm> RmsNorm::load_dim(WeightStore& store, const std::string& name, int64_t dim, const ModelHParams& hp) {
  RmsNorm n;
  SS_ASSIGN_OR_RETURN(n.weight, store.load_offset(name, {dim}, hp.norm_weight_offset));
  n.eps = hp.rms_eps;
  return n;
}

Result<LayerNorm> LayerNorm::load(WeightStore& store, const std::string& prefix, const ModelHParams& hp) {
  LayerNorm n;
  SS_ASSIGN_OR_RETURN(n.weight, store.load(prefix + "weight", {hp.hidden}));
  SS_ASSIGN_OR_RETURN(n.bias, store.load(prefix + "bias", {hp.hidden}));
  n.eps = hp.rms_eps;
  return n;
}

// ---------------------------------------------------------------- attention block

Result<AttentionWeights> AttentionWeights::load(WeightStore& store, const std::string& p, const ModelHParams& hp) {
  const int64_t q_dim = static_cast<int64_t>(hp.n_heads) * hp.head_dim;
  const int64_t kv_dim = static_cast<int64_t>(hp.n_kv_heads) * hp.head_dim;
  AttentionWeights w;
  if (store.has(p + "attn_qkv.weight")) {
    SS_ASSIGN_OR_RETURN(w.wqkv, store.load(p + "attn_qkv.weight", {q_dim + 2 * kv_dim, hp.hidden}));
  } else {
    SS_ASSIGN_OR_RETURN(w.wqkv, store.load_stacked({{p + "attn_q.weight", q_dim}, {p + "attn_k.weight", kv_dim},
                                                    {p + "attn_v.weight", kv_dim}},
                                                   hp.hidden));
  }
  w.wq = w.wqkv.slice_rows(0, q_dim);
  w.wk = w.wqkv.slice_rows(q_dim, kv_dim);
  w.wv = w.wqkv.slice_rows(q_dim + kv_dim, kv_dim);
  SS_ASSIGN_OR_RETURN(w.wo, store.load(p + "attn_output.weight", {hp.hidden, q_dim}));
  return w;
}

Status AttentionWeights::load_extras(WeightStore& store, const std::string& p, const ModelHParams& hp) {
  const int64_t q_dim = static_cast<int64_t>(hp.n_heads) * hp.head_dim;
  const int64_t kv_dim = static_cast<int64_t>(hp.n_kv_heads) * hp.head_dim;
  if (store.has(p + "attn_q.bias")) {
    SS_ASSIGN_OR_RETURN(bq, store.load(p + "attn_q.bias", {q_dim}));
  }
  if (store.has(p + "attn_k.bias")) {
    SS_ASSIGN_OR_RETURN(bk, store.load(p + "attn_k.bias", {kv_dim}));
  }
  if (store.has(p + "attn_v.bias")) {
    SS_ASSIGN_OR_RETURN(bv, store.load(p + "attn_v.bias", {kv_dim}));
  }
  if (store.has(p + "attn_q_norm.weight")) {
    SS_ASSIGN_OR_RETURN(q_norm, RmsNorm::load_dim(store, p + "attn_q_norm.weight", hp.head_dim, hp));
  }
  if (store.has(p + "attn_k_norm.weight")) {
    SS_ASSIGN_OR_RETURN(k_norm, RmsNorm::load_dim(store, p + "attn_k_norm.weight", hp.head_dim, hp));
  }
  return Status();
}

AttentionBuffers::AttentionBuffers(Activations& act, const ModelHParams& hp, int64_t t, bool fused) {
  const int64_t hd = hp.head_dim, nh = hp.n_heads, nkv = hp.n_kv_heads;
  q = act.make({t, nh, hd});
  k = act.make({t, nkv, hd});
  v = act.make({t, nkv, hd});
  a = act.make({t, nh, hd});
  if (fused) qkv = act.make({t, (nh + 2 * nkv) * hd});
}

Status attention_block(Backend& backend, const AttentionWeights& w, const Rope& rope, AttentionHandler& attn,
                       int layer, std::span<const BatchSeq> batch, std::span<const int32_t> positions, Tensor xn,
                       bool fused, AttentionBuffers& buf, Tensor h) {
  if (fused) {
    SS_CHECK(!w.has_extras(), "the fused q|k|v path has no biases or q/k norms");
    backend.matmul(buf.qkv, xn, w.wqkv);
    backend.split_qkv_rope(buf.q, buf.k, buf.v, buf.qkv, positions, rope.inv_freq, rope.rope_dim, rope.style);
  } else {
    backend.matmul(as_matrix(buf.q), xn, w.wq);
    backend.matmul(as_matrix(buf.k), xn, w.wk);
    backend.matmul(as_matrix(buf.v), xn, w.wv);
    if (w.bq.data) backend.add_bias(as_matrix(buf.q), w.bq);
    if (w.bk.data) backend.add_bias(as_matrix(buf.k), w.bk);
    if (w.bv.data) backend.add_bias(as_matrix(buf.v), w.bv);
    if (w.q_norm.present()) w.q_norm.apply(backend, buf.q, buf.q);
    if (w.k_norm.present()) w.k_norm.apply(backend, buf.k, buf.k);
    if (rope.rope_dim > 0) {
      backend.rope(buf.q, positions, rope.inv_freq, rope.rope_dim, rope.style);
      backend.rope(buf.k, positions, rope.inv_freq, rope.rope_dim, rope.style);
    }
  }
  SS_RETURN_IF_ERROR(attn.attend(layer, batch, buf.q, buf.k, buf.v, buf.a));
  backend.matmul(h, as_matrix(buf.a), w.wo);
  if (w.bo.data) backend.add_bias(h, w.bo);
  return Status();
}

// ---------------------------------------------------------------- MLP kinds

Result<MlpWeights> MlpWeights::load_swiglu(WeightStore& store, const std::string& p, const ModelHParams& hp) {
  MlpWeights w;
  w.kind = MlpKind::kSwiGlu;
  if (!store.has(p + "ffn_gate.weight")) {
    SS_ASSIGN_OR_RETURN(w.w_gate_up, store.load(p + "ffn_up.weight", {2 * int64_t{hp.ffn_hidden}, hp.hidden}));
  } else {
    SS_ASSIGN_OR_RETURN(w.w_gate_up, store.load_stacked({{p + "ffn_gate.weight", hp.ffn_hidden},
                                                         {p + "ffn_up.weight", hp.ffn_hidden}},
                                                        hp.hidden));
  }
  w.w_gate = w.w_gate_up.slice_rows(0, hp.ffn_hidden);
  w.w_up = w.w_gate_up.slice_rows(hp.ffn_hidden, hp.ffn_hidden);
  SS_ASSIGN_OR_RETURN(w.w_down, store.load(p + "ffn_down.weight", {hp.hidden, hp.ffn_hidden}));
  return w;
}

Result<MlpWeights> MlpWeights::load_geglu(WeightStore& store, const std::string& p, const ModelHParams& hp) {
  SS_ASSIGN_OR_RETURN(MlpWeights w, load_swiglu(store, p, hp));
  w.kind = MlpKind::kGeGlu;
  return w;
}

MlpBuffers::MlpBuffers(Activations& act, const ModelHParams& hp, int64_t t, bool fused) {
  g = act.make({t, hp.ffn_hidden});
  if (fused) {
    gu = act.make({t, 2 * static_cast<int64_t>(hp.ffn_hidden)});
  } else {
    u = act.make({t, hp.ffn_hidden});
  }
}

void mlp_block(Backend& backend, const MlpWeights& w, Tensor xn, bool fused, MlpBuffers& buf, Tensor h) {
  if (w.kind == MlpKind::kGeGlu) {
    SS_CHECK(!fused, "GeGLU runs the unfused path only");
    backend.matmul(buf.g, xn, w.w_gate);
    backend.matmul(buf.u, xn, w.w_up);
    backend.gelu_tanh_mul(buf.g, buf.g, buf.u);
    backend.matmul(h, buf.g, w.w_down);
    return;
  }
  if (fused) {
    backend.matmul(buf.gu, xn, w.w_gate_up);
    backend.swiglu_fused(buf.g, buf.gu);
  } else {
    backend.matmul(buf.g, xn, w.w_gate);
    backend.matmul(buf.u, xn, w.w_up);
    backend.swiglu(buf.g, buf.g, buf.u);
  }
  backend.matmul(h, buf.g, w.w_down);
}

// ---------------------------------------------------------------- output head

Result<OutputHead> OutputHead::load(WeightStore& store, const ModelHParams& hp, Tensor token_embedding) {
  OutputHead o;
  if (hp.layer_norm) {
    SS_ASSIGN_OR_RETURN(o.layer_norm, LayerNorm::load(store, "output_norm.", hp));
  } else {
    SS_ASSIGN_OR_RETURN(o.norm, RmsNorm::load(store, "output_norm.weight", hp));
  }
  if (hp.tied_embeddings) {
    o.weight = token_embedding;
  } else {
    SS_ASSIGN_OR_RETURN(o.weight, store.load("output.weight", {hp.n_vocab, hp.hidden}));
  }
  return o;
}

void OutputHead::logits(Backend& backend, Tensor x, std::span<const BatchSeq> batch, int64_t n_out, int n_vocab,
                        DeviceBuffer* lg_buf, Tensor* lg) const {
  // Gather the rows that need logits, then norm + output projection on those rows only.
  const DType dt = backend.compute_dtype();
  const int64_t hidden = x.shape[1];
  DeviceBuffer sel_buf = backend.alloc(n_out * hidden * dtype_size(dt));
  Tensor sel = sel_buf.view(dt, {n_out, hidden});
  // Rows that follow each other in x are copied together: a decode step's rows are one copy.
  int64_t row = 0, start = 0, run_src = 0, run_rows = 0;
  const auto take = [&](int64_t src, int64_t n) {
    if (run_rows > 0 && run_src + run_rows == src) {
      run_rows += n;
      return;
    }
    if (run_rows > 0) backend.copy(sel.slice_rows(row - run_rows, run_rows), x.slice_rows(run_src, run_rows));
    run_src = src;
    run_rows = n;
  };
  for (const BatchSeq& s : batch) {
    const int64_t n = static_cast<int64_t>(s.tokens.size());
    if (s.all_logits) {
      take(start, n);
      row += n;
    } else {
      take(start + n - 1, 1);
      row += 1;
    }
    start += n;
  }
  if (run_rows > 0) backend.copy(sel.slice_rows(row - run_rows, run_rows), x.slice_rows(run_src, run_rows));
  apply_norm(backend, sel, sel);
  *lg_buf = backend.alloc(n_out * n_vocab * dtype_size(dt));
  *lg = lg_buf->view(dt, {n_out, n_vocab});
  backend.matmul(*lg, sel, weight);
}

void DecoderModel::score_tokens(Tensor x, std::span<const BatchSeq> batch) {
  const DType dt = backend_.compute_dtype();
  const int64_t hidden = x.shape[1];
  const int n_vocab = hp_.n_vocab;
  const int64_t slice = score_slice_rows(n_vocab);
  std::vector<float> host;
  int64_t start = 0;
  for (const BatchSeq& s : batch) {
    const int64_t n = static_cast<int64_t>(s.tokens.size());
    if (s.scores != nullptr) {
      const ScoreRequest& req = *s.scores;
      SS_CHECK(static_cast<int64_t>(req.targets.size()) == n && req.out != nullptr,
               "sequence {}: {} score targets for {} tokens", s.seq_id, req.targets.size(), n);
      // Rows past the last one with a target need no logits.
      int64_t end = n;
      while (end > 0 && req.targets[end - 1] < 0) --end;
      for (int64_t r0 = 0; r0 < end; r0 += slice) {
        const int64_t rows = std::min(slice, end - r0);
        DeviceBuffer sel_buf = backend_.alloc(static_cast<size_t>(rows * hidden) * dtype_size(dt));
        const Tensor sel = sel_buf.view(dt, {rows, hidden});
        backend_.copy(sel, x.slice_rows(start + r0, rows));
        head_.apply_norm(backend_, sel, sel);
        DeviceBuffer lg_buf = backend_.alloc(static_cast<size_t>(rows * n_vocab) * dtype_size(dt));
        const Tensor lg = lg_buf.view(dt, {rows, n_vocab});
        backend_.matmul(lg, sel, head_.weight);
        finish_logits(lg);
        host.resize(static_cast<size_t>(rows * n_vocab));
        backend_.download_f32(host.data(), lg);
        for (int64_t r = 0; r < rows; ++r) {
          const int32_t target = req.targets[r0 + r];
          if (target < 0) continue;
          ScoredToken t;
          t.position = s.positions[r0 + r];
          score_logits_row(std::span<const float>(host.data() + r * n_vocab, n_vocab), target, req.top_k, &t);
          req.out->push_back(std::move(t));
        }
      }
    }
    start += n;
  }
}

// ---------------------------------------------------------------- decoder layers

Result<DecoderLayerWeights> DecoderLayerWeights::load(WeightStore& store, const std::string& p, const ModelHParams& hp,
                                                      bool extras, bool geglu) {
  DecoderLayerWeights w;
  SS_ASSIGN_OR_RETURN(w.attn_norm, RmsNorm::load(store, p + "attn_norm.weight", hp));
  SS_ASSIGN_OR_RETURN(w.attn, AttentionWeights::load(store, p, hp));
  if (extras) SS_RETURN_IF_ERROR(w.attn.load_extras(store, p, hp));
  SS_ASSIGN_OR_RETURN(w.ffn_norm, RmsNorm::load(store, p + "ffn_norm.weight", hp));
  if (geglu) {
    SS_ASSIGN_OR_RETURN(w.mlp, MlpWeights::load_geglu(store, p, hp));
  } else {
    SS_ASSIGN_OR_RETURN(w.mlp, MlpWeights::load_swiglu(store, p, hp));
  }
  return w;
}

LayerBuffers::LayerBuffers(Activations& act, const ModelHParams& hp, int64_t t, bool fused_path, bool share_xn)
    : fused(fused_path),
      h(act.make({t, hp.hidden})),
      xn(share_xn ? h : act.make({t, hp.hidden})),
      attn(act, hp, t, fused_path),
      mlp(act, hp, t, fused_path) {}

// ---------------------------------------------------------------- Model plumbing

Status DecoderModel::load_embedding_and_head() {
  SS_ASSIGN_OR_RETURN(tok_embd_, store_.load("token_embd.weight", {hp_.n_vocab, hp_.hidden}));
  SS_ASSIGN_OR_RETURN(head_, OutputHead::load(store_, hp_, tok_embd_));
  return Status();
}

Status DecoderModel::load_layers(const std::function<Status(int, const std::string&)>& load_layer) {
  for (int l = 0; l < hp_.n_layers; ++l) {
    SS_RETURN_IF_ERROR(load_layer(l, "blk." + std::to_string(l) + "."));
    if ((l + 1) % 8 == 0 || l + 1 == hp_.n_layers) log_debug("loaded layer {}/{}", l + 1, hp_.n_layers);
  }
  return Status();
}

Status DecoderModel::attention_step(const AttentionWeights& w, const Rope& rope, AttentionHandler& attn, int l,
                                    std::span<const BatchSeq> batch, const FlatBatch& flat, LayerBuffers& b) {
  const Status st = attention_block(backend_, w, rope, attn, l, batch, flat.positions, b.xn, b.fused, b.attn, b.h);
  if (!st.ok()) attn.end_forward({});
  return st;
}

Status DecoderModel::run(std::span<const BatchSeq> batch, AttentionHandler& attn, bool want_logits,
                         DeviceBuffer* lg_buf, Tensor* lg) {
  SS_ASSIGN_OR_RETURN(const FlatBatch flat, flatten_batch(batch, hp_.n_vocab));
  SS_RETURN_IF_ERROR(check_positions(flat));
  const int64_t t = flat.n_tokens();
  Activations act(backend_);
  Tensor x = act.make({t, hp_.hidden});
  LayerBuffers buf = make_buffers(act, t);
  // Allocations come first: a graph step (decode) records only ops.
  GraphStepScope graph_step(backend_, flat, batch);
  SS_RETURN_IF_ERROR(attn.begin_forward(batch));
  embed(flat, x);
  SS_RETURN_IF_ERROR(layers(batch, attn, flat, 0, hp_.n_layers, x, buf));
  attn.end_forward(batch);
  score_tokens(x, batch);
  if (!want_logits) return Status();
  head_.logits(backend_, x, batch, flat.n_out, hp_.n_vocab, lg_buf, lg);
  finish_logits(*lg);
  return Status();
}

Status DecoderModel::run_layers(std::span<const BatchSeq> batch, AttentionHandler& attn, const FlatBatch& flat,
                                int first, int last, Tensor x) {
  Activations act(backend_);
  LayerBuffers buf = make_buffers(act, flat.n_tokens());
  return layers(batch, attn, flat, first, last, x, buf);
}

Status DecoderModel::forward(std::span<const BatchSeq> batch, AttentionHandler& attn, std::vector<float>* logits) {
  DeviceBuffer lg_buf;
  Tensor lg;
  SS_RETURN_IF_ERROR(run(batch, attn, logits != nullptr, &lg_buf, &lg));
  if (logits == nullptr) return Status();
  logits->resize(static_cast<size_t>(lg.numel()));
  backend_.download_f32(logits->data(), lg);
  return Status();
}

Status DecoderModel::forward_sample(std::span<const BatchSeq> batch, AttentionHandler& attn,
                                    std::span<const SampleRow> rows, std::span<int32_t> tokens) {
  SS_CHECK(backend_.can_sample_rows(), "backend {} does not sample on the device", backend_.name());
  DeviceBuffer lg_buf;
  Tensor lg;
  SS_RETURN_IF_ERROR(run(batch, attn, true, &lg_buf, &lg));
  SS_CHECK(static_cast<int64_t>(rows.size()) == lg.rows(), "{} sampling rows for {} logits rows", rows.size(),
           lg.rows());
  backend_.sample_rows(tokens, lg, rows);
  return Status();
}

Status DecoderModel::forward_layers(std::span<const BatchSeq> batch, AttentionHandler& attn, int n_layers,
                                    PartialForward* state) {
  SS_CHECK(n_layers >= 1 && state->next_layer < hp_.n_layers, "forward_layers: {} layers from layer {} of {}",
           n_layers, state->next_layer, hp_.n_layers);
  SS_ASSIGN_OR_RETURN(const FlatBatch flat, flatten_batch(batch, hp_.n_vocab));
  SS_RETURN_IF_ERROR(check_positions(flat));
  const int64_t t = flat.n_tokens();
  if (state->next_layer == 0) {
    state->x = backend_.alloc(static_cast<size_t>(t * hp_.hidden) * dtype_size(backend_.compute_dtype()));
    SS_RETURN_IF_ERROR(attn.begin_forward(batch));
    embed(flat, state->x.view(backend_.compute_dtype(), {t, hp_.hidden}));
  }
  const Tensor x = state->x.view(backend_.compute_dtype(), {t, hp_.hidden});
  const int first = state->next_layer;
  const int last = std::min(hp_.n_layers, first + n_layers);
  SS_RETURN_IF_ERROR(run_layers(batch, attn, flat, first, last, x));
  state->next_layer = last;
  ++state->calls;
  if (last == hp_.n_layers) {
    attn.end_forward(batch);
    score_tokens(x, batch);
    state->x.reset();
  }
  return Status();
}

GraphStepScope::GraphStepScope(Backend& backend, const FlatBatch& flat, std::span<const BatchSeq> batch) {
  // Scoring downloads logits in the middle of the forward, which a captured graph cannot hold.
  const bool scores = std::any_of(batch.begin(), batch.end(), [](const BatchSeq& s) { return s.scores != nullptr; });
  if (flat.n_tokens() == static_cast<int64_t>(batch.size()) && !scores) {
    backend_ = &backend;
    backend.begin_graph_step();
  }
}

GraphStepScope::~GraphStepScope() {
  if (backend_) backend_->end_graph_step();
}

}  // namespace starserve
