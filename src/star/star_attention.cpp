#include "star/star_attention.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

namespace starserve {

namespace {
AttentionCall make_call(const AttentionDims& d, Tensor out, float* lse, float* ent, Tensor q,
                        std::span<const KvView> kv, AttentionMask mask) {
  AttentionCall c;
  c.out = out;
  c.lse = lse;
  c.entropy = ent;
  c.q = q;
  c.kv = kv;
  c.n_heads = d.n_heads;
  c.n_kv_heads = d.n_kv_heads;
  c.head_dim = d.head_dim;
  c.scale = d.scale;
  c.softcap = d.softcap;
  c.mask = mask;
  return c;
}

// mask with layer's sliding window (if any): query row i is at position i + window_offset; keys
// are at their logical index, plus key_gap from key_gap_from on (AttentionMask).
AttentionMask windowed(AttentionMask mask, int64_t window, int64_t window_offset, int64_t key_gap_from = 0,
                       int64_t key_gap = 0) {
  if (window <= 0) return mask;
  mask.window = window;
  mask.window_offset = window_offset;
  mask.key_gap_from = key_gap_from;
  mask.key_gap = key_gap;
  return mask;
}

// fp32 rows for partials: the output itself when it is fp32 (CPU), else device scratch.
Tensor fp32_target(Backend& backend, Tensor out, Scratch& scratch) {
  if (out.dtype == DType::kF32) return out;
  return scratch.view(backend, DType::kF32, {out.shape[0], out.shape[1], out.shape[2]});
}
}  // namespace

AttentionDims AttentionDims::from(const ModelHParams& hp) {
  AttentionDims d{hp.n_heads, hp.n_kv_heads, hp.head_dim, hp.attention_scale(), hp.attn_softcap, {}};
  if (hp.max_window() > 0) {
    d.layer_window.resize(hp.n_layers);
    for (int l = 0; l < hp.n_layers; ++l) d.layer_window[l] = hp.window_of(l);
  }
  return d;
}

// ---------------------------------------------------------------- BlockLocalAttention

BlockLocalAttention::BlockLocalAttention(Backend& backend, KvCache& cache, const ModelHParams& hp)
    : backend_(backend), cache_(cache), dims_(AttentionDims::from(hp)), compressed_(backend, hp) {}

void BlockLocalAttention::set_prefix(std::optional<SeqId> prefix_seq, int64_t prefix_len) {
  prefix_seq_ = prefix_seq;
  prefix_len_ = prefix_seq ? prefix_len : 0;
}

Status BlockLocalAttention::begin_forward(std::span<const BatchSeq> batch) {
  for (const BatchSeq& s : batch) {
    SS_RETURN_IF_ERROR(cache_.reserve(s.seq_id, cache_.length(s.seq_id) + static_cast<int64_t>(s.tokens.size())));
  }
  return Status();
}

Status broadcast_tensor(Backend& backend, Communicator& comm, Tensor t, int root) {
  if (backend.kind() == DeviceKind::kCpu) return comm.broadcast(t.data, t.bytes(), root);
  if (comm.has_device_collectives()) return comm.broadcast_device(t.data, t.bytes(), root, backend.stream());
  std::vector<char> host(t.bytes());
  if (comm.rank() == root) backend.download_bytes(host.data(), t.data, host.size());
  SS_RETURN_IF_ERROR(comm.broadcast(host.data(), host.size(), root));
  if (comm.rank() != root) backend.upload_bytes(t.data, host.data(), host.size());
  return Status();
}

// kSend: k, v are c1's rows, whose first anchor_len rows are the anchor's. kReceive (and a rank
// joining without tokens): the anchor's rows arrive into scratch and, when receiving, go into the
// anchor sequence at positions 0.. of this layer.
Status BlockLocalAttention::exchange_anchor(int layer, Tensor k, Tensor v) {
  const AnchorExchange& x = exchange_;
  if (x.role == AnchorExchange::Role::kSend) {
    SS_RETURN_IF_ERROR(broadcast_tensor(backend_, *x.comm, k.slice_rows(0, x.anchor_len), x.root));
    return broadcast_tensor(backend_, *x.comm, v.slice_rows(0, x.anchor_len), x.root);
  }
  const DType dt = backend_.compute_dtype();
  const Tensor ak = anchor_k_.view(backend_, dt, {x.anchor_len, dims_.n_kv_heads, dims_.head_dim});
  const Tensor av = anchor_v_.view(backend_, dt, {x.anchor_len, dims_.n_kv_heads, dims_.head_dim});
  SS_RETURN_IF_ERROR(broadcast_tensor(backend_, *x.comm, ak, x.root));
  SS_RETURN_IF_ERROR(broadcast_tensor(backend_, *x.comm, av, x.root));
  if (x.role == AnchorExchange::Role::kReceive) cache_.write(layer, x.anchor_seq, 0, ak, av);
  return Status();
}

Status BlockLocalAttention::join_anchor_exchange(const AnchorExchange& x, int first, int last) {
  exchange_ = x;
  exchange_.role = AnchorExchange::Role::kNone;  // receive and drop
  const int64_t row = 2 * static_cast<int64_t>(dims_.n_kv_heads) * dims_.head_dim;
  Status st;
  for (int layer = first; layer < last && st.ok(); ++layer) {
    // The order of a rank that encodes: shift_neighbours (Attamba: store_carry), then attend.
    if (halo_comm_ != nullptr) {
      st = compressed_.enabled()
               ? halo_.exchange_f32(backend_, *halo_comm_, Tensor(), -1, Tensor(), compressed_.carry_floats())
               : halo_.exchange(backend_, *halo_comm_, Tensor(), -1, Tensor(), row);
    }
    if (st.ok() && x.comm != nullptr) {
      st = compressed_.enabled() ? exchange_compressed_anchor(layer, 0) : exchange_anchor(layer, Tensor(), Tensor());
    }
  }
  exchange_ = AnchorExchange();
  return st;
}

// A block's first token: the previous block's last token, which is this rank's own previous block
// (the sequence's shift rows) or, for a rank's first block, the halo from the rank that owns the
// previous block (spec: the true previous context token, not the anchor's last token).
Status BlockLocalAttention::shift_neighbours(int layer, std::span<const BatchSeq> batch, Tensor last, Tensor prev) {
  shift_rows_from_cache(backend_, cache_, layer, batch, last, prev);
  if (halo_comm_ == nullptr) return Status();
  SS_CHECK(batch.size() == 1, "the KV-shifting halo runs with one sequence per forward, not {}", batch.size());
  const int64_t row = 2 * static_cast<int64_t>(dims_.n_kv_heads) * dims_.head_dim;
  const Tensor mine = last.slice_rows(0, 1);
  if (halo_source_ < 0) return halo_.exchange(backend_, *halo_comm_, mine, -1, Tensor(), row);
  return halo_.exchange(backend_, *halo_comm_, mine, halo_source_, prev.slice_rows(0, 1), row);
}

Status BlockLocalAttention::attend(int layer, std::span<const BatchSeq> batch, Tensor q, Tensor k, Tensor v,
                                   Tensor out) {
  if (exchange_.role != AnchorExchange::Role::kNone) {
    SS_CHECK(batch.size() == 1, "the anchor exchange runs with one sequence per forward, not {}", batch.size());
    SS_RETURN_IF_ERROR(exchange_anchor(layer, k, v));
  }
  int64_t start = 0;
  for (const BatchSeq& s : batch) {
    const int64_t n = static_cast<int64_t>(s.tokens.size());
    const int64_t past = cache_.length(s.seq_id);
    cache_.write(layer, s.seq_id, past, k.slice_rows(start, n), v.slice_rows(start, n));
    std::vector<KvView> segs;
    if (prefix_seq_) segs = cache_.segments(layer, *prefix_seq_, 0, prefix_len_);
    const std::vector<KvView> own = cache_.segments(layer, s.seq_id, past, past + n);
    segs.insert(segs.end(), own.begin(), own.end());
    float* lse = lse_.floats(backend_, n * dims_.n_heads);
    // Keys [prefix ; block]: block token i sees the whole prefix and block tokens 0..i. Under a
    // sliding window, positions decide: the prefix (the anchor) sits at 0.., the block at its own
    // positions s0.., so the key positions jump by s0 - prefix_len where the block begins.
    const int64_t s0 = s.positions[0];
    if (dims_.window(layer) > 0 && s0 < prefix_len_) {
      return invalid_argument("block at position {} overlaps its {}-token prefix under a sliding window", s0,
                              prefix_len_);
    }
    const AttentionMask mask = windowed({true, prefix_len_}, dims_.window(layer), s0, prefix_len_, s0 - prefix_len_);
    backend_.partial_attention(
        make_call(dims_, out.slice_rows(start, n), lse, nullptr, q.slice_rows(start, n), segs, mask));
    start += n;
  }
  return Status();
}

// Attamba's anchor: the rows the owner of c1 stores for positions < anchor_len in this layer (its
// boundaries there, appended already), broadcast as one run; a receiver stores them as its anchor
// sequence's rows with their positions, a rank joining without tokens drops them.
Status BlockLocalAttention::exchange_compressed_anchor(int layer, SeqId seq) {
  const AnchorExchange& x = exchange_;
  const ModelHParams& hp = compressed_.hparams();
  const int64_t n = hp.attamba.boundaries(layer, hp.n_layers, 0, x.anchor_len);
  const DType dt = backend_.compute_dtype();
  const Tensor ak = anchor_k_.view(backend_, dt, {n, dims_.n_kv_heads, dims_.head_dim});
  const Tensor av = anchor_v_.view(backend_, dt, {n, dims_.n_kv_heads, dims_.head_dim});
  if (x.role == AnchorExchange::Role::kSend) {
    const std::vector<int32_t>& pos = cache_.stored_positions(layer, seq);
    SS_CHECK(static_cast<int64_t>(pos.size()) >= n && (n == 0 || pos[n - 1] < x.anchor_len),
             "attamba anchor: {} stored rows, {} below position {} expected", pos.size(), n, x.anchor_len);
    int64_t at = 0;
    for (const KvView& kv : cache_.segments(layer, seq, 0, n)) {
      backend_.copy(ak.slice_rows(at, kv.n_tokens()), kv.k);
      backend_.copy(av.slice_rows(at, kv.n_tokens()), kv.v);
      at += kv.n_tokens();
    }
  }
  SS_RETURN_IF_ERROR(broadcast_tensor(backend_, *x.comm, ak, x.root));
  SS_RETURN_IF_ERROR(broadcast_tensor(backend_, *x.comm, av, x.root));
  if (x.role == AnchorExchange::Role::kReceive) {
    cache_.write(layer, x.anchor_seq, 0, ak, av);
    std::vector<int32_t>& pos = cache_.stored_positions(layer, x.anchor_seq);
    pos.clear();
    for (int64_t p = 0; p < x.anchor_len; ++p) {
      if (hp.attamba.boundary(layer, hp.n_layers, p)) pos.push_back(static_cast<int32_t>(p));
    }
  }
  return Status();
}

Status BlockLocalAttention::load_carry(int layer, std::span<const BatchSeq> batch, Tensor carry) {
  compressed_.load(cache_, layer, batch, carry);
  return Status();
}

Status BlockLocalAttention::store_carry(int layer, std::span<const BatchSeq> batch, Tensor carry_out, Tensor carry,
                                        bool* replaced) {
  compressed_.store(cache_, layer, batch, carry_out);
  *replaced = false;
  if (halo_comm_ == nullptr) return Status();
  SS_CHECK(batch.size() == 1, "the Attamba carry halo runs with one sequence per forward, not {}", batch.size());
  const int64_t f = compressed_.carry_floats();
  const Tensor mine = Tensor::make(carry_out.data, DType::kF32, {f});
  if (halo_source_ < 0) return halo_.exchange_f32(backend_, *halo_comm_, mine, -1, Tensor(), f);
  *replaced = true;
  return halo_.exchange_f32(backend_, *halo_comm_, mine, halo_source_, Tensor::make(carry.data, DType::kF32, {f}), f);
}

Status BlockLocalAttention::attend_compressed(int layer, std::span<const BatchSeq> batch,
                                              const CompressedAttention& a) {
  const int64_t cf = compressed_.carry_floats();
  int64_t start = 0;
  for (size_t i = 0; i < batch.size(); ++i) {
    const BatchSeq& s = batch[i];
    const int64_t n = static_cast<int64_t>(s.tokens.size());
    const Tensor k = a.k.slice_rows(start, n), v = a.v.slice_rows(start, n);
    const auto [begin, end] =
        compressed_.append_boundaries(cache_, layer, s.seq_id, k, v, a.boundary.subspan(start, n), s.positions);
    if (exchange_.role != AnchorExchange::Role::kNone) {
      SS_CHECK(batch.size() == 1, "the anchor exchange runs with one sequence per forward, not {}", batch.size());
      SS_RETURN_IF_ERROR(exchange_compressed_anchor(layer, s.seq_id));
    }
    // Keys in position order: the prefix's boundaries below prefix_len, then this block's own.
    std::vector<KvView> keys;
    std::vector<int32_t> key_pos;
    if (prefix_seq_) {
      const std::vector<int32_t>& pp = cache_.stored_positions(layer, *prefix_seq_);
      const int64_t np = std::lower_bound(pp.begin(), pp.end(), static_cast<int32_t>(prefix_len_)) - pp.begin();
      keys = cache_.segments(layer, *prefix_seq_, 0, np);
      key_pos.assign(pp.begin(), pp.begin() + np);
    }
    const std::vector<int32_t>& own_pos = cache_.stored_positions(layer, s.seq_id);
    const std::vector<KvView> own = cache_.segments(layer, s.seq_id, begin, end);
    keys.insert(keys.end(), own.begin(), own.end());
    key_pos.insert(key_pos.end(), own_pos.begin() + begin, own_pos.begin() + end);
    compressed_.attend_local(a.q.slice_rows(start, n), k, v,
                             Tensor::make(a.carry.f32() + static_cast<int64_t>(i) * cf, DType::kF32, {cf}),
                             s.positions, keys, key_pos, a.out.slice_rows(start, n));
    start += n;
  }
  return Status();
}

void BlockLocalAttention::end_forward(std::span<const BatchSeq> batch) {
  for (const BatchSeq& s : batch) {
    cache_.set_length(s.seq_id, cache_.length(s.seq_id) + static_cast<int64_t>(s.tokens.size()));
  }
}

// ---------------------------------------------------------------- ExactContextAttention

ExactContextAttention::ExactContextAttention(Backend& backend, KvCache& cache, const ModelHParams& hp,
                                             Communicator& comm)
    : backend_(backend),
      cache_(cache),
      dims_(AttentionDims::from(hp)),
      comm_(comm),
      kv_shift_(hp.kv_shift),
      compressed_(backend, hp) {}

// Words per rank: kMaxRuns (begin, size) pairs in position order; size 0 ends the list.
Status ExactContextAttention::gather_runs(std::span<const int32_t> positions) {
  constexpr int kWords = 2 * kMaxRuns;
  int64_t mine[kWords] = {};
  int n_runs = 0;
  for (size_t i = 0; i < positions.size(); ++i) {
    if (i == 0 || positions[i] != positions[i - 1] + 1) {
      SS_CHECK(n_runs < kMaxRuns, "exact context encoding: a rank's tokens in more than {} runs of positions",
               kMaxRuns);
      SS_CHECK(n_runs == 0 || positions[i] > mine[2 * (n_runs - 1)] + mine[2 * (n_runs - 1) + 1],
               "exact context encoding: runs out of position order at token {} (position {})", i, positions[i]);
      mine[2 * n_runs] = positions[i];
      ++n_runs;
    }
    ++mine[2 * (n_runs - 1) + 1];
  }
  const int world = comm_.world_size();
  std::vector<int64_t> all(static_cast<size_t>(world) * kWords);
  SS_RETURN_IF_ERROR(comm_.all_gather(mine, all.data(), sizeof(mine)));
  counts_.assign(world, 0);
  runs_.assign(world, {});
  for (int r = 0; r < world; ++r) {
    for (int j = 0; j < kMaxRuns; ++j) {
      const int64_t begin = all[r * kWords + 2 * j], size = all[r * kWords + 2 * j + 1];
      if (size == 0) break;
      runs_[r].push_back({begin, size, counts_[r]});
      counts_[r] += size;
    }
  }
  max_count_ = *std::max_element(counts_.begin(), counts_.end());
  return Status();
}

bool ExactContextAttention::one_run_per_rank() const {
  return std::all_of(runs_.begin(), runs_.end(), [](const std::vector<Run>& r) { return r.size() <= 1; });
}

KvView ExactContextAttention::gathered(int r, int64_t row, int64_t n) {
  const DType dt = backend_.compute_dtype();
  const int64_t kv_row = static_cast<int64_t>(dims_.n_kv_heads) * dims_.head_dim;
  const size_t off = static_cast<size_t>((r * max_count_ + row) * kv_row) * dtype_size(dt);
  return {Tensor::make(static_cast<char*>(k_all_.ensure(backend_, 0)) + off, dt, {n, dims_.n_kv_heads, dims_.head_dim}),
          Tensor::make(static_cast<char*>(v_all_.ensure(backend_, 0)) + off, dt, {n, dims_.n_kv_heads, dims_.head_dim})};
}

// All-gathers rows (n, n_kv_heads, head_dim) of every rank, padded to the longest span, into all:
// rank r's rows at r * max_count_. Device collectives when the communicator has them, else host.
Status ExactContextAttention::gather_rows(Tensor rows, int64_t n, Scratch& all) {
  const DType dt = backend_.compute_dtype();
  const int64_t kv_row = static_cast<int64_t>(dims_.n_kv_heads) * dims_.head_dim;
  const size_t per_rank = static_cast<size_t>(max_count_ * kv_row) * dtype_size(dt);
  const int world = comm_.world_size();
  void* recv = all.ensure(backend_, std::max<size_t>(per_rank * world, 1));
  const size_t mine = static_cast<size_t>(n * kv_row) * dtype_size(dt);
  if (backend_.kind() != DeviceKind::kCpu && comm_.has_device_collectives()) {
    void* send = send_.ensure(backend_, std::max<size_t>(per_rank, 1));
    if (n > 0) backend_.copy(Tensor::make(send, dt, {n * kv_row}), Tensor::make(rows.data, dt, {n * kv_row}));
    return comm_.all_gather_device(send, recv, per_rank, backend_.stream());
  }
  send_host_.assign(per_rank, 0);
  recv_host_.resize(per_rank * world);
  if (n > 0) backend_.download_bytes(send_host_.data(), rows.data, mine);
  SS_RETURN_IF_ERROR(comm_.all_gather(send_host_.data(), recv_host_.data(), per_rank));
  backend_.upload_bytes(recv, recv_host_.data(), per_rank * world);
  return Status();
}

Status ExactContextAttention::layer_exchange(Tensor k, Tensor v, int64_t n) {
  SS_RETURN_IF_ERROR(gather_rows(k, n, k_all_));
  return gather_rows(v, n, v_all_);
}

void ExactContextAttention::load_exchange(SeqId seq) {
  const Exchange& e = exchanges_.at(seq);
  counts_ = e.counts;
  max_count_ = e.max_count;
  runs_ = e.runs;
}

Status ExactContextAttention::participate_without_tokens(SeqId seq, int first, int last, int n_layers) {
  if (first == 0) {
    SS_RETURN_IF_ERROR(gather_runs({}));
    exchanges_[seq] = {counts_, max_count_, runs_};
  }
  load_exchange(seq);
  const int64_t row = 2 * static_cast<int64_t>(dims_.n_kv_heads) * dims_.head_dim;
  for (int l = first; l < last; ++l) {
    if (kv_shift_) SS_RETURN_IF_ERROR(halo_.exchange(backend_, comm_, Tensor{}, -1, Tensor{}, row));
    if (compressed_.enabled()) {
      SS_RETURN_IF_ERROR(halo_.exchange_f32(backend_, comm_, Tensor{}, -1, Tensor{}, compressed_.carry_floats()));
    }
    SS_RETURN_IF_ERROR(layer_exchange(Tensor{}, Tensor{}, 0));
  }
  if (last == n_layers) exchanges_.erase(seq);
  return Status();
}

Status ExactContextAttention::begin_forward(std::span<const BatchSeq> batch) {
  SS_CHECK(batch.size() == 1, "exact context encoding runs one span per forward, got {}", batch.size());
  const int64_t n = static_cast<int64_t>(batch[0].tokens.size());
  SS_RETURN_IF_ERROR(cache_.reserve(batch[0].seq_id, cache_.length(batch[0].seq_id) + n));
  SS_RETURN_IF_ERROR(gather_runs(batch[0].positions));
  exchanges_[batch[0].seq_id] = {counts_, max_count_, runs_};
  return Status();
}

Status ExactContextAttention::attend(int layer, std::span<const BatchSeq> batch, Tensor q, Tensor k, Tensor v,
                                     Tensor out) {
  const BatchSeq& s = batch[0];
  load_exchange(s.seq_id);
  const int64_t n = static_cast<int64_t>(s.tokens.size());
  const int64_t nh = dims_.n_heads, hd = dims_.head_dim;
  const int64_t past = cache_.length(s.seq_id);
  SS_CHECK(past == 0, "exact context encoding expects an empty sequence, it has {} tokens", past);
  cache_.write(layer, s.seq_id, 0, k, v);
  SS_RETURN_IF_ERROR(layer_exchange(k, v, n));

  // Partials: for each of this rank's query runs, one per rank holding keys at or before the run's
  // first position. Runs never interleave, so those keys are a prefix of the rank's runs, which
  // are its first rows: rank r's rows [0, end of its last such run). They are all visible, except
  // the query run's own (the last of this rank's prefix), which is causal: rows before it come
  // first, so query row i sees keys j <= i + (its first row). Under a sliding window each key sits
  // at its position: the prefix's runs begin at runs[0].begin and jump once (zigzag's second chunk).
  const int me = comm_.rank();
  const int64_t window = dims_.window(layer);
  struct Spec {
    size_t query_run;
    int rank;
    size_t n_runs;
  };
  std::vector<Spec> specs;
  std::vector<int64_t> part_rows;  // first partial row of each spec
  int64_t total_rows = 0;
  for (size_t a = 0; a < runs_[me].size(); ++a) {
    const Run& qr = runs_[me][a];
    for (int r = 0; r < comm_.world_size(); ++r) {
      size_t m = 0;
      while (m < runs_[r].size() && runs_[r][m].begin <= qr.begin) ++m;
      if (m == 0) continue;
      const Run& last = runs_[r][m - 1];
      // Past the window of the run's first query row (and so of every later row): no key visible.
      if (window > 0 && last.begin + last.size - 1 <= qr.begin - window) continue;
      specs.push_back({a, r, m});
      part_rows.push_back(total_rows);
      total_rows += qr.size * nh;
    }
  }
  float* p_out = part_out_.floats(backend_, std::max<int64_t>(total_rows * hd, 1));
  float* p_lse = part_lse_.floats(backend_, std::max<int64_t>(total_rows, 1));
  float* p_ent = part_ent_.floats(backend_, std::max<int64_t>(total_rows, 1));
  call_kv_.clear();
  for (const Spec& sp : specs) {
    const Run& last = runs_[sp.rank][sp.n_runs - 1];
    call_kv_.push_back(gathered(sp.rank, 0, last.row + last.size));
  }
  calls_.clear();
  for (size_t i = 0; i < specs.size(); ++i) {
    const Spec& sp = specs[i];
    const Run& qr = runs_[me][sp.query_run];
    const std::vector<Run>& kr = runs_[sp.rank];
    const Run& last = kr[sp.n_runs - 1];
    const bool own = sp.rank == me && last.begin == qr.begin;
    const int64_t gap_from = sp.n_runs > 1 ? kr[0].size : 0;
    const int64_t gap = sp.n_runs > 1 ? kr[1].begin - (kr[0].begin + kr[0].size) : 0;
    const AttentionMask mask =
        windowed({own, own ? last.row : 0}, window, qr.begin - kr[0].begin, gap_from, gap);
    const Tensor po = Tensor::make(p_out + part_rows[i] * hd, DType::kF32, {qr.size, dims_.n_heads, dims_.head_dim});
    calls_.push_back(make_call(dims_, po, p_lse + part_rows[i], p_ent + part_rows[i], q.slice_rows(qr.row, qr.size),
                               {&call_kv_[i], 1}, mask));
  }
  backend_.partial_attentions(calls_);
  const Tensor o32 = fp32_target(backend_, out, out32_);
  float* lse = lse_.floats(backend_, n * nh);
  float* ent = ent_.floats(backend_, n * nh);
  std::vector<AttentionPartial> parts;
  for (size_t i = 0; i < specs.size();) {
    const Run& qr = runs_[me][specs[i].query_run];
    parts.clear();
    for (; i < specs.size() && runs_[me][specs[i].query_run].begin == qr.begin; ++i) {
      parts.push_back({p_out + part_rows[i] * hd, p_lse + part_rows[i], p_ent + part_rows[i]});
    }
    backend_.merge_partials(o32.f32() + qr.row * nh * hd, lse + qr.row * nh, ent + qr.row * nh, parts,
                            qr.size * nh, dims_.head_dim);
  }
  if (o32.data != out.data) backend_.convert(out, o32);
  return Status();
}

Status ExactContextAttention::shift_neighbours(int layer, std::span<const BatchSeq> batch, Tensor last,
                                               Tensor prev) {
  SS_CHECK(batch.size() == 1, "exact context encoding runs one span per forward, got {}", batch.size());
  load_exchange(batch[0].seq_id);
  SS_CHECK(one_run_per_rank(), "the KV-shifting halo needs one run of positions per rank (contiguous layout)");
  shift_rows_from_cache(backend_, cache_, layer, batch, last, prev);
  int source = -1;
  for (int r = comm_.rank() - 1; r >= 0 && source < 0; --r) source = counts_[r] > 0 ? r : -1;
  const int64_t row = 2 * static_cast<int64_t>(dims_.n_kv_heads) * dims_.head_dim;
  return halo_.exchange(backend_, comm_, last.slice_rows(0, 1), source, prev.slice_rows(0, 1), row);
}

Status ExactContextAttention::load_carry(int layer, std::span<const BatchSeq> batch, Tensor carry) {
  SS_CHECK(batch.size() == 1, "exact context encoding runs one span per forward, got {}", batch.size());
  compressed_.load(cache_, layer, batch, carry);
  return Status();
}

// The span's carry continues the nearest earlier rank's that has context (its last token's).
Status ExactContextAttention::store_carry(int layer, std::span<const BatchSeq> batch, Tensor carry_out, Tensor carry,
                                          bool* replaced) {
  SS_CHECK(batch.size() == 1, "exact context encoding runs one span per forward, got {}", batch.size());
  load_exchange(batch[0].seq_id);
  SS_CHECK(one_run_per_rank(), "the Attamba carry halo needs one run of positions per rank (contiguous layout)");
  compressed_.store(cache_, layer, batch, carry_out);
  int source = -1;
  for (int r = comm_.rank() - 1; r >= 0 && source < 0; --r) source = counts_[r] > 0 ? r : -1;
  const int64_t f = compressed_.carry_floats();
  *replaced = source >= 0;
  return halo_.exchange_f32(backend_, comm_, carry_out, source, Tensor::make(carry.data, DType::kF32, {f}), f);
}

Status ExactContextAttention::attend_compressed(int layer, std::span<const BatchSeq> batch,
                                                const CompressedAttention& a) {
  const BatchSeq& s = batch[0];
  load_exchange(s.seq_id);
  SS_CHECK(one_run_per_rank(), "Attamba's exact mode needs one run of positions per rank (contiguous layout)");
  const ModelHParams& hp = compressed_.hparams();
  const int64_t n = static_cast<int64_t>(s.tokens.size());
  SS_CHECK(cache_.length(s.seq_id) == 0, "exact context encoding expects an empty sequence, it has {} tokens",
           cache_.length(s.seq_id));
  const auto [begin, end] = compressed_.append_boundaries(cache_, layer, s.seq_id, a.k, a.v, a.boundary, s.positions);
  // This span's boundary rows as one run, all-gathered with every rank's (padded to the longest span).
  const DType dt = backend_.compute_dtype();
  const int64_t nb = end - begin;
  const Tensor ok = own_k_.view(backend_, dt, {std::max<int64_t>(nb, 1), dims_.n_kv_heads, dims_.head_dim});
  const Tensor ov = own_v_.view(backend_, dt, {std::max<int64_t>(nb, 1), dims_.n_kv_heads, dims_.head_dim});
  int64_t at = 0;
  for (const KvView& kv : cache_.segments(layer, s.seq_id, begin, end)) {
    backend_.copy(ok.slice_rows(at, kv.n_tokens()), kv.k);
    backend_.copy(ov.slice_rows(at, kv.n_tokens()), kv.v);
    at += kv.n_tokens();
  }
  SS_RETURN_IF_ERROR(layer_exchange(ok, ov, nb));
  // Keys in position order: every earlier rank's boundaries (spans are contiguous in rank order),
  // then the own span's.
  const int64_t kv_row = static_cast<int64_t>(dims_.n_kv_heads) * dims_.head_dim;
  std::vector<KvView> keys;
  std::vector<int32_t> key_pos;
  int64_t first = 0;
  for (int r = 0; r < comm_.rank(); ++r) {
    const int64_t cnt = hp.attamba.boundaries(layer, hp.n_layers, first, first + counts_[r]);
    for (int64_t p = first; p < first + counts_[r]; ++p) {
      if (hp.attamba.boundary(layer, hp.n_layers, p)) key_pos.push_back(static_cast<int32_t>(p));
    }
    if (cnt > 0) {
      const size_t off = static_cast<size_t>(r * max_count_ * kv_row) * dtype_size(dt);
      keys.push_back({Tensor::make(static_cast<char*>(k_all_.ensure(backend_, 0)) + off, dt,
                                   {cnt, dims_.n_kv_heads, dims_.head_dim}),
                      Tensor::make(static_cast<char*>(v_all_.ensure(backend_, 0)) + off, dt,
                                   {cnt, dims_.n_kv_heads, dims_.head_dim})});
    }
    first += counts_[r];
  }
  const std::vector<int32_t>& own_pos = cache_.stored_positions(layer, s.seq_id);
  const std::vector<KvView> own = cache_.segments(layer, s.seq_id, begin, end);
  keys.insert(keys.end(), own.begin(), own.end());
  key_pos.insert(key_pos.end(), own_pos.begin() + begin, own_pos.begin() + end);
  compressed_.attend_local(a.q, a.k, a.v, Tensor::make(a.carry.data, DType::kF32, {compressed_.carry_floats()}),
                           s.positions, keys, key_pos, a.out);
  (void)n;
  return Status();
}

void ExactContextAttention::end_forward(std::span<const BatchSeq> batch) {
  for (const BatchSeq& s : batch) {
    cache_.set_length(s.seq_id, static_cast<int64_t>(s.tokens.size()));
    exchanges_.erase(s.seq_id);
  }
}

// ---------------------------------------------------------------- Phase2Attention

Phase2Attention::Phase2Attention(Backend& backend, KvCache& cache, const ModelHParams& hp, Communicator& comm,
                                 MergeAlgo algo)
    : backend_(backend),
      cache_(cache),
      dims_(AttentionDims::from(hp)),
      n_layers_(hp.n_layers),
      merger_(comm, algo),
      collector_(backend),
      compressed_(backend, hp) {}

void Phase2Attention::register_sequence(SeqId seq, bool query_host, int64_t n_context_total,
                                        int64_t first_context_position) {
  SeqInfo info;
  info.query_host = query_host;
  info.n_context_total = n_context_total;
  info.first_context_position = first_context_position;
  info.n_local_context = cache_.length(seq);
  if (auto it = entropy_before_registration_.find(seq); it != entropy_before_registration_.end()) {
    info.entropy = it->second;
    entropy_before_registration_.erase(it);
  }
  seqs_[seq] = info;
}

void Phase2Attention::register_sequence(SeqId seq, const StarLayout& layout, int rank) {
  const std::vector<TokenRun> runs = layout.runs_of(rank);
  SS_CHECK(runs.size() <= 2, "rank {} holds {} runs of context positions; phase 2 places at most two", rank,
           runs.size());
  register_sequence(seq, rank == layout.query_host, layout.n_context, runs.empty() ? 0 : runs[0].begin);
  if (runs.size() == 2) {
    SeqInfo& info = seqs_.at(seq);
    info.gap_from = runs[0].size();
    info.gap = runs[1].begin - runs[0].end;
  }
}

void Phase2Attention::clone_sequence(SeqId src, SeqId dst) {
  SeqInfo info = seqs_.at(src);
  info.entropy = nullptr;
  seqs_[dst] = info;
}

void Phase2Attention::forget_sequence(SeqId seq) {
  seqs_.erase(seq);
  entropy_before_registration_.erase(seq);
}

void Phase2Attention::track_entropy(SeqId seq, EntropyStats* stats) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) {
    entropy_before_registration_[seq] = stats;
  } else {
    it->second.entropy = stats;
  }
}

