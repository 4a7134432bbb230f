// Shared pieces of decoder architectures, so that an architecture file (arch_*.cpp) says only how
// its blocks are wired: weights uploaded with shape checks, per-call activations, norms, the
// attention block with the handler hook, MLP kinds, embeddings and positions, the output head, and
// the forward / forward_sample plumbing every Model shares. Each piece issues the same backend ops
// in the same order as the code it replaced, so results are unchanged bit for bit.
#pragma once

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "backend/backend.h"
#include "common/status.h"
#include "model/hparams.h"
#include "model/model.h"
#include "model/weight_source.h"

namespace starserve {

// Uploads named tensors of a WeightSource to a backend (in its compute dtype), checking each shape
// against the hyper-parameters; owns the device memory of everything it uploaded.
class WeightStore {
 public:
  WeightStore(Backend& backend, const WeightSource& source) : backend_(backend), source_(source) {}
  bool has(const std::string& name) const { return source_.has(name); }
  Result<Tensor> load(const std::string& name, std::initializer_list<int64_t> dims);
  // Several (rows_i, cols) tensors stacked row-wise into one device matrix, in the order given.
  Result<Tensor> load_stacked(std::initializer_list<std::pair<std::string, int64_t>> parts, int64_t cols);
  // load() with `offset` added to every value on the host first (Gemma's (1 + w) norms).
  Result<Tensor> load_offset(const std::string& name, std::initializer_list<int64_t> dims, float offset);
  // A tensor as the file holds it, in host fp32 (for values the model derives others from).
  Result<HostTensor> load_host(const std::string& name) const { return source_.load(name); }
  // Host values to the device as fp32 (e.g. RoPE frequencies).
  Tensor upload_f32(const std::vector<float>& values);

 private:
  Backend& backend_;
  const WeightSource& source_;
  std::vector<DeviceBuffer> buffers_;
};

// One forward call's activations, in the compute dtype, freed in stream order when it goes.
class Activations {
 public:
  explicit Activations(Backend& backend) : backend_(backend) {}
  Tensor make(std::initializer_list<int64_t> dims);

