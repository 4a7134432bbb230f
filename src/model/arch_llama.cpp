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
  // One call's buffers besides the residual stream: normed xn, projection h, and the blocks'
  // buffers. Fused path (ModelOptions): one GEMM for q|k|v and one for gate|up, RoPE fused with the
  // q|k|v split, each residual add fused with the norm after it. A decode step is bound by its
  // launches and small GEMMs; large batches are GEMM bound and skip the fused buffers.
  struct Buffers {
    bool fused;
    Tensor h, xn;
    AttentionBuffers attn;
    MlpBuffers mlp;
    Buffers(Activations& act, const ModelHParams& hp, int64_t t, bool fused_path)
        : fused(fused_path),
          h(act.make({t, hp.hidden})),
          xn(fused_path ? act.make({t, hp.hidden}) : h),  // unfused: the norm's output may take h's place
          attn(act, hp, t, fused_path),
          mlp(act, hp, t, fused_path) {}
  };

  Status run(std::span<const BatchSeq> batch, AttentionHandler& attn, bool want_logits, DeviceBuffer* lg_buf,
             Tensor* lg) override {
    SS_ASSIGN_OR_RETURN(const FlatBatch flat, flatten_batch(batch, hp_.n_vocab));
    const int64_t t = flat.n_tokens();
    Activations act(backend_);
    Tensor x = act.make({t, hp_.hidden});
    Buffers buf(act, hp_, t, fused(t));
    // Allocations come first: a graph step (decode) records only ops.
    GraphStepScope graph_step(backend_, flat, batch);
    SS_RETURN_IF_ERROR(attn.begin_forward(batch));
    embed(flat, x);
    SS_RETURN_IF_ERROR(layers(batch, attn, flat, 0, hp_.n_layers, x, buf));
    attn.end_forward(batch);
    if (!want_logits) return Status();
    head_.logits(backend_, x, batch, flat.n_out, hp_.n_vocab, lg_buf, lg);
    return Status();
  }

  void embed(const FlatBatch& flat, Tensor x) override { backend_.embedding(x, tok_embd_, flat.ids); }

  Status run_layers(std::span<const BatchSeq> batch, AttentionHandler& attn, const FlatBatch& flat, int first,
                    int last, Tensor x) override {
    Activations act(backend_);
    Buffers buf(act, hp_, flat.n_tokens(), fused(flat.n_tokens()));
    return layers(batch, attn, flat, first, last, x, buf);
  }

  Status layers(std::span<const BatchSeq> batch, AttentionHandler& attn, const FlatBatch& flat, int first, int last,
                Tensor x, Buffers& b) {
    for (int l = first; l < last; ++l) {
      const LlamaLayer& w = layers_[l];
      // xn = attn_norm(x); on the fused path the previous layer's last add already produced it
      // (within one call: a call ends its last layer with a plain add).
      if (!b.fused || l == first) w.attn_norm.apply(backend_, b.xn, x);
      const Status st =
          attention_block(backend_, w.attn, rope_, attn, l, batch, flat.positions, b.xn, b.fused, b.attn, b.h);
      if (!st.ok()) {
        attn.end_forward({});
        return st;
      }
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

  Tensor tok_embd_;
  OutputHead head_;
  Rope rope_;
  std::vector<LlamaLayer> layers_;
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
