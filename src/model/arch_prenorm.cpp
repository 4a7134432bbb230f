#include "model/arch_prenorm.h"

namespace starserve {

Status PreNormDecoder::load() {
  SS_RETURN_IF_ERROR(load_embedding_and_head());
  SS_RETURN_IF_ERROR(load_layers([this](int, const std::string& p) -> Status {
    SS_ASSIGN_OR_RETURN(DecoderLayerWeights w, DecoderLayerWeights::load(store_, p, hp_, true, false));
    layers_.push_back(w);
    return Status();
  }));
  SS_ASSIGN_OR_RETURN(rope_, Rope::load(store_, hp_));
  return Status();
}

BackendFeatures PreNormDecoder::features() const {
  BackendFeatures f;
  for (const DecoderLayerWeights& w : layers_) f.bias = f.bias || w.attn.bq.data || w.attn.bk.data || w.attn.bv.data;
  f.window = hp_.max_window();
  return f;
}

Status PreNormDecoder::layers(std::span<const BatchSeq> batch, AttentionHandler& attn, const FlatBatch& flat,
                              int first, int last, Tensor x, LayerBuffers& b) {
  for (int l = first; l < last; ++l) {
    const DecoderLayerWeights& w = layers_[l];
    w.attn_norm.apply(backend_, b.xn, x);
    SS_RETURN_IF_ERROR(attention_step(w.attn, rope_, attn, l, batch, flat, b));
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