 private:
  Backend& backend_;
  std::vector<DeviceBuffer> bufs_;
};

// (T, ...) -> (T, numel / T): a tensor as the 2-D matrix a GEMM takes.
inline Tensor as_matrix(Tensor m) { return Tensor::make(m.data, m.dtype, {m.shape[0], m.numel() / m.shape[0]}); }

// ---- batch and positions

// The batch flattened: token ids and positions of all sequences in batch order, and the number of
// logits rows the call returns (every token of all_logits sequences, else the last). Token ids
// are range-checked (INVALID_ARGUMENT).
struct FlatBatch {
  std::vector<int32_t> ids, positions;
  int64_t n_out = 0;
  int64_t n_tokens() const { return static_cast<int64_t>(ids.size()); }
};
Result<FlatBatch> flatten_batch(std::span<const BatchSeq> batch, int n_vocab);

// Rotary positions: the per-pair frequencies on the device (scaling and the file's optional
// rope_freqs.weight applied), and how pairs are formed.
struct Rope {
  Tensor inv_freq;  // (rope_dim / 2) fp32
  int rope_dim = 0;
  RopeStyle style = RopeStyle::kHalf;
  static Result<Rope> load(WeightStore& store, const ModelHParams& hp);
};

// RoPE angular frequencies per rotated pair (rope_dim / 2), with the file's scaling applied.
// rope_freqs: optional per-pair divisors stored by llama.cpp for llama3-style scaling.
std::vector<float> rope_inv_freq(const ModelHParams& hp, std::span<const float> rope_freqs);

// ---- norms

struct RmsNorm {
  Tensor weight;  // (hidden)
  float eps = 1e-5f;
  // weight (hidden) plus hp.norm_weight_offset.
  static Result<RmsNorm> load(WeightStore& store, const std::string& name, const ModelHParams& hp);
  // A norm over the last `dim` values of each row (per-head q/k norms: dim = head_dim).
  static Result<RmsNorm> load_dim(WeightStore& store, const std::string& name, int64_t dim, const ModelHParams& hp);
  // Rows of in.cols() values each (a (T, n_heads, head_dim) tensor is T * n_heads rows).
  void apply(Backend& backend, Tensor out, Tensor in) const { backend.rms_norm(out, in, weight, eps); }
  bool present() const { return weight.data != nullptr; }
};

// LayerNorm with weight and bias (GPT-2): (x - mean) / sqrt(var + eps) * weight + bias per row.
struct LayerNorm {
  Tensor weight, bias;  // (hidden)
  float eps = 1e-5f;
  // `prefix` + "weight" and + "bias" ("blk.N.attn_norm."), eps hp.rms_eps.
  static Result<LayerNorm> load(WeightStore& store, const std::string& prefix, const ModelHParams& hp);
  void apply(Backend& backend, Tensor out, Tensor in) const { backend.layer_norm(out, in, weight, bias, eps); }
  bool present() const { return weight.data != nullptr; }
};

// ---- attention block

// q, k, v projections stored as one matrix (rows [q | k | v]): a decode step reads them in one
// GEMM (fused path) while a prefill multiplies by the row ranges wq, wk, wv (views into it) and
// keeps its activations smaller.
struct AttentionWeights {
  Tensor wqkv, wq, wk, wv, wo;
  // Optional, each on the unfused path only (attention_block): q/k/v biases (Qwen2), added after
  // the projections, and per-head RMSNorms of q and k before RoPE (Qwen3, Gemma 3).
  Tensor bq, bk, bv;
  Tensor bo;  // output projection bias (GPT-2), added after wo
  RmsNorm q_norm, k_norm;
  bool has_extras() const {
    return bq.data || bk.data || bv.data || bo.data || q_norm.present() || k_norm.present();
  }
  // GGUF names under `prefix` ("blk.N."): attn_q, attn_k, attn_v, attn_output; or, when the file
  // holds attn_qkv (Phi-3), that one fused matrix (rows [q | k | v]) and attn_output.
  static Result<AttentionWeights> load(WeightStore& store, const std::string& prefix, const ModelHParams& hp);
  // The optional attn_{q,k,v}.bias and attn_{q,k}_norm.weight that the file holds.
  Status load_extras(WeightStore& store, const std::string& prefix, const ModelHParams& hp);
};

struct AttentionBuffers {
  Tensor q, k, v, a;  // (T, n_heads | n_kv_heads, head_dim)
  Tensor qkv;         // fused path: (T, (n_heads + 2 n_kv_heads) * head_dim)
  AttentionBuffers(Activations& act, const ModelHParams& hp, int64_t n_tokens, bool fused);
};

// h (T, hidden) = wo . attention(rope(xn wq), rope(xn wk), xn wv) with the handler deciding which
// keys each query meets. A Rope of rope_dim 0 rotates nothing (GPT-2's positions are learned and
// added to the embeddings; the handlers still place keys by position). On a handler error the
// caller ends the forward.
Status attention_block(Backend& backend, const AttentionWeights& w, const Rope& rope, AttentionHandler& attn,
                       int layer, std::span<const BatchSeq> batch, std::span<const int32_t> positions, Tensor xn,
                       bool fused, AttentionBuffers& buf, Tensor h);

// ---- MLP kinds

enum class MlpKind { kSwiGlu, kGeGlu };

// SwiGLU: down(silu(gate(x)) * up(x)); GeGLU: down(gelu_tanh(gate(x)) * up(x)) (Gemma); gate and up
// stored as one matrix (rows [gate | up]).
struct MlpWeights {
  MlpKind kind = MlpKind::kSwiGlu;
  Tensor w_gate_up, w_gate, w_up, w_down;
  // GGUF names under `prefix`: ffn_gate, ffn_up, ffn_down; or, without ffn_gate (Phi-3), ffn_up
  // holding gate and up fused (2 ffn rows, gate first) and ffn_down.
  static Result<MlpWeights> load_swiglu(WeightStore& store, const std::string& prefix, const ModelHParams& hp);
  static Result<MlpWeights> load_geglu(WeightStore& store, const std::string& prefix, const ModelHParams& hp);
};

struct MlpBuffers {
  Tensor g;   // (T, ffn)
  Tensor u;   // unfused path: (T, ffn)
  Tensor gu;  // fused path: (T, 2 ffn)
  MlpBuffers(Activations& act, const ModelHParams& hp, int64_t n_tokens, bool fused);
};

// h (T, hidden) = mlp(xn). GeGLU runs the unfused path only.
void mlp_block(Backend& backend, const MlpWeights& w, Tensor xn, bool fused, MlpBuffers& buf, Tensor h);

// ---- embeddings and output head

struct OutputHead {
  RmsNorm norm;
  LayerNorm layer_norm;  // GPT-2's ln_f, in place of norm when present
  Tensor weight;  // (n_vocab, hidden): the token embedding itself when tied
  // output_norm, then output.weight or the tied token_embd.
  // With hp.layer_norm: output_norm.weight and output_norm.bias as a LayerNorm.
  static Result<OutputHead> load(WeightStore& store, const ModelHParams& hp, Tensor token_embedding);
  // The final norm of rows x (R, hidden) into out; a head without either norm (the LayerNorm-free
  // GPT-2) leaves them as they are.
  void apply_norm(Backend& backend, Tensor out, Tensor in) const {
    if (layer_norm.present()) {
      layer_norm.apply(backend, out, in);
    } else if (norm.present()) {
      norm.apply(backend, out, in);
    } else if (out.data != in.data) {
      backend.copy(out, in);
    }
  }
  // The rows of x (T, hidden) that need logits (FlatBatch::n_out), normed and projected:
  // *lg = (n_out, n_vocab) in the compute dtype, held by *lg_buf.
  void logits(Backend& backend, Tensor x, std::span<const BatchSeq> batch, int64_t n_out, int n_vocab,
              DeviceBuffer* lg_buf, Tensor* lg) const;
};

// ---- decoder layers

// What every decoder layer here holds: the norms before attention and before the FFN, the
// attention (with the q/k/v biases and per-head q/k norms the file holds, when `extras`) and the
// gated MLP (SwiGLU, or GeGLU when `geglu`), under `prefix` ("blk.N.").
struct DecoderLayerWeights {
  RmsNorm attn_norm, ffn_norm;
  AttentionWeights attn;
  MlpWeights mlp;
  static Result<DecoderLayerWeights> load(WeightStore& store, const std::string& prefix, const ModelHParams& hp,
                                          bool extras, bool geglu);
};

// One call's buffers besides the residual stream: the normed input xn, a block's output h, and the
// attention and MLP blocks' own (fused: for the fused path). share_xn: xn takes h's place (each
// block reads its normed input before it writes h).
struct LayerBuffers {
  bool fused;
  Tensor h, xn;
  AttentionBuffers attn;
  MlpBuffers mlp;
  LayerBuffers(Activations& act, const ModelHParams& hp, int64_t n_tokens, bool fused_path, bool share_xn);
};

// ---- the Model plumbing

// A decoder whose forward and forward_sample differ only in what happens to the logits: run()
// embeds, runs the architecture's layers() and the output head; forward downloads the logits or
// samples them. An architecture loads its weights (load_embedding_and_head, load_layers) and
// implements layers(), and where it differs the embedding, the buffers or the logits' last step.
class DecoderModel : public Model {
 public:
  DecoderModel(const ModelHParams& hp, Backend& backend, const ModelOptions& options, const WeightSource& source)
      : hp_(hp), backend_(backend), options_(options), store_(backend, source) {}
  const ModelHParams& hparams() const override { return hp_; }
  Backend& backend() override { return backend_; }
  Status forward(std::span<const BatchSeq> batch, AttentionHandler& attention, std::vector<float>* logits) override;
  Status forward_sample(std::span<const BatchSeq> batch, AttentionHandler& attention, std::span<const SampleRow> rows,
                        std::span<int32_t> tokens) override;
  Status forward_layers(std::span<const BatchSeq> batch, AttentionHandler& attention, int n_layers,
                        PartialForward* state) override;

