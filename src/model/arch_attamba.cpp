// Attamba (Akhauri et al., "Attamba: Attending To Multi-Token States", arXiv 2411.17685) with the
// semantics starserve fixes (docs/specs/attamba.md, "What starserve fixes"): a Llama block whose K
// and V projections are chunk-local Mamba-2 SSMs with a residual,
//   h = attn_norm(x), q = W_q h, k = SSM_k(h) + h, v = SSM_v(h) + h, RoPE on q and k,
// and whose attention sees, from query t, the band t - L .. t and the boundaries j < t - L of its
// layer's chunks. Each SSM: zxbcdt = in_proj h split (z, xBC, dt) by column ranges of one GEMM's
// rows (the backend ops read them with the row stride), xBC <- silu(conv1d(xBC)), the SSD scan,
// y <- RMSNorm(y * silu(z)) * norm, out_proj y; the conv window and the state restart at every
// chunk start of the layer (off_l = min(P - 1, l floor(P / n_layers))).
// What a forward continues from (the conv tails, the SSD states and the ring of the last L k/v) is
// the carry (AttambaCarryLayout), which the attention handler keeps per layer and sequence
// (AttentionHandler::load_carry / store_carry), and attention is the handler's
// (attend_compressed), which stores only the boundary tokens' k/v.
#include <algorithm>

#include "model/arch_registry.h"
#include "model/layers.h"

namespace starserve {

namespace {

// One SSM's weights: in_proj and out_proj in the compute dtype, the small tensors in fp32.
struct SsmWeights {
  Tensor in_proj;   // (2 d_inner + 2 G N + H, hidden)
  Tensor conv_w;    // (conv_dim, W) fp32
  Tensor conv_b;    // (conv_dim) fp32
  Tensor dt_bias, a_log, d;  // (H) fp32
  Tensor norm;      // (d_inner) fp32
  Tensor out_proj;  // (hidden, d_inner)
};

class AttambaModel final : public DecoderModel {
 public:
  using DecoderModel::DecoderModel;

  // The carry: AttambaCarryLayout::floats() fp32 values per layer.
  int64_t sequence_state_bytes() const override {
    return int64_t{hp_.n_layers} * AttambaCarryLayout::of(hp_.attamba, hp_.hidden).floats() *
           static_cast<int64_t>(sizeof(float));
  }

  Status load() {
    const AttambaHParams& a = hp_.attamba;
    layout_ = AttambaCarryLayout::of(a, hp_.hidden);
    dims_ = SsmDims{a.n_heads, static_cast<int>(a.head_dim()), a.n_groups, a.d_state};
    SS_RETURN_IF_ERROR(load_embedding_and_head());
    SS_RETURN_IF_ERROR(load_layers([this](int, const std::string& p) -> Status {
      Layer layer;
      SS_ASSIGN_OR_RETURN(layer.attn_norm, RmsNorm::load(store_, p + "attn_norm.weight", hp_));
      SS_ASSIGN_OR_RETURN(layer.ffn_norm, RmsNorm::load(store_, p + "ffn_norm.weight", hp_));
      const int64_t q_dim = int64_t{hp_.n_heads} * hp_.head_dim;
      SS_ASSIGN_OR_RETURN(layer.wq, store_.load(p + "attn_q.weight", {q_dim, hp_.hidden}));
      SS_ASSIGN_OR_RETURN(layer.wo, store_.load(p + "attn_output.weight", {hp_.hidden, q_dim}));
      SS_ASSIGN_OR_RETURN(layer.mlp, MlpWeights::load_swiglu(store_, p, hp_));
      SS_ASSIGN_OR_RETURN(layer.ssm[0], load_ssm(p + "k_ssm."));
      SS_ASSIGN_OR_RETURN(layer.ssm[1], load_ssm(p + "v_ssm."));
      layers_.push_back(layer);
      return Status();
    }));
    SS_ASSIGN_OR_RETURN(rope_, Rope::load(store_, hp_));
    return Status();
  }

 private:
  struct Layer {
    RmsNorm attn_norm, ffn_norm;
    Tensor wq, wo;
    MlpWeights mlp;
    SsmWeights ssm[2];  // k_ssm, v_ssm
  };