Status Phase2Attention::begin_forward(std::span<const BatchSeq> batch) {
  int64_t tracked_rows = 0;
  for (const BatchSeq& s : batch) {
    auto it = seqs_.find(s.seq_id);
    SS_CHECK(it != seqs_.end(), "sequence {} was not registered for phase 2", s.seq_id);
    if (it->second.query_host) {
      SS_RETURN_IF_ERROR(cache_.reserve(s.seq_id, cache_.length(s.seq_id) + static_cast<int64_t>(s.tokens.size())));
    }
    if (it->second.entropy && it->second.entropy->enabled()) tracked_rows += static_cast<int64_t>(s.tokens.size());
    // A context-only rank places its keys by their first position (register_sequence).
    if (!dims_.layer_window.empty() && !it->second.query_host && it->second.first_context_position < 0 &&
        it->second.n_local_context > 0) {
      return invalid_argument("sequence {}: a sliding-window model needs the position of this rank's first "
                                 "context token (Phase2Attention::register_sequence)",
                                 s.seq_id);
    }
  }
  collector_.begin(tracked_rows * n_layers_, dims_.n_heads);
  return Status();
}

Status Phase2Attention::attend(int layer, std::span<const BatchSeq> batch, Tensor q, Tensor k, Tensor v,
                               Tensor out) {
  const int64_t nh = dims_.n_heads;
  int64_t total = 0;
  for (const BatchSeq& s : batch) total += static_cast<int64_t>(s.tokens.size());
  float* lse_all = lse_.floats(backend_, total * nh);
  float* ent_all = ent_.floats(backend_, total * nh);
  const Tensor o32 = fp32_target(backend_, out, out32_);
  // Every sequence's keys, then all of their partial attentions in one backend call (the CUDA
  // backend runs a decode step's sequences in one launch).
  segs_.resize(batch.size());
  calls_.clear();
  writes_.clear();
  int64_t start = 0;
  for (size_t i = 0; i < batch.size(); ++i) {
    const BatchSeq& s = batch[i];
    const SeqInfo& info = seqs_.at(s.seq_id);
    const int64_t n = static_cast<int64_t>(s.tokens.size());
    AttentionMask mask{false, 0};
    if (info.query_host) {
      const int64_t past = cache_.length(s.seq_id);
      writes_.push_back({s.seq_id, past, n, start});
      cache_.segments_into(layer, s.seq_id, 0, past + n, &segs_[i]);
      // Keys [local context ; earlier query/generated ; new]: new token i sees all context, every
      // earlier query/generated token, and new tokens 0..i. The query host holds the last context
      // token, so its keys' positions run on from its last run without a gap; zigzag's first chunk
      // lies gap positions before the rest.
      mask = windowed({true, past}, dims_.window(layer), past + info.gap, info.gap_from, info.gap);
    } else {
      // Context only: every key visible to every query row (no causal alignment at all), except
      // keys behind a sliding window: query row i is at n_context_total + n_generated + i.
      cache_.segments_into(layer, s.seq_id, 0, info.n_local_context, &segs_[i]);
      mask = windowed(mask, dims_.window(layer),
                      info.n_context_total + info.n_generated - std::max<int64_t>(info.first_context_position, 0),
                      info.gap_from, info.gap);
    }
    // An empty key list gives O = 0, LSE = -inf, H = 0: this rank contributes nothing to the merge.
    calls_.push_back(make_call(dims_, o32.slice_rows(start, n), lse_all + start * nh, ent_all + start * nh,
                               q.slice_rows(start, n), segs_[i], mask));
    start += n;
  }
  // Every query host's new rows in one write, before the attention that reads them.
  cache_.write_batch(layer, writes_, k, v);
  backend_.partial_attentions(calls_);
  // One collective for the whole batch: rows are (token, head) pairs.
  const auto t0 = std::chrono::steady_clock::now();
  SS_RETURN_IF_ERROR(merger_.merge_on(backend_, o32.f32(), lse_all, ent_all, total * nh, dims_.head_dim));
  merge_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ++merges_;
  if (o32.data != out.data) backend_.convert(out, o32);
  bool tracked = false;
  for (const BatchSeq& s : batch) {
    const SeqInfo& info = seqs_.at(s.seq_id);
    tracked = tracked || (info.entropy && info.entropy->enabled());
  }
  if (!tracked) return Status();
  start = 0;
  for (const BatchSeq& s : batch) {
    const SeqInfo& info = seqs_.at(s.seq_id);
    const int64_t n = static_cast<int64_t>(s.tokens.size());
    if (info.entropy && info.entropy->enabled()) {
      std::vector<int64_t> visible(n);
      for (int64_t i = 0; i < n; ++i) {
        visible[i] = info.n_context_total + info.n_generated + i + 1;
        if (dims_.window(layer) > 0) visible[i] = std::min(visible[i], dims_.window(layer));
      }
      collector_.add(info.entropy, layer, ent_all + start * nh, n, std::move(visible));
      if (merger_.world_size() > 1) {
        rank_entropy_.resize(static_cast<size_t>(n * nh));
        merger_.rank_entropy(backend_, start * nh, n * nh, rank_entropy_.data());
        info.entropy->add_rank_entropy(layer, rank_entropy_.data(), n, merger_.world_size());
      }
    }
    start += n;
  }
  return Status();
}

