// KV-shifting attention (Xu et al., "KV Shifting Attention Enhances Language Modeling", arXiv
// 2411.19574): Llama blocks whose keys and values are mixed with the previous token's after the K
// and V projections and before RoPE and the cache,
//   k^_t = a[h, 1] k_t + a[h, 0] k_{t-1},   v^_t = b[h, 1] v_t + b[h, 0] v_{t-1}   (k_{-1} = v_{-1} = 0),
// with a, b learned per layer and KV head (attn_{k,v}_shift, (n_kv_heads, 2) fp32: column 0 weighs
// the previous token), and k^_t rotated at position t. The token before a sequence's first new token
// belongs to the attention handler (its last token so far, or another rank's under Star Attention):
// each layer hands it the raw k/v of every sequence's last new token and gets the predecessors'
// back (AttentionHandler::shift_neighbours); the mix runs fused with the q|k|v split and RoPE
// (Backend::split_qkv_shift_rope) or, on the unfused path, as kv_shift_rope after separate GEMMs.
#include "model/arch_registry.h"
#include "model/layers.h"

namespace starserve {

namespace {

class KvShiftModel final : public DecoderModel {
 public:
  using DecoderModel::DecoderModel;

  // KvCache::shift_rows: the last token's raw k and v per layer, in the compute dtype.
  int64_t sequence_state_bytes() const override {
    return int64_t{hp_.n_layers} * 2 * hp_.n_kv_heads * hp_.head_dim *
           static_cast<int64_t>(dtype_size(backend_.compute_dtype()));
  }

  Status load() {
    SS_RETURN_IF_ERROR(load_embedding_and_head());
    SS_RETURN_IF_ERROR(load_layers([this](int, const std::string& p) -> Status {
      Layer layer;
      SS_ASSIGN_OR_RETURN(layer.w, DecoderLayerWeights::load(store_, p, hp_, false, false));
      SS_ASSIGN_OR_RETURN(layer.k_shift, load_shift(p + "attn_k_shift"));
      SS_ASSIGN_OR_RETURN(layer.v_shift, load_shift(p + "attn_v_shift"));
      layers_.push_back(layer);
      return Status();
    }));
    SS_ASSIGN_OR_RETURN(rope_, Rope::load(store_, hp_));
    return Status();
  }

 private:
  struct Layer {
    DecoderLayerWeights w;
    Tensor k_shift, v_shift;  // (n_kv_heads, 2) fp32 on the device
  };

  // The mixing weights stay fp32 on every backend: they are a handful of scalars, and the mix is
  // computed in fp32 before its one rounding to the compute dtype.
  Result<Tensor> load_shift(const std::string& name) {
    if (!store_.has(name)) return not_found("kvshift: the weights have no {}", name);
    SS_ASSIGN_OR_RETURN(HostTensor t, store_.load_host(name));
    if (t.numel() != 2 * int64_t{hp_.n_kv_heads} || t.shape.back() != 2) {
      return data_loss("kvshift: tensor {} has {} values, expected ({}, 2)", name, t.numel(), hp_.n_kv_heads);
    }
    Tensor w = store_.upload_f32(t.data);
    w.ndim = 2;
    w.shape = {hp_.n_kv_heads, 2, 0, 0};
    return w;
  }

  LayerBuffers make_buffers(Activations& act, int64_t t) override {
    const bool f = fused(t);
    if (!f) {
      // The unfused path projects raw k and v apart from their mixed, rotated forms.
      k_raw_ = act.make({t, hp_.n_kv_heads, hp_.head_dim});
      v_raw_ = act.make({t, hp_.n_kv_heads, hp_.head_dim});
    }
    return LayerBuffers(act, hp_, t, f, !f);
  }