  // A small tensor as fp32 on the device, its element count checked.
  Result<Tensor> load_f32(const std::string& name, int64_t n, std::initializer_list<int64_t> dims) {
    if (!store_.has(name)) return not_found("attamba: the weights have no {}", name);
    SS_ASSIGN_OR_RETURN(HostTensor t, store_.load_host(name));
    if (t.numel() != n) return data_loss("attamba: tensor {} has {} values, expected {}", name, t.numel(), n);
    Tensor w = store_.upload_f32(t.data);
    w.ndim = 0;
    for (int64_t d : dims) w.shape[w.ndim++] = d;
    return w;
  }

  Result<SsmWeights> load_ssm(const std::string& p) {
    const AttambaHParams& a = hp_.attamba;
    SsmWeights w;
    SS_ASSIGN_OR_RETURN(w.in_proj, store_.load(p + "in_proj.weight", {a.in_proj_rows(), hp_.hidden}));
    SS_ASSIGN_OR_RETURN(w.out_proj, store_.load(p + "out_proj.weight", {hp_.hidden, a.d_inner}));
    SS_ASSIGN_OR_RETURN(w.conv_w, load_f32(p + "conv1d.weight", a.conv_dim() * a.conv_width,
                                           {a.conv_dim(), a.conv_width}));
    SS_ASSIGN_OR_RETURN(w.conv_b, load_f32(p + "conv1d.bias", a.conv_dim(), {a.conv_dim()}));
    SS_ASSIGN_OR_RETURN(w.dt_bias, load_f32(p + "dt_bias", a.n_heads, {a.n_heads}));
    SS_ASSIGN_OR_RETURN(w.a_log, load_f32(p + "A_log", a.n_heads, {a.n_heads}));
    SS_ASSIGN_OR_RETURN(w.d, load_f32(p + "D", a.n_heads, {a.n_heads}));
    SS_ASSIGN_OR_RETURN(w.norm, load_f32(p + "norm.weight", a.d_inner, {a.d_inner}));
    return w;
  }

  Status layers(std::span<const BatchSeq> batch, AttentionHandler& attn, const FlatBatch& flat, int first, int last,
                Tensor x, LayerBuffers& b) override {
    const AttambaHParams& a = hp_.attamba;
    const int64_t t = flat.n_tokens();
    const int64_t n_seqs = static_cast<int64_t>(batch.size());
    seq_index_.assign(static_cast<size_t>(t), 0);
    seq_begin_.clear();
    int64_t start = 0;
    for (int64_t i = 0; i < n_seqs; ++i) {
      const int64_t n = static_cast<int64_t>(batch[i].tokens.size());
      SS_CHECK(n > 0, "attamba: sequence {} of the batch has no tokens", batch[i].seq_id);
      std::fill(seq_index_.begin() + start, seq_index_.begin() + start + n, static_cast<int32_t>(i));
      seq_begin_.push_back(start);
      start += n;
    }
    seq_begin_.push_back(start);
    Activations act(backend_);
    zx_ = act.make({t, a.in_proj_rows()});
    conv_ = act.make({t, a.conv_dim()});
    y_ = act.make({t, a.d_inner});
    carry_in_ = carry_in_buf_.view(backend_, DType::kF32, {n_seqs, layout_.floats()});
    carry_out_ = carry_out_buf_.view(backend_, DType::kF32, {n_seqs, layout_.floats()});
    for (int s = 0; s < 2; ++s) {
      tails_[s] = tails_buf_[s].view(backend_, DType::kF32, {n_seqs, a.conv_width - 1, a.conv_dim()});
      states_[s] = states_buf_[s].view(backend_, DType::kF32, {n_seqs, dims_.n_heads, dims_.head_dim, a.d_state});
    }
    for (int l = first; l < last; ++l) {
      const Layer& w = layers_[l];
      w.attn_norm.apply(backend_, b.xn, x);
      const Status st = attention(w, attn, l, batch, flat, b);
      if (!st.ok()) {
        attn.end_forward({});  // run_layers' contract, as DecoderModel::attention_step
        return st;
      }
      backend_.add(x, x, b.h);
      w.ffn_norm.apply(backend_, b.xn, x);
      mlp_block(backend_, w.mlp, b.xn, b.fused, b.mlp, b.h);
      backend_.add(x, x, b.h);
    }
    return Status();
  }

