#include "star/context_encoder.h"

#include <algorithm>
#include <numeric>

namespace starserve {

ContextEncoder::ContextEncoder(Model& model, KvCache& cache, Communicator& comm)
    : model_(model),
      cache_(cache),
      comm_(comm),
      block_attention_(model.backend(), cache, model.hparams()),
      exact_attention_(model.backend(), cache, model.hparams(), comm) {}

Result<StarLayout> ContextEncoder::layout_for(int64_t n_context, const ContextPlan& requested) const {
  const ModelHParams& hp = model_.hparams();
  ContextPlan plan = requested;
  // Attamba's star blocks are a multiple of the chunk size: a block size the plan derives (one block
  // per rank, or n_blocks) is rounded up to one; a block size asked for explicitly is checked below.
  if (hp.attamba.enabled() && plan.mode == AttentionMode::kStar && n_context > 0 &&
      (plan.block_size == 0 || plan.n_blocks > 0)) {
    const int64_t parts = plan.n_blocks > 0 ? plan.n_blocks : comm_.world_size();
    const int64_t p = hp.attamba.chunk;
    const int64_t block = ((n_context + parts - 1) / parts + p - 1) / p * p;
    plan.block_size = static_cast<int>(block);
    plan.n_blocks = 0;
  }
  // Exact mode's layout: zigzag unless the model hands a halo across every rank boundary of the
  // span (KV shifting's previous token, Attamba's carry): a zigzag rank's two chunks continue two
  // other ranks' chunks, in one forward, which ExactContextAttention's halo does not do.
  if (plan.mode == AttentionMode::kExact) {
    const bool halo = hp.kv_shift || hp.attamba.enabled();
    if (plan.exact_layout == ExactLayout::kAuto) {
      plan.exact_layout = halo ? ExactLayout::kContiguous : ExactLayout::kZigzag;
    } else if (plan.exact_layout == ExactLayout::kZigzag && halo && comm_.world_size() > 1) {
      return unimplemented("exact mode's zigzag layout with {} model on {} ranks: each rank's second chunk would "
                           "continue the {} of a chunk on another rank, which only the contiguous layout hands on; "
                           "use exact_layout contiguous (or auto, which picks it for this model)",
                           hp.kv_shift ? "a KV-shifting" : "an Attamba", comm_.world_size(),
                           hp.kv_shift ? "previous token's k/v" : "carry");
    }
  }
  SS_ASSIGN_OR_RETURN(StarLayout lay, plan_layout(n_context, plan, comm_.world_size()));
  if (hp.attamba.enabled()) SS_RETURN_IF_ERROR(check_attamba_layout(lay, plan.mode));
  // KV-shifting models: every rank's first block mixes with the previous block's last token, which
  // its owner computes in the same step only when that is the owner's first block too (Attamba:
  // continues its carry).
  if ((hp.kv_shift || hp.attamba.enabled()) && plan.mode == AttentionMode::kStar && shift_halo(lay)) {
    for (const StarBlock& b : lay.blocks) {
      if (b.index == 0) continue;
      const int owner = lay.blocks[b.index - 1].rank;
      const size_t owned = lay.blocks_of(owner).size();
      if (owner != b.rank && owned > 1) {
        return unimplemented("star with {} model: rank {} holds {} blocks of {} tokens and hands its last "
                             "token to rank {}; the ranks before the last must hold one block each (block size >= "
                             "ceil({} / {}) tokens, or 0 = one block per rank)",
                             hp.kv_shift ? "a KV-shifting" : "an Attamba", owner, owned, lay.block_size, b.rank, n_context,
                             comm_.world_size());
      }
    }
  }
  return lay;
}

bool ContextEncoder::shift_halo(const StarLayout& layout) const {
  const ModelHParams& hp = model_.hparams();
  return (hp.kv_shift || hp.attamba.enabled()) && comm_.world_size() > 1 && layout.blocks.size() > 1;
}

// Attamba (docs/specs/attamba.md, "Under Star Attention"): star blocks are a multiple of the chunk
// size P. A rank that hands its carry to the next (star: its block, exact: its span) must be long
// enough that the carry after its last token does not depend on the carry it receives itself in
// the same layer: its last L tokens lie after its first chunk of every layer (L <= n - P + off_l,
// L <= n with off_l = 0). Then one halo per layer gives what one process computes.
Status ContextEncoder::check_attamba_layout(const StarLayout& lay, AttentionMode mode) const {
  const ModelHParams& hp = model_.hparams();
  const AttambaHParams& a = hp.attamba;
  if (mode == AttentionMode::kStar && lay.blocks.size() > 1 && lay.block_size % a.chunk != 0) {
    return invalid_argument("star with an Attamba model: block size {} is not a multiple of the chunk size {}",
                            lay.block_size, a.chunk);
  }
  if (comm_.world_size() == 1 || lay.blocks.size() < 2) return Status();
  for (int r = 0; r + 1 < comm_.world_size(); ++r) {
    const std::vector<StarBlock> mine = lay.blocks_of(r);
    if (mine.empty() || lay.blocks_of(r + 1).empty()) continue;
    const int64_t n = mode == AttentionMode::kExact ? lay.tokens_of(r) : mine.back().size();
    for (int l = 0; l < hp.n_layers; ++l) {
      const int off = a.offset(l, hp.n_layers);
      const int64_t most = off == 0 ? n : n - a.chunk + off;
      if (a.leading > most) {
        return invalid_argument("{} with an Attamba model: rank {} hands its carry on after {} tokens, fewer than the "
                                "{} leading tokens plus the first chunk of layer {} ({} tokens); use longer blocks",
                                mode == AttentionMode::kExact ? "exact" : "star", r, n, a.leading, l,
                                off == 0 ? 0 : a.chunk - off);
      }
    }
  }
  return Status();
}

Status ContextEncoder::forward_block(SeqId seq, std::span<const int32_t> tokens, int64_t first_position) {
  std::vector<int32_t> pos(tokens.size());
  std::iota(pos.begin(), pos.end(), static_cast<int32_t>(first_position));
  BatchSeq bs{seq, tokens, pos, false};
  tokens_forwarded_ += static_cast<int64_t>(tokens.size());
  return model_.forward({&bs, 1}, block_attention_, nullptr);
}

int ContextEncoder::chunks_per_block(int layers_per_chunk) const {
  const int n = model_.hparams().n_layers;
  if (layers_per_chunk <= 0 || layers_per_chunk >= n) return 1;
  return (n + layers_per_chunk - 1) / layers_per_chunk;
}

std::pair<int, int> ContextEncoder::chunk_layers(int chunk, int layers_per_chunk) const {
  const int n = model_.hparams().n_layers;
  if (chunks_per_block(layers_per_chunk) == 1) return {0, n};
  return {chunk * layers_per_chunk, std::min(n, (chunk + 1) * layers_per_chunk)};
}

Status ContextEncoder::forward_chunk(AttentionHandler& attention, SeqId seq, std::span<const int32_t> tokens,
                                     int64_t first_position, int chunk, int layers_per_chunk,
                                     const ContextScoring* scoring) {
  std::vector<int32_t> pos(tokens.size());
  std::iota(pos.begin(), pos.end(), static_cast<int32_t>(first_position));
  return forward_chunk(attention, seq, tokens, pos, chunk, layers_per_chunk, scoring);
}

Status ContextEncoder::forward_chunk(AttentionHandler& attention, SeqId seq, std::span<const int32_t> tokens,
                                     std::span<const int32_t> positions, int chunk, int layers_per_chunk,
                                     const ContextScoring* scoring) {
  SS_CHECK(positions.size() == tokens.size(), "{} tokens with {} positions", tokens.size(), positions.size());
  BatchSeq bs{seq, tokens, positions, false};
  ScoreRequest scores;
  std::vector<int32_t> targets;
  if (scoring != nullptr) {
    targets.resize(positions.size());
    for (size_t i = 0; i < positions.size(); ++i) {
      SS_CHECK(positions[i] >= 0 && static_cast<size_t>(positions[i]) < scoring->next.size(),
               "scoring position {} with {} next tokens", positions[i], scoring->next.size());
      targets[i] = scoring->next[positions[i]];
    }
    scores = ScoreRequest{targets, scoring->top_k, scoring->out};
    bs.scores = &scores;
  }
  if (chunk == 0) tokens_forwarded_ += static_cast<int64_t>(tokens.size());
  if (chunks_per_block(layers_per_chunk) == 1) return model_.forward({&bs, 1}, attention, nullptr);
  PartialForward& pf = partial_[seq];
  if (chunk == 0) pf = PartialForward{};
  SS_CHECK(pf.next_layer == chunk_layers(chunk, layers_per_chunk).first, "sequence {}: chunk {} after layer {}", seq,
           chunk, pf.next_layer);
  const Status st = model_.forward_layers({&bs, 1}, attention, layers_per_chunk, &pf);
  if (!st.ok() || pf.next_layer == model_.hparams().n_layers) partial_.erase(seq);
  return st;
}

void ContextEncoder::finish(SeqId seq) {
  cache_.free_sequence(anchor_seq_id(seq));
  partial_.erase(seq);
  exact_attention_.forget(seq);
}

Status ContextEncoder::encode(SeqId seq, std::span<const int32_t> context, const StarLayout& layout,
                              AttentionMode mode, const BlockProgressFn& progress, const ContinueFn& keep_going) {
  SS_CHECK(static_cast<int64_t>(context.size()) == layout.n_context, "context {} tokens, layout {}", context.size(),
           layout.n_context);
  Status st;
  if (mode == AttentionMode::kExact) {
    st = encode_exact(seq, context, layout);
  } else {
    const int n = static_cast<int>(layout.blocks_of(comm_.rank()).size());
    if (n == 0) st = join_block(seq, layout, 0);
    for (int k = 0; k < n && st.ok(); ++k) {
      if (keep_going) st = keep_going();
      if (st.ok()) st = encode_block(seq, context, layout, k);
      if (st.ok() && progress) progress(k + 1, n);
    }
  }
  if (!st.ok()) cache_.free_sequence(seq);
  finish(seq);
  return st;
}

bool ContextEncoder::exchanges_anchor(const StarLayout& layout) const {
  return comm_.world_size() > 1 && layout.anchor_size > 0 && layout.blocks.size() > 1;
}

Status ContextEncoder::join_block(SeqId seq, const StarLayout& layout, int k, int chunk, int layers_per_chunk) {
  (void)seq;
  const bool halo = k == 0 && shift_halo(layout);
  block_attention_.set_shift_halo(halo ? &comm_ : nullptr, -1);  // sends zeros, receives nothing
  const bool anchor = k == 0 && exchanges_anchor(layout) && comm_.rank() != layout.blocks.front().rank;
  if (!anchor && !halo) return Status();
  AnchorExchange x;
  if (anchor) {
    x.comm = &comm_;
    x.root = layout.blocks.front().rank;
    x.anchor_len = layout.anchor_size;
  }
  const auto [first, last] = chunk_layers(chunk, layers_per_chunk);
  return block_attention_.join_anchor_exchange(x, first, last);
}

Status ContextEncoder::encode_block(SeqId seq, std::span<const int32_t> context, const StarLayout& layout, int k,
                                    int chunk, int layers_per_chunk, const ContextScoring* scoring) {
  const std::vector<StarBlock> mine = layout.blocks_of(comm_.rank());
  SS_CHECK(k >= 0 && k < static_cast<int>(mine.size()), "block {} of {}", k, mine.size());
  const StarBlock& b = mine[k];
  // KV-shifting models on several ranks: a rank's first block takes the previous block's last
  // token from its owner (a one-token halo per layer); later blocks follow this rank's own.
  const bool halo = k == 0 && shift_halo(layout);
  block_attention_.set_shift_halo(halo ? &comm_ : nullptr, halo && b.index > 0 ? layout.blocks[b.index - 1].rank : -1);
  const int64_t anchor_len = layout.anchor_size;
  const std::span<const int32_t> tokens = context.subspan(b.begin, b.size());
  // With several ranks the owner of c1 sends the anchor's KV while it encodes c1 and the others
  // receive it during their first block (AnchorExchange); a single rank reuses c1's own KV.
  AnchorExchange x;
  x.comm = &comm_;
  x.root = layout.blocks.front().rank;
  x.anchor_len = anchor_len;
  const bool exchange = exchanges_anchor(layout);
  if (b.index == 0 || anchor_len == 0) {
    // c1 is encoded alone (and without an anchor every block is): plain causal attention.
    block_attention_.set_prefix(std::nullopt, 0);
    if (exchange && b.index == 0) x.role = AnchorExchange::Role::kSend;
    block_attention_.set_anchor_exchange(x);
    Status st = forward_chunk(block_attention_, seq, tokens, b.begin, chunk, layers_per_chunk, scoring);
    block_attention_.set_anchor_exchange(AnchorExchange());
    return st;
  }
  // The anchor's KV is the KV of c1's first anchor_size tokens (same tokens, positions 0.., causal):
  // the rank that owns c1 reuses its own, every other rank gets it once and keeps it for all its
  // blocks (spec phase 1 step 7), from the owner of c1 (layer by layer during its first block, in
  // every chunk of it) or, on one rank, by encoding it itself.
  SeqId anchor_seq = seq;
  if (mine.front().index != 0) {
    anchor_seq = anchor_seq_id(seq);
    if (exchange) {
      if (k == 0) {
        if (chunk == 0) {
          SS_RETURN_IF_ERROR(cache_.reserve(anchor_seq, anchor_len));
          cache_.set_length(anchor_seq, anchor_len);
        }
        x.role = AnchorExchange::Role::kReceive;
        x.anchor_seq = anchor_seq;
      }
    } else if (chunk == 0 && (!cache_.has(anchor_seq) || cache_.length(anchor_seq) < anchor_len)) {
      block_attention_.set_prefix(std::nullopt, 0);
      SS_RETURN_IF_ERROR(forward_block(anchor_seq, context.subspan(0, anchor_len), 0));
    }
  }
  block_attention_.set_prefix(anchor_seq, anchor_len);
  block_attention_.set_anchor_exchange(x);
  Status st = forward_chunk(block_attention_, seq, tokens, b.begin, chunk, layers_per_chunk, scoring);
  block_attention_.set_prefix(std::nullopt, 0);
  block_attention_.set_anchor_exchange(AnchorExchange());
  return st;
}

Status ContextEncoder::encode_exact(SeqId seq, std::span<const int32_t> context, const StarLayout& layout, int chunk,
                                    int layers_per_chunk, const ContextScoring* scoring) {
  // This rank's runs (one span, or zigzag's two chunks) in a single forward, each token at its own
  // position: the KV rows hold the runs one after the other.
  const std::vector<TokenRun> runs = layout.runs_of(comm_.rank());
  if (runs.empty()) {
    const auto [first, last] = chunk_layers(chunk, layers_per_chunk);
    return exact_attention_.participate_without_tokens(seq, first, last, model_.hparams().n_layers);
  }
  if (runs.size() == 1) {
    return forward_chunk(exact_attention_, seq, context.subspan(runs[0].begin, runs[0].size()), runs[0].begin, chunk,
                         layers_per_chunk, scoring);
  }
  std::vector<int32_t> tokens, pos;
  for (const TokenRun& r : runs) {
    tokens.insert(tokens.end(), context.begin() + r.begin, context.begin() + r.end);
    for (int64_t p = r.begin; p < r.end; ++p) pos.push_back(static_cast<int32_t>(p));
  }
  return forward_chunk(exact_attention_, seq, tokens, pos, chunk, layers_per_chunk, scoring);
}

}  // namespace starserve