Status Phase2Attention::shift_neighbours(int layer, std::span<const BatchSeq> batch, Tensor last, Tensor prev) {
  for (size_t i = 0; i < batch.size(); ++i) {
    const int64_t r = static_cast<int64_t>(i);
    if (seqs_.at(batch[i].seq_id).query_host) {
      shift_rows_from_cache(backend_, cache_, layer, batch.subspan(i, 1), last.slice_rows(r, 1), prev.slice_rows(r, 1));
      continue;
    }
    const Tensor row = prev.slice_rows(r, 1);
    if (zero_rows_.bytes() < row.bytes()) {
      zero_rows_ = backend_.alloc(row.bytes());
      const std::vector<float> zeros(static_cast<size_t>(row.numel()), 0.0f);
      backend_.upload_f32(zero_rows_.view(row.dtype, {row.numel()}), zeros.data());
    }
    backend_.copy(row, zero_rows_.view(row.dtype, {1, row.shape[1], row.shape[2], row.shape[3]}));
  }
  return Status();
}

Status Phase2Attention::load_carry(int layer, std::span<const BatchSeq> batch, Tensor carry) {
  const int64_t f = compressed_.carry_floats();
  for (size_t i = 0; i < batch.size(); ++i) {
    const Tensor row = Tensor::make(carry.f32() + static_cast<int64_t>(i) * f, DType::kF32, {f});
    if (seqs_.at(batch[i].seq_id).query_host) {
      backend_.copy(row, cache_.carry(layer, batch[i].seq_id, f));
    } else {
      // A context-only rank's k/v of the query are neither stored nor attended to.
      const std::vector<float> zeros(static_cast<size_t>(f), 0.0f);
      backend_.upload_f32(row, zeros.data());
    }
  }
  return Status();
}