  // Per sequence, a carry row's floats [at, at + n) into / out of a batch tensor of n per sequence.
  void carry_part_to(Tensor batch_rows, Tensor carry, int64_t at, int64_t n) {
    for (int64_t i = 0; i < carry.shape[0]; ++i) {
      backend_.copy(Tensor::make(batch_rows.f32() + i * n, DType::kF32, {n}),
                    Tensor::make(carry.f32() + i * layout_.floats() + at, DType::kF32, {n}));
    }
  }
  void carry_part_from(Tensor carry, Tensor batch_rows, int64_t at, int64_t n) {
    for (int64_t i = 0; i < carry.shape[0]; ++i) {
      backend_.copy(Tensor::make(carry.f32() + i * layout_.floats() + at, DType::kF32, {n}),
                    Tensor::make(batch_rows.f32() + i * n, DType::kF32, {n}));
    }
  }

  // dst (T, hidden) = SSM s of b.xn with the tails and states of carry_in_, then + b.xn; the
  // tails and states end as those after each sequence's last token.
  void ssm_into(const SsmWeights& w, int s, Tensor xn, Tensor dst, SsmRows rows) {
    const AttambaHParams& a = hp_.attamba;
    carry_part_to(tails_[s], carry_in_, layout_.tail_at(s), layout_.conv);
    carry_part_to(states_[s], carry_in_, layout_.state_at(s), layout_.state);
    backend_.matmul(zx_, xn, w.in_proj);
    backend_.causal_conv1d_silu(conv_, zx_, a.d_inner, w.conv_w, w.conv_b, tails_[s], rows);
    backend_.ssd_scan(y_, conv_, zx_, 2 * int64_t{a.d_inner} + 2 * int64_t{a.n_groups} * a.d_state, w.a_log, w.d,
                      w.dt_bias, states_[s], dims_, rows);
    backend_.gated_rms_norm(y_, y_, zx_, 0, w.norm, hp_.rms_eps);
    backend_.matmul(as_matrix(dst), y_, w.out_proj);
    backend_.add(dst, dst, xn);
  }

  // q, k, v of the layer from b.xn and carry_in_ (k, v through the SSMs; RoPE on q and k).
  void project(const Layer& w, const FlatBatch& flat, LayerBuffers& b, SsmRows rows) {
    AttentionBuffers& buf = b.attn;
    backend_.matmul(as_matrix(buf.q), b.xn, w.wq);
    ssm_into(w.ssm[0], 0, b.xn, buf.k, rows);
    ssm_into(w.ssm[1], 1, b.xn, buf.v, rows);
    backend_.rope(buf.q, flat.positions, rope_.inv_freq, rope_.rope_dim, rope_.style);
    backend_.rope(buf.k, flat.positions, rope_.inv_freq, rope_.rope_dim, rope_.style);
  }

  // carry_out_ from carry_in_ and this call: the SSM tails and states after the last token (now in
  // tails_ / states_), the ring = the last L rows of [valid ring of carry_in_ ; new k / v].
  void build_carry_out(Tensor k, Tensor v) {
    const int64_t L = layout_.ring_rows, row = layout_.row, cf = layout_.floats();
    for (int s = 0; s < 2; ++s) {
      carry_part_from(carry_out_, tails_[s], layout_.tail_at(s), layout_.conv);
      carry_part_from(carry_out_, states_[s], layout_.state_at(s), layout_.state);
    }
    header_.resize(static_cast<size_t>(AttambaCarryLayout::kHeader));
    for (int64_t i = 0; i < carry_in_.shape[0]; ++i) {
      backend_.download_f32(header_.data(), Tensor::make(carry_in_.f32() + i * cf, DType::kF32,
                                                          {AttambaCarryLayout::kHeader}));
      const int64_t n_ring = std::clamp<int64_t>(static_cast<int64_t>(header_[0]), 0, L);
      const int64_t n = seq_begin_[i + 1] - seq_begin_[i];
      const int64_t keep = std::min(L, n_ring + n);
      const int64_t from_new = std::min(keep, n);  // the newest rows of the ring
      const int64_t from_old = keep - from_new;    // the rest from the old ring's newest
      float* out = carry_out_.f32() + i * cf;
      const float* in = carry_in_.f32() + i * cf;
      for (int kv = 0; kv < 2; ++kv) {
        const int64_t at = kv == 0 ? layout_.ring_k_at() : layout_.ring_v_at();
        if (keep < L) zero(Tensor::make(out + at, DType::kF32, {(L - keep) * row}));
        if (from_old > 0) {
          backend_.copy(Tensor::make(out + at + (L - keep) * row, DType::kF32, {from_old * row}),
                        Tensor::make(const_cast<float*>(in) + at + (L - from_old) * row, DType::kF32,
                                     {from_old * row}));
        }
        if (from_new > 0) {
          const Tensor src = (kv == 0 ? k : v).slice_rows(seq_begin_[i + 1] - from_new, from_new);
          backend_.convert(Tensor::make(out + at + (L - from_new) * row, DType::kF32, {from_new * row}),
                           Tensor::make(src.data, src.dtype, {from_new * row}));
        }
      }
      header_.assign(header_.size(), 0.0f);
      header_[0] = static_cast<float>(keep);
      backend_.upload_f32(Tensor::make(out, DType::kF32, {AttambaCarryLayout::kHeader}), header_.data());
    }
  }

