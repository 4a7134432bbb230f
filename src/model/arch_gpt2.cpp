// GPT-2: pre-norm blocks
//   x = token_embd[id] + position_embd[position]
//   x += attn_output(attention(attn_qkv(ln_1(x))));  x += ffn_down(gelu_tanh(ffn_up(ln_2(x))))
// with LayerNorms of weight and bias, one fused q|k|v projection with a bias, biases on every
// projection, the tanh-approximate GELU (Hugging Face "gelu_new"), a final LayerNorm and the
// output tied to token_embd. Positions are learned (a table of max_context rows) and added once to
// the embeddings; attention rotates nothing, and the handlers place keys by the same positions as
// for the other families (global: 0.., Star Attention: the anchor at 0.. and each block at its
// tokens' places in the context). A position past the table is refused (check_positions).
// Hugging Face stores the projections as Conv1D weights (in, out); the weight source hands them
// over as (out, in) like every other matrix (model/hf_source.h).
#include "model/arch_registry.h"
#include "model/layers.h"

namespace starserve {

namespace {

struct Gpt2Layer {
  LayerNorm attn_norm, ffn_norm;
  AttentionWeights attn;  // wqkv rows [q | k | v] with bq, bk, bv views of one bias, and bo
  Tensor w_up, b_up, w_down, b_down;  // (ffn, hidden), (ffn), (hidden, ffn), (hidden)
};

class Gpt2Model final : public DecoderModel {
 public:
  using DecoderModel::DecoderModel;

  Status load() {
    SS_RETURN_IF_ERROR(load_embedding_and_head());
    SS_ASSIGN_OR_RETURN(pos_embd_, store_.load("position_embd.weight", {hp_.max_context, hp_.hidden}));
    const int64_t qkv_rows = int64_t{hp_.n_heads + 2 * hp_.n_kv_heads} * hp_.head_dim;
    const int64_t q_dim = int64_t{hp_.n_heads} * hp_.head_dim, kv_dim = int64_t{hp_.n_kv_heads} * hp_.head_dim;
    SS_RETURN_IF_ERROR(load_layers([&](int, const std::string& p) -> Status {
      Gpt2Layer w;
      SS_ASSIGN_OR_RETURN(w.attn_norm, LayerNorm::load(store_, p + "attn_norm.", hp_));
      SS_ASSIGN_OR_RETURN(w.attn, AttentionWeights::load(store_, p, hp_));
      SS_ASSIGN_OR_RETURN(Tensor b_qkv, store_.load(p + "attn_qkv.bias", {qkv_rows}));
      w.attn.bq = b_qkv.slice_rows(0, q_dim);
      w.attn.bk = b_qkv.slice_rows(q_dim, kv_dim);
      w.attn.bv = b_qkv.slice_rows(q_dim + kv_dim, kv_dim);
      SS_ASSIGN_OR_RETURN(w.attn.bo, store_.load(p + "attn_output.bias", {hp_.hidden}));
      SS_ASSIGN_OR_RETURN(w.ffn_norm, LayerNorm::load(store_, p + "ffn_norm.", hp_));
      SS_ASSIGN_OR_RETURN(w.w_up, store_.load(p + "ffn_up.weight", {hp_.ffn_hidden, hp_.hidden}));
      SS_ASSIGN_OR_RETURN(w.b_up, store_.load(p + "ffn_up.bias", {hp_.ffn_hidden}));
      SS_ASSIGN_OR_RETURN(w.w_down, store_.load(p + "ffn_down.weight", {hp_.hidden, hp_.ffn_hidden}));
      SS_ASSIGN_OR_RETURN(w.b_down, store_.load(p + "ffn_down.bias", {hp_.hidden}));
      layers_.push_back(w);
      return Status();
    }));
    return Status();
  }

 private:
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
    // The position rows in scratch kept across calls, so that a decode step allocates nothing.
    const Tensor pos = pos_rows_.view(backend_, backend_.compute_dtype(), {flat.n_tokens(), hp_.hidden});
    backend_.embedding(pos, pos_embd_, flat.positions);
    backend_.add(x, x, pos);
  }

  Status layers(std::span<const BatchSeq> batch, AttentionHandler& attn, const FlatBatch& flat, int first, int last,
                Tensor x, LayerBuffers& b) override {
    for (int l = first; l < last; ++l) {
      const Gpt2Layer& w = layers_[l];
      w.attn_norm.apply(backend_, b.xn, x);
      SS_RETURN_IF_ERROR(attention_step(w.attn, no_rope_, attn, l, batch, flat, b));
      backend_.add(x, x, b.h);
      w.ffn_norm.apply(backend_, b.xn, x);
      backend_.matmul(b.mlp.g, b.xn, w.w_up);
      backend_.add_bias(b.mlp.g, w.b_up);
      backend_.gelu_tanh(b.mlp.g, b.mlp.g);
      backend_.matmul(b.h, b.mlp.g, w.w_down);
      backend_.add_bias(b.h, w.b_down);
      backend_.add(x, x, b.h);
    }
    return Status();
  }

  Tensor pos_embd_;  // (max_context, hidden)
  Scratch pos_rows_;
  Rope no_rope_;  // rope_dim 0: attention_block rotates nothing
  std::vector<Gpt2Layer> layers_;
};

}  // namespace

Result<std::unique_ptr<Model>> build_gpt2(const WeightSource& source, Backend& backend, const ModelOptions& options) {
  const ModelHParams& hp = source.hparams();
  if (!hp.learned_positions || !hp.layer_norm || hp.rope_dim != 0) {
    return invalid_argument("gpt2: hyper-parameters without learned positions and LayerNorm (arch {})", hp.arch_name);
  }
  BackendFeatures f;
  f.bias = true;
  f.layer_norm = true;
  SS_RETURN_IF_ERROR(backend.check_features(f));
  auto m = std::make_unique<Gpt2Model>(hp, backend, options, source);
  SS_RETURN_IF_ERROR(m->load());
  return std::unique_ptr<Model>(std::move(m));
}

}  // namespace starserve
