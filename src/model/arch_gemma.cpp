// Gemma 2 and Gemma 3: "sandwich" blocks
//   x += post_attention_norm(attention(attn_norm(x)));  x += post_ffw_norm(geglu(ffn_norm(x)))
// with RMSNorms that multiply by (1 + w) (ModelHParams::norm_weight_offset, 1 for Hugging Face
// checkpoints; llama.cpp's converter stores 1 + w), GeGLU with the tanh-approximate GELU, token
// embeddings scaled by sqrt(hidden), queries scaled by query_pre_attn_scalar^-1/2, tied output.
// Gemma 2: attention logits soft-capped inside the attention (the handlers pass
// ModelHParams::attn_softcap to the backend, so the entropy is that of the capped scores), final
// logits soft-capped, sliding window on every other layer (0, 2, ...). Gemma 3: per-head q/k
// RMSNorm before RoPE, five windowed layers to one global, the windowed layers on their own RoPE
// base (rope_theta_local, unscaled) and the global ones on rope_theta with the file's scaling.
#include "common/log.h"
#include "model/arch_registry.h"
#include "model/layers.h"

namespace starserve {

namespace {

struct GemmaLayer {
  RmsNorm attn_norm, post_attn_norm, ffn_norm, post_ffw_norm;
  AttentionWeights attn;
  MlpWeights mlp;
};

class GemmaModel final : public DecoderModel {
 public:
  using DecoderModel::DecoderModel;

  Status load() {
    SS_ASSIGN_OR_RETURN(tok_embd_, store_.load("token_embd.weight", {hp_.n_vocab, hp_.hidden}));
    SS_ASSIGN_OR_RETURN(head_, OutputHead::load(store_, hp_, tok_embd_));
    for (int l = 0; l < hp_.n_layers; ++l) {
      const std::string p = "blk." + std::to_string(l) + ".";
      GemmaLayer w;
      SS_ASSIGN_OR_RETURN(w.attn_norm, RmsNorm::load(store_, p + "attn_norm.weight", hp_));
      SS_ASSIGN_OR_RETURN(w.attn, AttentionWeights::load(store_, p, hp_));
      SS_RETURN_IF_ERROR(w.attn.load_extras(store_, p, hp_));
      SS_ASSIGN_OR_RETURN(w.post_attn_norm, RmsNorm::load(store_, p + "post_attention_norm.weight", hp_));
      SS_ASSIGN_OR_RETURN(w.ffn_norm, RmsNorm::load(store_, p + "ffn_norm.weight", hp_));
      SS_ASSIGN_OR_RETURN(w.post_ffw_norm, RmsNorm::load(store_, p + "post_ffw_norm.weight", hp_));
      SS_ASSIGN_OR_RETURN(w.mlp, MlpWeights::load_geglu(store_, p, hp_));
      if (hp_.arch == "gemma3" && !(w.attn.q_norm.present() && w.attn.k_norm.present())) {
        return data_loss("gemma3: layer {} lacks attn_q_norm / attn_k_norm", l);
      }
      layers_.push_back(w);
      if ((l + 1) % 8 == 0 || l + 1 == hp_.n_layers) log_debug("loaded layer {}/{}", l + 1, hp_.n_layers);
    }
    SS_ASSIGN_OR_RETURN(rope_global_, Rope::load(store_, hp_));
    if (hp_.rope_theta_local > 0.0f) {
      ModelHParams local = hp_;
      local.rope_theta = hp_.rope_theta_local;
      local.rope_scaling = RopeScaling{};
      SS_ASSIGN_OR_RETURN(rope_local_, Rope::load(store_, local));
    } else {
      rope_local_ = rope_global_;
    }
    return Status();
  }

 private:
  struct Buffers {
    Tensor h, xn;
    AttentionBuffers attn;
    MlpBuffers mlp;
    Buffers(Activations& act, const ModelHParams& hp, int64_t t)
        : h(act.make({t, hp.hidden})), xn(act.make({t, hp.hidden})), attn(act, hp, t, false), mlp(act, hp, t, false) {}
  };

  Status run(std::span<const BatchSeq> batch, AttentionHandler& attn, bool want_logits, DeviceBuffer* lg_buf,
             Tensor* lg) override {
    SS_ASSIGN_OR_RETURN(const FlatBatch flat, flatten_batch(batch, hp_.n_vocab));
    const int64_t t = flat.n_tokens();
    Activations act(backend_);
    Tensor x = act.make({t, hp_.hidden});
    Buffers buf(act, hp_, t);
    GraphStepScope graph_step(backend_, flat, batch);
    SS_RETURN_IF_ERROR(attn.begin_forward(batch));
    embed(flat, x);
    SS_RETURN_IF_ERROR(layers(batch, attn, flat, 0, hp_.n_layers, x, buf));
    attn.end_forward(batch);
    if (!want_logits) return Status();
    head_.logits(backend_, x, batch, flat.n_out, hp_.n_vocab, lg_buf, lg);
    if (hp_.final_softcap > 0.0f) backend_.scale_softcap(*lg, 1.0f, hp_.final_softcap);
    return Status();
  }

  void embed(const FlatBatch& flat, Tensor x) override {
    backend_.embedding(x, tok_embd_, flat.ids);
    if (hp_.embed_scale != 1.0f) backend_.scale_softcap(x, hp_.embed_scale, 0.0f);
  }

  Status run_layers(std::span<const BatchSeq> batch, AttentionHandler& attn, const FlatBatch& flat, int first,
                    int last, Tensor x) override {
    Activations act(backend_);
    Buffers buf(act, hp_, flat.n_tokens());
    return layers(batch, attn, flat, first, last, x, buf);
  }

  Status layers(std::span<const BatchSeq> batch, AttentionHandler& attn, const FlatBatch& flat, int first, int last,
                Tensor x, Buffers& b) {
    for (int l = first; l < last; ++l) {
      const GemmaLayer& w = layers_[l];
      const Rope& rope = hp_.window_of(l) > 0 ? rope_local_ : rope_global_;
      w.attn_norm.apply(backend_, b.xn, x);
      const Status st = attention_block(backend_, w.attn, rope, attn, l, batch, flat.positions, b.xn, false, b.attn, b.h);
      if (!st.ok()) {
        attn.end_forward({});
        return st;
      }
      w.post_attn_norm.apply(backend_, b.h, b.h);
      backend_.add(x, x, b.h);
      w.ffn_norm.apply(backend_, b.xn, x);
      mlp_block(backend_, w.mlp, b.xn, false, b.mlp, b.h);
      w.post_ffw_norm.apply(backend_, b.h, b.h);
      backend_.add(x, x, b.h);
    }
    return Status();
  }

  Tensor tok_embd_;
  OutputHead head_;
  Rope rope_global_, rope_local_;
  std::vector<GemmaLayer> layers_;
};

}  // namespace

Result<std::unique_ptr<Model>> build_gemma(const WeightSource& source, Backend& backend, const ModelOptions& options) {
  const ModelHParams& hp = source.hparams();
  BackendFeatures f;
  f.gelu_tanh = true;
  f.scale_softcap = true;
  f.window = hp.max_window();
  f.attn_softcap = hp.attn_softcap;
  SS_RETURN_IF_ERROR(backend.check_features(f));
  auto m = std::make_unique<GemmaModel>(hp, backend, options, source);
  SS_RETURN_IF_ERROR(m->load());
  return std::unique_ptr<Model>(std::move(m));
}

}  // namespace starserve