  Status layers(std::span<const BatchSeq> batch, AttentionHandler& attn, const FlatBatch& flat, int first, int last,
                Tensor x, LayerBuffers& b) override {
    // Per call: each sequence's first token takes its predecessor from row i of prev, every other
    // token from the batch row before it.
    const int64_t n_seqs = static_cast<int64_t>(batch.size());
    prev_index_.assign(static_cast<size_t>(flat.n_tokens()), -1);
    seq_last_.clear();
    int64_t start = 0;
    for (int64_t i = 0; i < n_seqs; ++i) {
      const int64_t n = static_cast<int64_t>(batch[i].tokens.size());
      SS_CHECK(n > 0, "kvshift: sequence {} of the batch has no tokens", batch[i].seq_id);
      prev_index_[static_cast<size_t>(start)] = static_cast<int32_t>(i);
      start += n;
      seq_last_.push_back(start - 1);
    }
    const DType dt = backend_.compute_dtype();
    const Tensor last_rows = last_buf_.view(backend_, dt, {n_seqs, 2, hp_.n_kv_heads, hp_.head_dim});
    const Tensor prev_rows = prev_buf_.view(backend_, dt, {n_seqs, 2, hp_.n_kv_heads, hp_.head_dim});
    for (int l = first; l < last; ++l) {
      const DecoderLayerWeights& w = layers_[l].w;
      if (!b.fused || l == first) w.attn_norm.apply(backend_, b.xn, x);
      const Status st = attention(layers_[l], attn, l, batch, flat, b, last_rows, prev_rows);
      if (!st.ok()) {
        attn.end_forward({});  // run_layers' contract, as DecoderModel::attention_step
        return st;
      }
      if (b.fused) {
        backend_.add_rms_norm(b.xn, x, b.h, w.ffn_norm.weight, w.ffn_norm.eps);
        mlp_block(backend_, w.mlp, b.xn, b.fused, b.mlp, b.h);
        if (l + 1 < last) {
          backend_.add_rms_norm(b.xn, x, b.h, layers_[l + 1].w.attn_norm.weight, layers_[l + 1].w.attn_norm.eps);
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

  // h = wo . attention over b.xn with the KV-shifting mix; last_rows / prev_rows: (n_seqs, 2,
  // n_kv_heads, head_dim) for the handler's shift_neighbours.
  Status attention(const Layer& layer, AttentionHandler& attn, int l, std::span<const BatchSeq> batch,
                   const FlatBatch& flat, LayerBuffers& b, Tensor last_rows, Tensor prev_rows) {
    const AttentionWeights& w = layer.w.attn;
    AttentionBuffers& buf = b.attn;
    const DType dt = backend_.compute_dtype();
    const int64_t kv_dim = int64_t{hp_.n_kv_heads} * hp_.head_dim;
    const int64_t q_dim = int64_t{hp_.n_heads} * hp_.head_dim;
    const size_t es = dtype_size(dt);
    auto rows_at = [&](const Tensor& base, int64_t offset_elems, int64_t n_rows) {
      return Tensor::make(static_cast<char*>(base.data) + offset_elems * static_cast<int64_t>(es), dt,
                          {n_rows, hp_.n_kv_heads, hp_.head_dim});
    };
    if (b.fused) {
      backend_.matmul(buf.qkv, b.xn, w.wqkv);
      // A row's k and v parts are adjacent: [q | k | v].
      for (size_t i = 0; i < seq_last_.size(); ++i) {
        backend_.copy(last_rows.slice_rows(static_cast<int64_t>(i), 1),
                      rows_at(buf.qkv, seq_last_[i] * (q_dim + 2 * kv_dim) + q_dim, 2));
      }
    } else {
      backend_.matmul(as_matrix(buf.q), b.xn, w.wq);
      backend_.matmul(as_matrix(k_raw_), b.xn, w.wk);
      backend_.matmul(as_matrix(v_raw_), b.xn, w.wv);
      for (size_t i = 0; i < seq_last_.size(); ++i) {
        const Tensor dst = last_rows.slice_rows(static_cast<int64_t>(i), 1);
        backend_.copy(rows_at(dst, 0, 1), k_raw_.slice_rows(seq_last_[i], 1));
        backend_.copy(rows_at(dst, kv_dim, 1), v_raw_.slice_rows(seq_last_[i], 1));
      }
    }
    SS_RETURN_IF_ERROR(attn.shift_neighbours(l, batch, last_rows, prev_rows));
    const KvShiftArgs args{prev_rows, prev_index_, layer.k_shift, layer.v_shift};
    if (b.fused) {
      backend_.split_qkv_shift_rope(buf.q, buf.k, buf.v, buf.qkv, args, flat.positions, rope_.inv_freq, rope_.rope_dim,
                                    rope_.style);
    } else {
      backend_.rope(buf.q, flat.positions, rope_.inv_freq, rope_.rope_dim, rope_.style);
      backend_.kv_shift_rope(buf.k, buf.v, k_raw_, v_raw_, args, flat.positions, rope_.inv_freq, rope_.rope_dim,
                             rope_.style);
    }
    SS_RETURN_IF_ERROR(attn.attend(l, batch, buf.q, buf.k, buf.v, buf.a));
    backend_.matmul(b.h, as_matrix(buf.a), w.wo);
    return Status();
  }

  Rope rope_;
  std::vector<Layer> layers_;
  Tensor k_raw_, v_raw_;               // unfused path: this call's raw projections (make_buffers)
  Scratch last_buf_, prev_buf_;        // (n_seqs, 2, n_kv_heads, head_dim)
  std::vector<int32_t> prev_index_;    // KvShiftArgs::prev_index of this call
  std::vector<int64_t> seq_last_;      // each sequence's last row in the batch
};

}  // namespace

Result<std::unique_ptr<Model>> build_kvshift(const WeightSource& source, Backend& backend,
                                             const ModelOptions& options) {
  const ModelHParams& hp = source.hparams();
  if (!hp.kv_shift) return invalid_argument("kvshift: the weights ({}) do not describe a KV-shifting model", hp.arch_name);
  BackendFeatures f;
  f.kv_shift = true;
  f.window = hp.max_window();
  SS_RETURN_IF_ERROR(backend.check_features(f));
  auto m = std::make_unique<KvShiftModel>(hp, backend, options, source);
  SS_RETURN_IF_ERROR(m->load());
  return std::unique_ptr<Model>(std::move(m));
}

}  // namespace starserve
