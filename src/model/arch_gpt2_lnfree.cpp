// The LayerNorm-free GPT-2 (arch gpt2_lnfree; "Entropy-Guided Attention for Private LLMs", Jha &
// Reagen, arXiv 2501.03489, the paper's SM + ScFuFFN; docs/specs/lnfree-gpt2.md). GPT-2's
// embeddings, learned positions and attention with biases, but no LayerNorm anywhere:
//   x = token_embd[id] + position_embd[position]
//   x_sa  = x + attn_output(attention(attn_qkv(x)))
//   x_out = beta_l * x_sa + (x_sa ffn_fused^T + b) / alpha_l      (the activation-free FFN fused)
//   logits = x_L token_embd^T                                      (tied, no final norm)
// With hp.attn_temperature, the logits of head h at query position i are divided by
// t_l[h, i] (blk.N.attn_temperature, (n_heads, max_context)). Dividing row (i, h) of q by
// t_l[h, position_i] divides exactly those logits, so the op runs on q before the handler and every
// attention mode (global, exact, star) and the entropy the kernels report (specs/entropy.md) see
// the tempered scores without knowing of it. Positions are absolute (a decode step uses its
// token's row, Star Attention's blocks their places in the context); one past the table is refused.
#include <cmath>

#include "model/arch_registry.h"
#include "model/layers.h"

namespace starserve {

namespace {

struct LnFreeLayer {
  AttentionWeights attn;   // wqkv rows [q | k | v] with bq, bk, bv views of one bias, and bo
  Tensor temperature;      // (n_heads, max_context) fp32; absent without hp.attn_temperature
  Tensor w_fused, b_fused;  // (hidden, hidden) as (out, in), (hidden)
  float inv_alpha = 1.0f;  // 1 / alpha_l: the FFN branch's scale
  float beta = 1.0f;       // the FFN sub-block's skip-path scale
};

class Gpt2LnFreeModel final : public DecoderModel {
 public:
  using DecoderModel::DecoderModel;

  Status load() {
    SS_ASSIGN_OR_RETURN(tok_embd_, store_.load("token_embd.weight", {hp_.n_vocab, hp_.hidden}));
    head_.weight = tok_embd_;  // tied, and no final norm
    SS_ASSIGN_OR_RETURN(pos_embd_, store_.load("position_embd.weight", {hp_.max_context, hp_.hidden}));
    const int64_t qkv_rows = int64_t{hp_.n_heads + 2 * hp_.n_kv_heads} * hp_.head_dim;
    const int64_t q_dim = int64_t{hp_.n_heads} * hp_.head_dim, kv_dim = int64_t{hp_.n_kv_heads} * hp_.head_dim;
    SS_RETURN_IF_ERROR(load_layers([&](int, const std::string& p) -> Status {
      LnFreeLayer w;
      SS_ASSIGN_OR_RETURN(w.attn, AttentionWeights::load(store_, p, hp_));
      SS_ASSIGN_OR_RETURN(Tensor b_qkv, store_.load(p + "attn_qkv.bias", {qkv_rows}));
      w.attn.bq = b_qkv.slice_rows(0, q_dim);
      w.attn.bk = b_qkv.slice_rows(q_dim, kv_dim);
      w.attn.bv = b_qkv.slice_rows(q_dim + kv_dim, kv_dim);
      SS_ASSIGN_OR_RETURN(w.attn.bo, store_.load(p + "attn_output.bias", {hp_.hidden}));
      SS_ASSIGN_OR_RETURN(w.w_fused, store_.load(p + "ffn_fused.weight", {hp_.hidden, hp_.hidden}));
      SS_ASSIGN_OR_RETURN(w.b_fused, store_.load(p + "ffn_fused.bias", {hp_.hidden}));
      SS_ASSIGN_OR_RETURN(const float alpha, load_scalar(p + "ffn_alpha"));
      SS_ASSIGN_OR_RETURN(w.beta, load_scalar(p + "ffn_beta"));
      if (alpha == 0.0f) return data_loss("gpt2_lnfree: {}ffn_alpha is 0 (it divides the FFN branch)", p);
      w.inv_alpha = 1.0f / alpha;
      if (hp_.attn_temperature) {
        SS_ASSIGN_OR_RETURN(w.temperature, load_temperature(p + "attn_temperature"));
      }
      layers_.push_back(w);
      return Status();
    }));
    return Status();
  }

 private:
  Result<float> load_scalar(const std::string& name) {
    SS_ASSIGN_OR_RETURN(HostTensor t, store_.load_host(name));
    if (t.numel() != 1 || !std::isfinite(t.data[0])) {
      return data_loss("gpt2_lnfree: {} has {} values (first {}), expected one finite scalar", name, t.numel(),
                       t.numel() > 0 ? t.data[0] : 0.0f);
    }
    return t.data[0];
  }

