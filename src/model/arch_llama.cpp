// Llama-family architecture: pre-norm blocks of RMSNorm -> GQA attention with RoPE -> residual,
// RMSNorm -> SwiGLU MLP -> residual; final RMSNorm and an output projection (tied or separate).
// Every size comes from ModelHParams; the pieces are model/layers.h.
#include "model/arch_registry.h"
#include "model/layers.h"

namespace starserve {

namespace {

class LlamaModel final : public DecoderModel {
 public:
  using DecoderModel::DecoderModel;

  Status load() {
    SS_RETURN_IF_ERROR(load_embedding_and_head());
    SS_RETURN_IF_ERROR(load_layers([this](int, const std::string& p) -> Status {
      SS_ASSIGN_OR_RETURN(DecoderLayerWeights w, DecoderLayerWeights::load(store_, p, hp_, false, false));
      layers_.push_back(w);
      return Status();
    }));
    SS_ASSIGN_OR_RETURN(rope_, Rope::load(store_, hp_));
    return Status();
  }

 private:
  // Fused path (ModelOptions): one GEMM for q|k|v and one for gate|up, RoPE fused with the q|k|v
  // split, each residual add fused with the norm after it. A decode step is bound by its launches
  // and small GEMMs; large batches are GEMM bound and skip the fused buffers (and, unfused, the
  // norm's output takes h's place).
  LayerBuffers make_buffers(Activations& act, int64_t t) override {
    const bool f = fused(t);
    return LayerBuffers(act, hp_, t, f, !f);
  }

  Status layers(std::span<const BatchSeq> batch, AttentionHandler& attn, const FlatBatch& flat, int first, int last,
                Tensor x, LayerBuffers& b) override {
    for (int l = first; l < last; ++l) {
      const DecoderLayerWeights& w = layers_[l];
      // xn = attn_norm(x); on the fused path the previous layer's last add already produced it
      // (within one call: a call ends its last layer with a plain add).
      if (!b.fused || l == first) w.attn_norm.apply(backend_, b.xn, x);
      SS_RETURN_IF_ERROR(attention_step(w.attn, rope_, attn, l, batch, flat, b));
      if (b.fused) {
        backend_.add_rms_norm(b.xn, x, b.h, w.ffn_norm.weight, w.ffn_norm.eps);
        mlp_block(backend_, w.mlp, b.xn, b.fused, b.mlp, b.h);
        if (l + 1 < last) {
          backend_.add_rms_norm(b.xn, x, b.h, layers_[l + 1].attn_norm.weight, layers_[l + 1].attn_norm.eps);
        } else {
          backend_.add(x, x, b.h);
        }
      } else {
        backend_.add(x, x, b.h);
        w.ffn_norm.apply(backend_, b.xn, x);
        mlp_block(backend_, w.mlp, b.xn, b.fused, b.mlp, b.h);
        backend_.add(x, x, b.h);
      }
    }
    return Status();
  }

  Rope rope_;
  std::vector<DecoderLayerWeights> layers_;
};

}  // namespace

Result<std::unique_ptr<Model>> build_llama(const WeightSource& source, Backend& backend, const ModelOptions& options) {
  // Mistral's sliding window is applied by the attention handlers; the backend must support it.
  BackendFeatures f;
  f.window = source.hparams().max_window();
  SS_RETURN_IF_ERROR(backend.check_features(f));
  auto m = std::make_unique<LlamaModel>(source.hparams(), backend, options, source);
  SS_RETURN_IF_ERROR(m->load());
  return std::unique_ptr<Model>(std::move(m));
}

}  // namespace starserve
