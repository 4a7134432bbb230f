#include "model/arch_prenorm.h"

#include "common/log.h"

namespace starserve {

Status PreNormDecoder::load() {
  SS_ASSIGN_OR_RETURN(tok_embd_, store_.load("token_embd.weight", {hp_.n_vocab, hp_.hidden}));
  SS_ASSIGN_OR_RETURN(head_, OutputHead::load(store_, hp_, tok_embd_));
  for (int l = 0; l < hp_.n_layers; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    Layer w;
    SS_ASSIGN_OR_RETURN(w.attn_norm, RmsNorm::load(store_, p + "attn_norm.weight", hp_));
    SS_ASSIGN_OR_RETURN(w.attn, AttentionWeights::load(store_, p, hp_));
    SS_RETURN_IF_ERROR(w.attn.load_extras(store_, p, hp_));
    SS_ASSIGN_OR_RETURN(w.ffn_norm, RmsNorm::load(store_, p + "ffn_norm.weight", hp_));
    SS_ASSIGN_OR_RETURN(w.mlp, MlpWeights::load_swiglu(store_, p, hp_));
    layers_.push_back(w);
    if ((l + 1) % 8 == 0 || l + 1 == hp_.n_layers) log_debug("loaded layer {}/{}", l + 1, hp_.n_layers);
  }
  SS_ASSIGN_OR_RETURN(rope_, Rope::load(store_, hp_));
  return Status();
}

BackendFeatures PreNormDecoder::features() const {
  BackendFeatures f;
  for (const Layer& w : layers_) f.bias = f.bias || w.attn.bq.data || w.attn.bk.data || w.attn.bv.data;
  f.window = hp_.max_window();
  return f;
}

Status PreNormDecoder::run(std::span<const BatchSeq> batch, AttentionHandler& attn, bool want_logits,
                           DeviceBuffer* lg_buf, Tensor* lg) {
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
  return Status();
}

Status PreNormDecoder::run_layers(std::span<const BatchSeq> batch, AttentionHandler& attn, const FlatBatch& flat,
                                  int first, int last, Tensor x) {
  Activations act(backend_);
  Buffers buf(act, hp_, flat.n_tokens());
  return layers(batch, attn, flat, first, last, x, buf);
}

Status PreNormDecoder::layers(std::span<const BatchSeq> batch, AttentionHandler& attn, const FlatBatch& flat,
                              int first, int last, Tensor x, Buffers& b) {
  for (int l = first; l < last; ++l) {
    const Layer& w = layers_[l];
    w.attn_norm.apply(backend_, b.xn, x);
    const Status st = attention_block(backend_, w.attn, rope_, attn, l, batch, flat.positions, b.xn, false, b.attn, b.h);
    if (!st.ok()) {
      attn.end_forward({});
      return st;
    }
    backend_.add(x, x, b.h);
    w.ffn_norm.apply(backend_, b.xn, x);
    mlp_block(backend_, w.mlp, b.xn, false, b.mlp, b.h);
    backend_.add(x, x, b.h);
  }
  return Status();
}

Result<std::unique_ptr<Model>> build_prenorm(const WeightSource& source, Backend& backend,
                                             const ModelOptions& options) {
  auto m = std::make_unique<PreNormDecoder>(source.hparams(), backend, options, source);
  // A backend without an op these weights need refuses them before the bulk of the upload.
  BackendFeatures wanted;
  wanted.bias = source.has("blk.0.attn_q.bias") || source.has("blk.0.attn_k.bias") || source.has("blk.0.attn_v.bias");
  wanted.window = source.hparams().max_window();
  SS_RETURN_IF_ERROR(backend.check_features(wanted));
  SS_RETURN_IF_ERROR(m->load());
  SS_RETURN_IF_ERROR(backend.check_features(m->features()));
  return std::unique_ptr<Model>(std::move(m));
}

}  // namespace starserve