  // fp32 on the device whatever the compute dtype: head_temperature reads it as fp32.
  Result<Tensor> load_temperature(const std::string& name) {
    SS_ASSIGN_OR_RETURN(HostTensor t, store_.load_host(name));
    if (t.numel() != int64_t{hp_.n_heads} * hp_.max_context) {
      return data_loss("gpt2_lnfree: {} has {} values, expected n_head {} x n_positions {}", name, t.numel(),
                       hp_.n_heads, hp_.max_context);
    }
    for (int64_t i = 0; i < t.numel(); ++i) {
      const float v = t.data[static_cast<size_t>(i)];
      if (v == 0.0f || !std::isfinite(v)) {
        return data_loss("gpt2_lnfree: {} holds {} at head {}, position {} (a temperature divides the logits)", name,
                         v, i / hp_.max_context, i % hp_.max_context);
      }
    }
    const Tensor flat = store_.upload_f32(t.data);
    return Tensor::make(flat.data, DType::kF32, {hp_.n_heads, hp_.max_context});
  }

  Status check_positions(const FlatBatch& flat) const override {
    for (int32_t p : flat.positions) {
      if (p < 0 || p >= hp_.max_context) {
        return invalid_argument("position {} is outside the {} learned positions of {} (n_positions): a sequence "
                                "holds at most {} tokens",
                                p, hp_.max_context, hp_.arch_name, hp_.max_context);
      }
    }
    return Status();
  }

  void embed(const FlatBatch& flat, Tensor x) override {
    backend_.embedding(x, tok_embd_, flat.ids);
    const Tensor pos = pos_rows_.view(backend_, backend_.compute_dtype(), {flat.n_tokens(), hp_.hidden});
    backend_.embedding(pos, pos_embd_, flat.positions);
    backend_.add(x, x, pos);
  }

  // h (T, hidden) = c_proj(attention(q / t, k, v)) over x itself (no norm before it).
  Status attention(const LnFreeLayer& w, AttentionHandler& attn, int l, std::span<const BatchSeq> batch,
                   const FlatBatch& flat, Tensor x, LayerBuffers& b) {
    AttentionBuffers& a = b.attn;
    backend_.matmul(as_matrix(a.q), x, w.attn.wq);
    backend_.matmul(as_matrix(a.k), x, w.attn.wk);
    backend_.matmul(as_matrix(a.v), x, w.attn.wv);
    backend_.add_bias(as_matrix(a.q), w.attn.bq);
    backend_.add_bias(as_matrix(a.k), w.attn.bk);
    backend_.add_bias(as_matrix(a.v), w.attn.bv);
    if (w.temperature.data) backend_.head_temperature(a.q, w.temperature, flat.positions);
    const Status st = attn.attend(l, batch, a.q, a.k, a.v, a.a);
    if (!st.ok()) {
      attn.end_forward({});  // run_layers' contract, as attention_step
      return st;
    }
    backend_.matmul(b.h, as_matrix(a.a), w.attn.wo);
    backend_.add_bias(b.h, w.attn.bo);
    return Status();
  }

  Status layers(std::span<const BatchSeq> batch, AttentionHandler& attn, const FlatBatch& flat, int first, int last,
                Tensor x, LayerBuffers& b) override {
    for (int l = first; l < last; ++l) {
      const LnFreeLayer& w = layers_[l];
      SS_RETURN_IF_ERROR(attention(w, attn, l, batch, flat, x, b));
      backend_.add(x, x, b.h);
      backend_.matmul(b.h, x, w.w_fused);
      backend_.add_bias(b.h, w.b_fused);
      backend_.scale_softcap(b.h, w.inv_alpha, 0.0f);
      backend_.scale_softcap(x, w.beta, 0.0f);
      backend_.add(x, x, b.h);
    }
    return Status();
  }

  Tensor pos_embd_;  // (max_context, hidden)
  Scratch pos_rows_;
  std::vector<LnFreeLayer> layers_;
};

}  // namespace

Result<std::unique_ptr<Model>> build_gpt2_lnfree(const WeightSource& source, Backend& backend,
                                                 const ModelOptions& options) {
  const ModelHParams& hp = source.hparams();
  if (!hp.learned_positions || hp.layer_norm || hp.rope_dim != 0 || hp.n_kv_heads != hp.n_heads) {
    return invalid_argument("gpt2_lnfree: hyper-parameters without learned positions, with LayerNorm or RoPE (arch {})",
                            hp.arch_name);
  }
  BackendFeatures f;
  f.bias = true;
  f.scale_softcap = true;
  f.head_temperature = hp.attn_temperature;
  SS_RETURN_IF_ERROR(backend.check_features(f));
  auto m = std::make_unique<Gpt2LnFreeModel>(hp, backend, options, source);
  SS_RETURN_IF_ERROR(m->load());
  return std::unique_ptr<Model>(std::move(m));
}

}  // namespace starserve