Status Phase2Attention::store_carry(int layer, std::span<const BatchSeq> batch, Tensor carry_out, Tensor carry,
                                    bool* replaced) {
  (void)carry;
  const int64_t f = compressed_.carry_floats();
  for (size_t i = 0; i < batch.size(); ++i) {
    if (!seqs_.at(batch[i].seq_id).query_host) continue;
    backend_.copy(cache_.carry(layer, batch[i].seq_id, f),
                  Tensor::make(carry_out.f32() + static_cast<int64_t>(i) * f, DType::kF32, {f}));
  }
  *replaced = false;
  return Status();
}

Status Phase2Attention::attend_compressed(int layer, std::span<const BatchSeq> batch, const CompressedAttention& a) {
  const int64_t nh = dims_.n_heads, hd = dims_.head_dim, cf = compressed_.carry_floats();
  int64_t total = 0;
  for (const BatchSeq& s : batch) total += static_cast<int64_t>(s.tokens.size());
  float* lse_all = lse_.floats(backend_, std::max<int64_t>(total * nh, 1));
  float* ent_all = ent_.floats(backend_, std::max<int64_t>(total * nh, 1));
  const Tensor o32 = fp32_target(backend_, a.out, out32_);
  int64_t start = 0;
  for (size_t i = 0; i < batch.size(); ++i) {
    const BatchSeq& s = batch[i];
    const SeqInfo& info = seqs_.at(s.seq_id);
    const int64_t n = static_cast<int64_t>(s.tokens.size());
    const Tensor q = a.q.slice_rows(start, n);
    const PartialBuffers mine{o32.f32() + start * nh * hd, lse_all + start * nh, ent_all + start * nh};
    if (info.query_host) {
      const Tensor k = a.k.slice_rows(start, n), v = a.v.slice_rows(start, n);
      compressed_.append_boundaries(cache_, layer, s.seq_id, k, v, a.boundary.subspan(start, n), s.positions);
      const std::vector<int32_t>& pos = cache_.stored_positions(layer, s.seq_id);
      const std::vector<KvView> keys = cache_.segments(layer, s.seq_id, 0, static_cast<int64_t>(pos.size()));
      const PartialBuffers band = compressed_.buffers(0, n);
      const PartialBuffers comp = compressed_.buffers(1, n);
      compressed_.band(q, k, v, Tensor::make(a.carry.f32() + static_cast<int64_t>(i) * cf, DType::kF32, {cf}), band);
      compressed_.compressed(q, s.positions, keys, pos, comp);
      const AttentionPartial parts[2] = {band.part(), comp.part()};
      compressed_.merge(o32.slice_rows(start, n), mine.lse, mine.entropy, parts);
    } else {
      const std::vector<int32_t>& pos = cache_.stored_positions(layer, s.seq_id);
      const std::vector<KvView> keys = cache_.segments(layer, s.seq_id, 0, static_cast<int64_t>(pos.size()));
      compressed_.compressed(q, s.positions, keys, pos, mine);
    }
    start += n;
  }
  const auto t0 = std::chrono::steady_clock::now();
  SS_RETURN_IF_ERROR(merger_.merge_on(backend_, o32.f32(), lse_all, ent_all, total * nh, hd));
  merge_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ++merges_;
  if (o32.data != a.out.data) backend_.convert(a.out, o32);
  return Status();
}

void Phase2Attention::end_forward(std::span<const BatchSeq> batch) {
  collector_.flush();
  for (const BatchSeq& s : batch) {
    SeqInfo& info = seqs_.at(s.seq_id);
    const int64_t n = static_cast<int64_t>(s.tokens.size());
    info.n_generated += n;
    if (info.query_host) cache_.set_length(s.seq_id, cache_.length(s.seq_id) + n);
  }
}

}  // namespace starserve
