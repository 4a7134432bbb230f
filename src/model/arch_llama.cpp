// Llama-family architecture: pre-norm blocks of RMSNorm -> GQA attention with RoPE -> residual,
// RMSNorm -> SwiGLU MLP -> residual; final RMSNorm and an output projection (tied or separate).
// Every size comes from ModelHParams; the pieces are model/layers.h.
#include "common/log.h"
#include "model/arch_registry.h"
#include "model/layers.h"

namespace starserve {

namespace {

struct LlamaLayer {
  RmsNorm attn_norm, ffn_norm;
  AttentionWeights attn;
  MlpWeights mlp;
};

class LlamaModel final : public DecoderModel {
 public:
  using DecoderModel::DecoderModel;

  Status load() {
    SS_ASSIGN_OR_RETURN(tok_embd_, store_.load("token_embd.weight", {hp_.n_vocab, hp_.hidden}));
    SS_ASSIGN_OR_RETURN(head_, OutputHead::load(store_, hp_, tok_embd_));
    for (int l = 0; l < hp_.n_layers; ++l) {
      const std::string p = "blk." + std::to_string(l) + ".";
      LlamaLayer w;
      SS_ASSIGN_OR_RETURN(w.attn_norm, RmsNorm::load(store_, p + "attn_norm.weight", hp_));
      SS_ASSIGN_OR_RETURN(w.attn, AttentionWeights::load(store_, p, hp_));
      SS_ASSIGN_OR_RETURN(w.ffn_norm, RmsNorm::load(store_, p + "ffn_norm.weight", hp_));
      SS_ASSIGN_OR_RETURN(w.mlp, MlpWeights::load_swiglu(store_, p, hp_));
      layers_.push_back(w);
      if ((l + 1) % 8 == 0 || l + 1 == hp_.n_layers) log_debug("loaded layer {}/{}", l + 1, hp_.n_layers);
    }
    SS_ASSIGN_OR_RETURN(rope_, Rope::load(store_, hp_));
    return Status();
  }

 private:
  Status run(std::span<const BatchSeq> batch, AttentionHandler& attn, bool want_logits, DeviceBuffer* lg_buf,
             Tensor* lg) override {
    SS_ASSIGN_OR_RETURN(const FlatBatch flat, flatten_batch(batch, hp_.n_vocab));
    const int64_t t = flat.n_tokens();

    // Activations for this call: (T, hidden) residual x, normed xn, projection h, and the blocks'
    // buffers. Fused path (ModelOptions): one GEMM for q|k|v and one for gate|up, RoPE fused with
    // the q|k|v split, each residual add fused with the norm after it. A decode step is bound by
    // its launches and small GEMMs; large batches are GEMM bound and skip the fused buffers.
    const bool fused = DecoderModel::fused(t);
    Activations act(backend_);
    Tensor x = act.make({t, hp_.hidden}), h = act.make({t, hp_.hidden});
    Tensor xn = fused ? act.make({t, hp_.hidden}) : h;  // unfused: the norm's output may take h's place
    AttentionBuffers ab(act, hp_, t, fused);
    MlpBuffers mb(act, hp_, t, fused);
    GraphStepScope graph_step(backend_, flat, batch);

    SS_RETURN_IF_ERROR(attn.begin_forward(batch));
    backend_.embedding(x, tok_embd_, flat.ids);
    for (int l = 0; l < hp_.n_layers; ++l) {
      const LlamaLayer& w = layers_[l];
      // xn = attn_norm(x); on the fused path the previous layer's last add already produced it.
      if (!fused || l == 0) w.attn_norm.apply(backend_, xn, x);
      const Status st = attention_block(backend_, w.attn, rope_, attn, l, batch, flat.positions, xn, fused, ab, h);
      if (!st.ok()) {
        attn.end_forward({});
        return st;
      }
      if (fused) {
        backend_.add_rms_norm(xn, x, h, w.ffn_norm.weight, w.ffn_norm.eps);
        mlp_block(backend_, w.mlp, xn, fused, mb, h);
        if (l + 1 < hp_.n_layers) {
          backend_.add_rms_norm(xn, x, h, layers_[l + 1].attn_norm.weight, layers_[l + 1].attn_norm.eps);
        } else {
          backend_.add(x, x, h);
        }
      } else {
        backend_.add(x, x, h);
        w.ffn_norm.apply(backend_, xn, x);
        mlp_block(backend_, w.mlp, xn, fused, mb, h);
        backend_.add(x, x, h);
      }
    }
    attn.end_forward(batch);
    if (!want_logits) return Status();
    head_.logits(backend_, x, batch, flat.n_out, hp_.n_vocab, lg_buf, lg);
    return Status();
  }

  Tensor tok_embd_;
  OutputHead head_;
  Rope rope_;
  std::vector<LlamaLayer> layers_;
};

}  // namespace

Result<std::unique_ptr<Model>> build_llama(const WeightSource& source, Backend& backend, const ModelOptions& options) {
  auto m = std::make_unique<LlamaModel>(source.hparams(), backend, options, source);
  SS_RETURN_IF_ERROR(m->load());
  return std::unique_ptr<Model>(std::move(m));
}

}  // namespace starserve