 protected:
  // Every layer over the batch; with want_logits, *lg = (rows, n_vocab) logits on the device in
  // the compute dtype (per sequence in batch order: every token if all_logits, else the last),
  // held by *lg_buf.
  Status run(std::span<const BatchSeq> batch, AttentionHandler& attention, bool want_logits, DeviceBuffer* lg_buf,
             Tensor* lg);
  // Layers [first, last) over the batch's residual stream x (T, hidden), which the first layer of
  // the model finds embedded. The handler's forward is already begun and is ended by the caller; on
  // a handler error this ends it and returns the error.
  Status run_layers(std::span<const BatchSeq> batch, AttentionHandler& attention, const FlatBatch& flat, int first,
                    int last, Tensor x);
  // The architecture's blocks: layers [first, last) with one call's buffers, as run_layers.
  virtual Status layers(std::span<const BatchSeq> batch, AttentionHandler& attention, const FlatBatch& flat,
                        int first, int last, Tensor x, LayerBuffers& b) = 0;
  // Embeds the batch into x (T, hidden): token_embd's rows.
  virtual void embed(const FlatBatch& flat, Tensor x) { backend_.embedding(x, tok_embd_, flat.ids); }
  // Whether the model can take the batch's positions (before anything runs): OK by default; a model
  // with a table of learned positions refuses one past it (INVALID_ARGUMENT).
  virtual Status check_positions(const FlatBatch& flat) const {
    (void)flat;
    return Status();
  }
  // The buffers of a call of n_tokens (unfused, xn apart from h).
  virtual LayerBuffers make_buffers(Activations& act, int64_t n_tokens) {
    return LayerBuffers(act, hp_, n_tokens, false, false);
  }
  // The logits (rows, n_vocab) after the output head, on the device (nothing to do by default).
  virtual void finish_logits(Tensor lg) { (void)lg; }
  // Whether a call of n_tokens takes the fused path (ModelOptions::fused_max_tokens).
  bool fused(int64_t n_tokens) const { return n_tokens <= options_.fused_max_tokens; }
  // The scores the batch's sequences ask for (BatchSeq::scores) from the final residual stream x
  // (T, hidden): output head and finish_logits on slices of score_slice_rows rows, downloaded and
  // scored on the host.
  void score_tokens(Tensor x, std::span<const BatchSeq> batch);