  void zero(Tensor t) {
    zeros_.assign(static_cast<size_t>(t.numel()), 0.0f);
    backend_.upload_f32(t, zeros_.data());
  }

  // h = wo . Attamba attention over b.xn.
  Status attention(const Layer& w, AttentionHandler& attn, int l, std::span<const BatchSeq> batch,
                   const FlatBatch& flat, LayerBuffers& b) {
    const AttambaHParams& a = hp_.attamba;
    const int64_t t = flat.n_tokens();
    reset_.resize(static_cast<size_t>(t));
    boundary_.resize(static_cast<size_t>(t));
    for (int64_t i = 0; i < t; ++i) {
      reset_[i] = a.chunk_start(l, hp_.n_layers, flat.positions[i]) ? 1 : 0;
      boundary_[i] = a.boundary(l, hp_.n_layers, flat.positions[i]) ? 1 : 0;
    }
    const SsmRows rows{seq_index_, reset_};
    SS_RETURN_IF_ERROR(attn.load_carry(l, batch, carry_in_));
    project(w, flat, b, rows);
    build_carry_out(b.attn.k, b.attn.v);
    bool replaced = false;
    SS_RETURN_IF_ERROR(attn.store_carry(l, batch, carry_out_, carry_in_, &replaced));
    if (replaced) project(w, flat, b, rows);
    const CompressedAttention ca{b.attn.q, b.attn.k, b.attn.v, b.attn.a, carry_in_, boundary_};
    SS_RETURN_IF_ERROR(attn.attend_compressed(l, batch, ca));
    backend_.matmul(b.h, as_matrix(b.attn.a), w.wo);
    return Status();
  }

  Rope rope_;
  std::vector<Layer> layers_;
  AttambaCarryLayout layout_;
  SsmDims dims_;
  // One call's SSM activations (layers(): the Activations of run_layers' call hold them).
  Tensor zx_, conv_, y_;
  Tensor carry_in_, carry_out_, tails_[2], states_[2];
  Scratch carry_in_buf_, carry_out_buf_, tails_buf_[2], states_buf_[2];
  std::vector<int32_t> seq_index_;  // SsmRows::seq of this call
  std::vector<uint8_t> reset_, boundary_;
  std::vector<int64_t> seq_begin_;  // each sequence's first row, then the row count
  std::vector<float> header_, zeros_;
};

}  // namespace

Result<std::unique_ptr<Model>> build_attamba(const WeightSource& source, Backend& backend,
                                             const ModelOptions& options) {
  const ModelHParams& hp = source.hparams();
  if (!hp.attamba.enabled()) {
    return invalid_argument("attamba: the weights ({}) do not describe an Attamba model", hp.arch_name);
  }
  BackendFeatures f;
  f.ssm = true;
  SS_RETURN_IF_ERROR(backend.check_features(f));
  auto m = std::make_unique<AttambaModel>(hp, backend, options, source);
  SS_RETURN_IF_ERROR(m->load());
  return std::unique_ptr<Model>(std::move(m));
}

}  // namespace starserve
