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
#include "model/arch_registry.h"
#include "model/layers.h"

namespace starserve {

namespace {

struct GemmaLayer {
  DecoderLayerWeights base;  // attn_norm, attention with q/k norms, ffn_norm, GeGLU
  RmsNorm post_attn_norm, post_ffw_norm;
};

class GemmaModel final : public DecoderModel {
 public:
  using DecoderModel::DecoderModel;

  Status load() {
    SS_RETURN_IF_ERROR(load_embedding_and_head());
    SS_RETURN_IF_ERROR(load_layers([this](int l, const std::string& p) -> Status {
      GemmaLayer w;
      SS_ASSIGN_OR_RETURN(w.base, DecoderLayerWeights::load(store_, p, hp_, true, true));
      SS_ASSIGN_OR_RETURN(w.post_attn_norm, RmsNorm::load(store_, p + "post_attention_norm.weight", hp_));
      SS_ASSIGN_OR_RETURN(w.post_ffw_norm, RmsNorm::load(store_, p + "post_ffw_norm.weight", hp_));
      if (hp_.arch == "gemma3" && !(w.base.attn.q_norm.present() && w.base.attn.k_norm.present())) {
        return data_loss("gemma3: layer {} lacks attn_q_norm / attn_k_norm", l);
      }
      layers_.push_back(w);
      return Status();
    }));
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
  void finish_logits(Tensor lg) override {
    if (hp_.final_softcap > 0.0f) backend_.scale_softcap(lg, 1.0f, hp_.final_softcap);
  }

  void embed(const FlatBatch& flat, Tensor x) override {
    backend_.embedding(x, tok_embd_, flat.ids);
    if (hp_.embed_scale != 1.0f) backend_.scale_softcap(x, hp_.embed_scale, 0.0f);
  }

  Status layers(std::span<const BatchSeq> batch, AttentionHandler& attn, const FlatBatch& flat, int first, int last,
                Tensor x, LayerBuffers& b) override {
    for (int l = first; l < last; ++l) {
      const GemmaLayer& w = layers_[l];
      const Rope& rope = hp_.window_of(l) > 0 ? rope_local_ : rope_global_;
      w.base.attn_norm.apply(backend_, b.xn, x);
      SS_RETURN_IF_ERROR(attention_step(w.base.attn, rope, attn, l, batch, flat, b));
      w.post_attn_norm.apply(backend_, b.h, b.h);
      backend_.add(x, x, b.h);
      w.base.ffn_norm.apply(backend_, b.xn, x);
      mlp_block(backend_, w.base.mlp, b.xn, false, b.mlp, b.h);
      w.post_ffw_norm.apply(backend_, b.h, b.h);
      backend_.add(x, x, b.h);
    }
    return Status();
  }

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