  // token_embd.weight and the output head (output_norm, output.weight or the tied embedding).
  Status load_embedding_and_head();
  // load_layer(l, "blk.<l>.") for every layer, in order, with progress at debug level.
  Status load_layers(const std::function<Status(int, const std::string&)>& load_layer);
  // attention_block of layer l over b.xn into b.h; on a handler error the handler's forward is
  // ended (run_layers' contract) and the error returned.
  Status attention_step(const AttentionWeights& w, const Rope& rope, AttentionHandler& attention, int l,
                        std::span<const BatchSeq> batch, const FlatBatch& flat, LayerBuffers& b);

  ModelHParams hp_;
  Backend& backend_;
  ModelOptions options_;
  WeightStore store_;
  Tensor tok_embd_;
  OutputHead head_;
};

// A decode step (one token per sequence) may run as CUDA graphs (Backend::begin_graph_step); the
// step ends when this object goes, before the call's activations are freed (declare it after them).
class GraphStepScope {
 public:
  GraphStepScope(Backend& backend, const FlatBatch& flat, std::span<const BatchSeq> batch);
  ~GraphStepScope();
  GraphStepScope(const GraphStepScope&) = delete;
  GraphStepScope& operator=(const GraphStepScope&) = delete;

 private:
  Backend* backend_ = nullptr;
};

}  // namespace starserve
