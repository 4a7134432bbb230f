// The architecture interface. One file per architecture (arch_llama.cpp, later GPT-2, KV-shifting,
// Attamba) implements Model; everything above it (engine, star, server) sees only this header.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "backend/backend.h"
#include "common/status.h"
#include "model/hparams.h"
#include "model/token_scores.h"
#include "model/weight_source.h"

namespace starserve {

// One sequence's share of a batched forward pass. tokens and positions are host arrays of equal
// length; positions are the RoPE positions (Star Attention keeps original positions for blocks and
// 0.. for the anchor, so they are not always contiguous).
struct BatchSeq {
  int64_t seq_id = 0;
  std::span<const int32_t> tokens;
  std::span<const int32_t> positions;
  bool all_logits = false;  // logits for every token (true) or only the last (false)
  // When set, the forward also scores the sequence's tokens (model/token_scores.h): forward,
  // forward_sample, and the forward_layers call that runs the last layer. Host memory of the caller.
  const ScoreRequest* scores = nullptr;
};

// One Attamba layer's attention (arch attamba, docs/specs/attamba.md): the new tokens' q, k (after
// the SSM residual and RoPE) and v, which of them are boundaries of the layer (their k/v are the
// only ones the cache stores), and each sequence's carry before its first new token, whose ring
// (the last L tokens' k/v) holds the band's older keys.
struct CompressedAttention {
  Tensor q, k, v;  // (T, n_heads, head_dim), compute dtype
  Tensor out;      // (T, n_heads, head_dim), compute dtype
  Tensor carry;    // (n_seqs, AttambaCarryLayout::floats()) fp32
  std::span<const uint8_t> boundary;  // host (T)
};

// Where attention happens. The architecture computes q, k, v (RoPE applied) for all tokens of the
// batch, sequences concatenated in batch order, and hands them over; the handler decides which keys
// they meet (local KV cache, Star phase 1 anchor+block, phase 2 partial + merge across ranks).
class AttentionHandler {
 public:
  virtual ~AttentionHandler() = default;
  virtual Status begin_forward(std::span<const BatchSeq> batch) = 0;
  // q: (T, n_heads, head_dim); k, v: (T, n_kv_heads, head_dim); out: (T, n_heads, head_dim).
  virtual Status attend(int layer, std::span<const BatchSeq> batch, Tensor q, Tensor k, Tensor v, Tensor out) = 0;
  virtual void end_forward(std::span<const BatchSeq> batch) = 0;
  // KV-shifting attention (arch kvshift): a layer mixes each token's raw (pre-RoPE) k and v with
  // the previous token's, and the token before a sequence's first new one is the handler's to know
  // (its earlier tokens, another rank's block under Star Attention). last: (n_seqs, 2, n_kv_heads,
  // head_dim) the raw k (row 0) and v (row 1) of each sequence's last new token in batch order;
  // the handler fills prev (same shape) with those of the token before each sequence's first new
  // one (zeros at a sequence's start) and keeps last for what follows. Called before attend(),
  // once per layer; a handler that serves no such model answers kUnimplemented.
  virtual Status shift_neighbours(int layer, std::span<const BatchSeq> batch, Tensor last, Tensor prev) {
    (void)batch, (void)last, (void)prev;
    return unimplemented("this attention handler does not serve KV-shifting models (layer {})", layer);
  }
  // Attamba, per layer and in this order: load_carry fills carry (n_seqs, AttambaCarryLayout::
  // floats()) fp32 with each sequence's carry before its first new token as this process keeps it
  // (zeros at a sequence's start); store_carry hands over each sequence's carry after its last new
  // token (computed from that) for the handler to keep, and where the true predecessor is another
  // rank's (a Star Attention halo) replaces carry with it and sets *replaced: the model then
  // recomputes the layer's k/v from it (the carry after the last token does not depend on it in the
  // layouts the handlers accept). attend_compressed attends as the mask of the spec says.
  virtual Status load_carry(int layer, std::span<const BatchSeq> batch, Tensor carry) {
    (void)batch, (void)carry;
    return unimplemented("this attention handler does not serve Attamba models (layer {})", layer);
  }
  virtual Status store_carry(int layer, std::span<const BatchSeq> batch, Tensor carry_out, Tensor carry,
                             bool* replaced) {
    (void)batch, (void)carry_out, (void)carry, (void)replaced;
    return unimplemented("this attention handler does not serve Attamba models (layer {})", layer);
  }
  virtual Status attend_compressed(int layer, std::span<const BatchSeq> batch, const CompressedAttention& a) {
    (void)batch, (void)a;
    return unimplemented("this attention handler does not serve Attamba models (layer {})", layer);
  }
};

class Model {
 public:
  virtual ~Model() = default;
  virtual const ModelHParams& hparams() const = 0;
  virtual Backend& backend() = 0;
  // Runs the batch through every layer. When logits is non-null it receives host fp32 rows
  // (n_vocab each): per sequence in batch order, every token if all_logits else the last one.
  virtual Status forward(std::span<const BatchSeq> batch, AttentionHandler& attention, std::vector<float>* logits) = 0;
  // forward, then one token per logits row picked on the device (Backend::sample_rows) instead of
  // downloading the rows: rows[i] describes row i in forward's order, tokens[i] receives its token.
  // Only on a backend with can_sample_rows().
  virtual Status forward_sample(std::span<const BatchSeq> batch, AttentionHandler& attention,
                                std::span<const SampleRow> rows, std::span<int32_t> tokens) = 0;
  // A forward split by layers over several calls (chunked prefill): each call runs the next
  // n_layers layers of the batch, and the residual stream waits in *state between calls. The call
  // with state->next_layer == 0 begins the handler's forward (and embeds the tokens); the call that
  // runs the last layer ends it. No logits (prefill of context only). Results equal forward()'s
  // within the rounding of one residual add at each boundary (the fused add + norm is split there).
  virtual Status forward_layers(std::span<const BatchSeq> batch, AttentionHandler& attention, int n_layers,
                                struct PartialForward* state) = 0;
  // Bytes of the fixed decode state one sequence holds beside its KV rows, over all layers (KvCache::
  // carry, KvCache::shift_rows): Attamba's carry, KV shifting's previous raw k/v; 0 for the others.
  virtual int64_t sequence_state_bytes() const { return 0; }
};

// The residual stream of a forward_layers sequence between its calls.
struct PartialForward {
  DeviceBuffer x;       // (T, hidden) in the compute dtype
  int next_layer = 0;   // the first layer the next call runs
  int calls = 0;        // calls made so far
};

// Choices of how a model computes (not what): both paths give the same results within rounding.
struct ModelOptions {
  // Forwards of at most this many tokens fuse the q|k|v and gate|up projections into one GEMM each
  // and fuse RoPE and the residual adds with their neighbours (decode steps, short chunks); larger
  // ones run the ops one by one with smaller activations. 0 = never fuse.
  int64_t fused_max_tokens = 1024;
};

// Builds the architecture named by hparams().arch and uploads its weights to the backend.
Result<std::unique_ptr<Model>> create_model(const WeightSource& source, Backend& backend,
                                            const ModelOptions& options = {});

}  // namespace starserve
