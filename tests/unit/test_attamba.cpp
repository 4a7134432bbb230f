// Attamba (arch attamba, docs/specs/attamba.md) on the CPU backend, against the dense reference of
// attamba_tiny.h (the spec's layer written out, dense masked attention, no carry, no cache):
// global logits, prefill = decode, prefill chunks that split a chunk, forward_layers, batched
// decode, what the cache stores, Star Attention and exact mode on one process, the loader (HF
// layout, missing and mis-shaped tensors, the GGUF refusal) and the layout refusals.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "attamba_tiny.h"
#include "backend/backend.h"
#include "comm/communicator.h"
#include "engine/scheduler.h"
#include "family_golden.h"
#include "model/gguf_source.h"
#include "model/hf_source.h"
#include "star/context_encoder.h"
#include "star/local_attention.h"

namespace starserve {
namespace {

using nlohmann::json;
using namespace attamba_tiny;
using family_golden::iota_from;
using family_golden::logit_tolerance;
using family_golden::max_abs_diff;
using family_golden::random_tokens;

struct Tiny {
  std::unique_ptr<Backend> backend = make_cpu_backend(1);
  std::unique_ptr<TinySource> source;
  std::unique_ptr<Model> model;
  explicit Tiny(const ModelHParams& hp = tiny_hparams()) : source(std::make_unique<TinySource>(hp)) {
    auto m = create_model(*source, *backend);
    SS_CHECK(m.ok(), "{}", m.status().to_string());
    model = std::move(m).value();
  }
};

KvCache make_cache(Model& m, int page_size = 4, int64_t pages = 512) {
  const ModelHParams& hp = m.hparams();
  KvCacheShape shape{hp.n_layers, hp.n_kv_heads, hp.head_dim, page_size, pages};
  shape.compressed_chunk = hp.attamba.chunk;
  return KvCache(m.backend(), shape);
}

std::vector<float> rows(const std::vector<float>& all, int64_t first, int64_t n, int nv) {
  return std::vector<float>(all.begin() + first * nv, all.begin() + (first + n) * nv);
}

// Every token's logits, the prompt fed to one sequence in pieces of the given sizes.
std::vector<float> local_in_pieces(Model& m, KvCache& cache, SeqId seq, const std::vector<int32_t>& ids,
                                   const std::vector<int>& pieces) {
  LocalAttention attn(m.backend(), cache, m.hparams());
  std::vector<float> out;
  int64_t at = 0;
  for (size_t k = 0; at < static_cast<int64_t>(ids.size()); ++k) {
    const int64_t n = std::min<int64_t>(k < pieces.size() ? pieces[k] : 1, static_cast<int64_t>(ids.size()) - at);
    std::vector<int32_t> toks(ids.begin() + at, ids.begin() + at + n);
    const auto pos = iota_from(n, at);
    BatchSeq bs{seq, toks, pos, true};
    std::vector<float> lg;
    EXPECT_TRUE(m.forward({&bs, 1}, attn, &lg).ok());
    out.insert(out.end(), lg.begin(), lg.end());
    at += n;
  }
  return out;
}

TEST(Attamba, BoundaryCountsAndOffsets) {
  for (int P : {1, 2, 3, 4, 7, 8}) {
    for (int n_layers : {1, 3, 8}) {
      for (bool cyclic : {true, false}) {
        AttambaHParams a;
        a.chunk = P;
        a.cyclic_offsets = cyclic;
        for (int l = 0; l < n_layers; ++l) {
          const int off = a.offset(l, n_layers);
          EXPECT_EQ(off, cyclic ? std::min(P - 1, l * (P / n_layers)) : 0);
          for (int64_t b = 0; b < 20; ++b) {
            for (int64_t e = b; e < 40; ++e) {
              int64_t want = 0;
              for (int64_t p = b; p < e; ++p) want += (p == 0 || (p + off) % P == P - 1) ? 1 : 0;
              ASSERT_EQ(a.boundaries(l, n_layers, b, e), want) << "P " << P << " l " << l << " [" << b << ", " << e << ")";
            }
          }
          // Any n consecutive tokens hold at most KvCacheShape::rows_for(n) boundaries.
          KvCacheShape s;
          s.compressed_chunk = P;
          for (int64_t b = 0; b < 12; ++b) {
            for (int64_t n = 1; n < 30; ++n) EXPECT_LE(a.boundaries(l, n_layers, b, b + n), s.rows_for(n));
          }
        }
      }
    }
  }
}

TEST(Attamba, GlobalMatchesDenseReference) {
  for (const ModelHParams& hp : {tiny_hparams(), tiny_hparams(4, 5, false), tiny_hparams(3, 0), tiny_hparams(8, 2)}) {
    Tiny t(hp);
    const auto ids = random_tokens(41, 11, hp.n_vocab);
    const std::vector<float> want = dense_global(*t.source, ids);
    KvCache cache = make_cache(*t.model);
    const std::vector<float> got = local_in_pieces(*t.model, cache, 1, ids, {41});
    EXPECT_LE(max_abs_diff(got, want), logit_tolerance(want))
        << "P " << hp.attamba.chunk << " L " << hp.attamba.leading << " cyclic " << hp.attamba.cyclic_offsets;
    // The mask matters: plain causal attention over every key (no compression) gives other logits.
    const std::vector<float> full = dense_logits(*t.source, ids, [](int, int64_t t, int64_t j) { return j <= t; });
    EXPECT_GT(max_abs_diff(full, want), 100 * logit_tolerance(want));
  }
}

// A prefill longer than the compressed partial's row blocks (64 P rows): the prefix every row of a
// block sees, the keys its later rows add under per-row key limits, and their merge, against the
// dense reference; then the same prompt in pieces that start inside a block.
TEST(Attamba, LongPrefillOverSeveralRowBlocks) {
  for (const ModelHParams& hp : {tiny_hparams(4, 5), tiny_hparams(3, 0), tiny_hparams(8, 2, false)}) {
    Tiny t(hp);
    const int64_t n = 160 * hp.attamba.chunk + 7;  // 2.5 blocks and a few rows
    const auto ids = random_tokens(n, 19, hp.n_vocab);
    const std::vector<float> want = dense_global(*t.source, ids);
    KvCache cache = make_cache(*t.model, 16, 256);
    const std::vector<float> got = local_in_pieces(*t.model, cache, 1, ids, {static_cast<int>(n)});
    EXPECT_LE(max_abs_diff(got, want), logit_tolerance(want)) << "P " << hp.attamba.chunk;
    KvCache cache2 = make_cache(*t.model, 16, 256);
    const std::vector<float> pieces = local_in_pieces(*t.model, cache2, 2, ids, {100, 301, static_cast<int>(n)});
    EXPECT_LE(max_abs_diff(pieces, want), logit_tolerance(want)) << "P " << hp.attamba.chunk << " in pieces";
  }
}

TEST(Attamba, PrefillEqualsDecodeAndChunkedPrefill) {
  Tiny t;
  const int nv = t.model->hparams().n_vocab;
  const auto ids = random_tokens(37, 5, nv);
  const std::vector<float> want = dense_global(*t.source, ids);
  const float tol = logit_tolerance(want);
  // Pieces that start and end inside chunks of every layer (P = 4, offsets 0, 1, 2), shorter and
  // longer than the band (L = 5), and single tokens (decode).
  for (const std::vector<int>& pieces : std::vector<std::vector<int>>{{37}, {1}, {5, 3, 11, 2, 7, 9}, {6, 6, 6}, {13, 1, 1, 22}}) {
    KvCache cache = make_cache(*t.model);
    const std::vector<float> got = local_in_pieces(*t.model, cache, 3, ids, pieces);
    EXPECT_LE(max_abs_diff(got, want), tol) << "first piece " << pieces[0];
  }
}

TEST(Attamba, CacheStoresOnlyTheBoundaries) {
  Tiny t;
  const ModelHParams& hp = t.model->hparams();
  const auto ids = random_tokens(30, 9, hp.n_vocab);
  KvCache cache = make_cache(*t.model, 4, 64);
  local_in_pieces(*t.model, cache, 5, ids, {17, 13});
  for (int l = 0; l < hp.n_layers; ++l) {
    std::vector<int32_t> want;
    for (int32_t p = 0; p < 30; ++p) {
      if (hp.attamba.boundary(l, hp.n_layers, p)) want.push_back(p);
    }
    EXPECT_EQ(cache.stored_positions(l, 5), want) << "layer " << l;
  }
  // 30 tokens: at most ceil(30 / 4) + 1 = 9 rows a layer, 3 pages of 4 rows, not 8.
  EXPECT_EQ(cache.length(5), 30);
  EXPECT_EQ(cache.pages_total() - cache.pages_free(), 3);
  cache.free_sequence(5);
  EXPECT_EQ(cache.pages_free(), cache.pages_total());
}

TEST(Attamba, ForwardLayersAndBatchedDecode) {
  Tiny t;
  Model& m = *t.model;
  const int nv = m.hparams().n_vocab;
  const auto a = random_tokens(23, 1, nv), b = random_tokens(14, 2, nv);
  const std::vector<float> want_a = dense_global(*t.source, a), want_b = dense_global(*t.source, b);
  const float tol = std::max(logit_tolerance(want_a), logit_tolerance(want_b));
  KvCache cache = make_cache(m);
  LocalAttention attn(m.backend(), cache, m.hparams());
  // Prefill of a split by layers (one layer per call), b in one forward.
  {
    std::vector<int32_t> toks(a.begin(), a.begin() + 19);
    const auto pos = iota_from(19, 0);
    BatchSeq bs{1, toks, pos, false};
    PartialForward pf;
    while (pf.next_layer < m.hparams().n_layers) ASSERT_TRUE(m.forward_layers({&bs, 1}, attn, 1, &pf).ok());
    EXPECT_EQ(pf.calls, m.hparams().n_layers);
  }
  {
    std::vector<int32_t> toks(b.begin(), b.begin() + 9);
    const auto pos = iota_from(9, 0);
    BatchSeq bs{2, toks, pos, false};
    std::vector<float> lg;
    ASSERT_TRUE(m.forward({&bs, 1}, attn, &lg).ok());
  }
  // Then both sequences together, token by token (a's 4 and b's 5 more).
  for (int step = 0; step < 5; ++step) {
    std::vector<BatchSeq> batch;
    std::vector<std::vector<int32_t>> toks, pos;
    toks.reserve(2);
    pos.reserve(2);
    const bool with_a = 19 + step < 23;
    if (with_a) {
      toks.push_back({a[19 + step]});
      pos.push_back({19 + step});
      batch.push_back({1, toks.back(), pos.back(), false});
    }
    toks.push_back({b[9 + step]});
    pos.push_back({9 + step});
    batch.push_back({2, toks.back(), pos.back(), false});
    std::vector<float> lg;
    ASSERT_TRUE(m.forward(batch, attn, &lg).ok());
    size_t r = 0;
    if (with_a) {
      EXPECT_LE(max_abs_diff(rows(lg, 0, 1, nv), rows(want_a, 19 + step, 1, nv)), tol) << "a, step " << step;
      r = 1;
    }
    EXPECT_LE(max_abs_diff(rows(lg, static_cast<int64_t>(r), 1, nv), rows(want_b, 9 + step, 1, nv)), tol)
        << "b, step " << step;
  }
}

struct StarResult {
  std::vector<float> query_logits;
  std::vector<int32_t> generated;
};

// Phase 1 (ContextEncoder) and phase 2 (Phase2Attention) on one process, greedy n_new tokens.
Result<StarResult> star_one_process(Model& m, const std::vector<int32_t>& ctx, const std::vector<int32_t>& query,
                                    const ContextPlan& plan, int n_new, int layers_per_chunk = 0) {
  auto comm = make_local_communicator();
  KvCache cache = make_cache(m);
  ContextEncoder enc(m, cache, *comm);
  SS_ASSIGN_OR_RETURN(StarLayout lay, enc.layout_for(static_cast<int64_t>(ctx.size()), plan));
  if (plan.mode == AttentionMode::kExact || layers_per_chunk == 0) {
    SS_RETURN_IF_ERROR(enc.encode(9, ctx, lay, plan.mode));
  } else {
    const int n = static_cast<int>(lay.blocks_of(0).size());
    for (int k = 0; k < n; ++k) {
      for (int c = 0; c < enc.chunks_per_block(layers_per_chunk); ++c) {
        SS_RETURN_IF_ERROR(enc.encode_block(9, ctx, lay, k, c, layers_per_chunk));
      }
    }
    enc.finish(9);
  }
  Phase2Attention p2(m.backend(), cache, m.hparams(), *comm, MergeAlgo::kAllGather);
  p2.register_sequence(9, true, static_cast<int64_t>(ctx.size()));
  StarResult r;
  std::vector<int32_t> toks = query;
  std::vector<int32_t> pos = iota_from(static_cast<int64_t>(query.size()), static_cast<int64_t>(ctx.size()));
  BatchSeq bs{9, toks, pos, true};
  SS_RETURN_IF_ERROR(m.forward({&bs, 1}, p2, &r.query_logits));
  const int nv = m.hparams().n_vocab;
  std::vector<float> last(r.query_logits.end() - nv, r.query_logits.end());
  int32_t p = pos.back();
  for (int i = 0; i < n_new; ++i) {
    const int32_t tk = static_cast<int32_t>(std::max_element(last.begin(), last.end()) - last.begin());
    r.generated.push_back(tk);
    toks = {tk};
    pos = {++p};
    BatchSeq s{9, toks, pos, false};
    SS_RETURN_IF_ERROR(m.forward({&s, 1}, p2, &last));
  }
  return r;
}

// The dense reference's greedy continuation under a visibility rule.
std::vector<int32_t> dense_greedy(const TinySource& src, std::vector<int32_t> ids, int n_new, const Visible& vis) {
  const int nv = src.hparams().n_vocab;
  std::vector<int32_t> out;
  for (int i = 0; i < n_new; ++i) {
    const std::vector<float> lg = dense_logits(src, ids, vis);
    const int32_t tk = static_cast<int32_t>(std::max_element(lg.end() - nv, lg.end()) - (lg.end() - nv));
    out.push_back(tk);
    ids.push_back(tk);
  }
  return out;
}

TEST(Attamba, StarOneProcessMatchesTheDenseStarMask) {
  Tiny t;
  Model& m = *t.model;
  const ModelHParams& hp = m.hparams();
  const int nv = hp.n_vocab;
  const auto ctx = random_tokens(44, 21, nv), query = random_tokens(6, 22, nv);
  std::vector<int32_t> all = ctx;
  all.insert(all.end(), query.begin(), query.end());
  struct Case {
    int block, anchor, layers_per_chunk;
  };
  for (const Case c : {Case{8, -1, 0}, Case{12, 4, 0}, Case{16, 0, 0}, Case{4, -1, 0}, Case{12, -1, 1}}) {
    const int64_t anchor = c.anchor < 0 ? c.block : c.anchor;
    const Visible vis = [&, c, anchor](int l, int64_t tq, int64_t j) {
      return star_visible(hp, c.block, anchor, 44, l, tq, j);
    };
    const std::vector<float> want = rows(dense_logits(*t.source, all, vis), 44, 6, nv);
    auto r = star_one_process(m, ctx, query, {AttentionMode::kStar, c.block, c.anchor}, 4, c.layers_per_chunk);
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    EXPECT_LE(max_abs_diff(r->query_logits, want), logit_tolerance(want)) << "block " << c.block << " anchor "
                                                                          << c.anchor;
    EXPECT_EQ(r->generated, dense_greedy(*t.source, all, 4, vis)) << "block " << c.block;
    // Star with several blocks is not global attention here.
    const std::vector<float> global = rows(dense_global(*t.source, all), 44, 6, nv);
    EXPECT_GT(max_abs_diff(want, global), 10 * logit_tolerance(want)) << "block " << c.block;
  }
}

TEST(Attamba, StarWithOneBlockAndExactEqualGlobal) {
  Tiny t;
  Model& m = *t.model;
  const int nv = m.hparams().n_vocab;
  const auto ctx = random_tokens(29, 31, nv), query = random_tokens(5, 32, nv);
  std::vector<int32_t> all = ctx;
  all.insert(all.end(), query.begin(), query.end());
  const std::vector<float> want = rows(dense_global(*t.source, all), 29, 5, nv);
  const auto greedy = dense_greedy(*t.source, all, 3, [&](int l, int64_t tq, int64_t j) {
    return global_visible(m.hparams(), l, tq, j);
  });
  for (const ContextPlan& plan : {ContextPlan{AttentionMode::kStar, 29, -1}, ContextPlan{AttentionMode::kStar, 64, 8},
                                  ContextPlan{AttentionMode::kExact, 0, 0}, ContextPlan{AttentionMode::kGlobal, 0, 0}}) {
    auto r = star_one_process(m, ctx, query, plan, 3);
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    EXPECT_LE(max_abs_diff(r->query_logits, want), logit_tolerance(want)) << static_cast<int>(plan.mode);
    EXPECT_EQ(r->generated, greedy) << static_cast<int>(plan.mode);
  }
}

TEST(Attamba, StarRefusesBlocksThatAreNotAMultipleOfTheChunk) {
  Tiny t;
  auto comm = make_local_communicator();
  KvCache cache = make_cache(*t.model);
  ContextEncoder enc(*t.model, cache, *comm);
  auto lay = enc.layout_for(40, {AttentionMode::kStar, 10, -1});
  ASSERT_FALSE(lay.ok());
  EXPECT_EQ(lay.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(lay.status().message().find("not a multiple of the chunk size 4"), std::string::npos)
      << lay.status().to_string();
  // One block of any size is global attention.
  EXPECT_TRUE(enc.layout_for(40, {AttentionMode::kStar, 50, -1}).ok());
}

// A block size the plan derives (n_blocks, or one block per rank) is rounded up to a multiple of P:
// 42 tokens in 4 blocks -> ceil(42 / 4) = 11 -> 12, so blocks of 12, 12, 12 and 6.
TEST(Attamba, DerivedStarBlocksAreRoundedUpToTheChunk) {
  Tiny t;
  auto comm = make_local_communicator();
  KvCache cache = make_cache(*t.model);
  ContextEncoder enc(*t.model, cache, *comm);
  ContextPlan plan{AttentionMode::kStar, 0, -1};
  plan.n_blocks = 4;
  auto lay = enc.layout_for(42, plan);
  ASSERT_TRUE(lay.ok()) << lay.status().to_string();
  EXPECT_EQ(lay->block_size, 12);
  ASSERT_EQ(lay->blocks.size(), 4u);
  EXPECT_EQ(lay->blocks.back().size(), 6);
  // One block per rank on one rank: the whole context, rounded (one block = global).
  auto one = enc.layout_for(42, {AttentionMode::kStar, 0, -1});
  ASSERT_TRUE(one.ok()) << one.status().to_string();
  EXPECT_EQ(one->blocks.size(), 1u);
}

// ---- loading

class TempDir {
 public:
  TempDir() : path_(std::filesystem::temp_directory_path() / ("starserve_attamba_" + std::to_string(::getpid()))) {
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  std::string file(const std::string& n) const { return (path_ / n).string(); }
  std::string str() const { return path_.string(); }

 private:
  std::filesystem::path path_;
};

// The HF name of a canonical tiny tensor (docs/specs/attamba.md, "Files").
std::string hf_name(const std::string& c) {
  if (c == "token_embd.weight") return "model.embed_tokens.weight";
  if (c == "output_norm.weight") return "model.norm.weight";
  const size_t dot = c.find('.', 4);
  const std::string layer = c.substr(4, dot - 4), leaf = c.substr(dot + 1);
  static const std::map<std::string, std::string> kLeaves = {
      {"attn_norm.weight", "input_layernorm.weight"},    {"attn_q.weight", "self_attn.q_proj.weight"},
      {"attn_output.weight", "self_attn.o_proj.weight"}, {"ffn_norm.weight", "post_attention_layernorm.weight"},
      {"ffn_gate.weight", "mlp.gate_proj.weight"},       {"ffn_up.weight", "mlp.up_proj.weight"},
      {"ffn_down.weight", "mlp.down_proj.weight"}};
  auto it = kLeaves.find(leaf);
  return "model.layers." + layer + "." + (it != kLeaves.end() ? it->second : "self_attn." + leaf);
}

json hf_config(const ModelHParams& hp) {
  return {{"model_type", "attamba"},
          {"architectures", {"AttambaForCausalLM"}},
          {"hidden_size", hp.hidden},
          {"intermediate_size", hp.ffn_hidden},
          {"num_hidden_layers", hp.n_layers},
          {"num_attention_heads", hp.n_heads},
          {"num_key_value_heads", hp.n_kv_heads},
          {"head_dim", hp.head_dim},
          {"rms_norm_eps", hp.rms_eps},
          {"rope_theta", hp.rope_theta},
          {"vocab_size", hp.n_vocab},
          {"max_position_embeddings", hp.max_context},
          {"tie_word_embeddings", true},
          {"attamba_chunk_size", hp.attamba.chunk},
          {"attamba_leading_tokens", hp.attamba.leading},
          {"attamba_cyclic_offsets", hp.attamba.cyclic_offsets},
          {"ssm_d_inner", hp.attamba.d_inner},
          {"ssm_d_state", hp.attamba.d_state},
          {"ssm_n_heads", hp.attamba.n_heads},
          {"ssm_n_groups", hp.attamba.n_groups},
          {"ssm_conv_width", hp.attamba.conv_width}};
}

// model.safetensors (F32) of the tiny source's tensors under their HF names; `skip` left out,
// `reshape` stored with one row fewer.
void write_hf(const TempDir& dir, const TinySource& src, const std::string& skip = "", const std::string& reshape = "") {
  json header = json::object();
  std::vector<char> data;
  for (const auto& [name, t] : src.tensors()) {
    const std::string hf = hf_name(name);
    if (hf == skip) continue;
    std::vector<int64_t> shape = t.shape;
    int64_t n = t.numel();
    if (hf == reshape) {
      n -= n / shape[0];
      shape[0] -= 1;
    }
    const uint64_t begin = data.size();
    const char* p = reinterpret_cast<const char*>(t.data.data());
    data.insert(data.end(), p, p + n * 4);
    header[hf] = {{"dtype", "F32"}, {"shape", shape}, {"data_offsets", {begin, data.size()}}};
  }
  const std::string h = header.dump();
  const uint64_t hn = h.size();
  std::ofstream out(dir.file("model.safetensors"), std::ios::binary);
  out.write(reinterpret_cast<const char*>(&hn), 8);
  out << h;
  out.write(data.data(), static_cast<std::streamsize>(data.size()));
  std::ofstream(dir.file("config.json")) << hf_config(src.hparams()).dump();
}

TEST(Attamba, LoadsTheHuggingFaceLayout) {
  Tiny t;
  TempDir dir;
  write_hf(dir, *t.source);
  auto s = HfWeightSource::open(dir.str());
  ASSERT_TRUE(s.ok()) << s.status().to_string();
  const ModelHParams& hp = (*s)->hparams();
  EXPECT_EQ(hp.arch, "attamba");
  EXPECT_EQ(hp.attamba.chunk, 4);
  EXPECT_EQ(hp.attamba.leading, 5);
  EXPECT_TRUE(hp.attamba.cyclic_offsets);
  EXPECT_EQ(hp.attamba.conv_dim(), 16 + 2 * 8);
  auto backend = make_cpu_backend(1);
  auto m = create_model(**s, *backend);
  ASSERT_TRUE(m.ok()) << m.status().to_string();
  const auto ids = random_tokens(19, 3, hp.n_vocab);
  KvCache c1 = make_cache(**m), c2 = make_cache(*t.model);
  EXPECT_EQ(local_in_pieces(**m, c1, 1, ids, {19}), local_in_pieces(*t.model, c2, 1, ids, {19}));
}

TEST(Attamba, LoaderErrorsNameTheTensor) {
  Tiny t;
  {
    TempDir dir;
    write_hf(dir, *t.source, "model.layers.2.self_attn.v_ssm.A_log");
    auto s = HfWeightSource::open(dir.str());
    ASSERT_FALSE(s.ok());
    EXPECT_EQ(s.status().code(), StatusCode::kDataLoss);
    EXPECT_NE(s.status().message().find("blk.2.v_ssm.A_log"), std::string::npos) << s.status().to_string();
  }
  {
    TempDir dir;
    write_hf(dir, *t.source, "", "model.layers.1.self_attn.k_ssm.in_proj.weight");
    auto s = HfWeightSource::open(dir.str());
    ASSERT_FALSE(s.ok());
    EXPECT_EQ(s.status().code(), StatusCode::kDataLoss);
    EXPECT_NE(s.status().message().find("model.layers.1.self_attn.k_ssm.in_proj.weight' has shape [51, 32], expected "
                                        "[52, 32]"),
              std::string::npos)
        << s.status().to_string();
  }
  {
    json cfg = hf_config(t.source->hparams());
    cfg["num_key_value_heads"] = 2;
    auto hp = parse_hf_config(cfg.dump(), "config.json");
    ASSERT_FALSE(hp.ok());
    EXPECT_NE(hp.status().message().find("num_key_value_heads = num_attention_heads"), std::string::npos);
    cfg = hf_config(t.source->hparams());
    cfg.erase("ssm_d_state");
    hp = parse_hf_config(cfg.dump(), "config.json");
    ASSERT_FALSE(hp.ok());
    EXPECT_NE(hp.status().message().find("ssm_d_state is missing"), std::string::npos);
  }
}

TEST(Attamba, GgufNamingItIsRefused) {
  const std::string path = ::testing::TempDir() + "/attamba.gguf";
  {
    std::ofstream f(path, std::ios::binary);
    auto u32 = [&](uint32_t v) { f.write(reinterpret_cast<const char*>(&v), 4); };
    auto u64 = [&](uint64_t v) { f.write(reinterpret_cast<const char*>(&v), 8); };
    f.write("GGUF", 4);
    u32(3);
    u64(0);
    u64(1);
    const std::string key = "general.architecture", val = "attamba";
    u64(key.size());
    f.write(key.data(), static_cast<std::streamsize>(key.size()));
    u32(8);  // string
    u64(val.size());
    f.write(val.data(), static_cast<std::streamsize>(val.size()));
  }
  auto s = GgufWeightSource::open(path);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), StatusCode::kUnimplemented);
  EXPECT_NE(s.status().message().find("'attamba' has no GGUF format"), std::string::npos) << s.status().to_string();
}

// A backend without the SSM ops refuses the model before uploading anything.
TEST(Attamba, BackendWithoutSsmOpsRefusesIt) {
  class NoSsm final : public Backend {
   public:
    explicit NoSsm(std::unique_ptr<Backend> b) : b_(std::move(b)) {}
    DeviceKind kind() const override { return b_->kind(); }
    std::string name() const override { return "no-ssm"; }
    DType compute_dtype() const override { return b_->compute_dtype(); }
    DeviceBuffer alloc(size_t bytes) override { return b_->alloc(bytes); }
    void free_raw(void* p) override { b_->free_raw(p); }
    void upload_f32(Tensor d, const float* s) override { b_->upload_f32(d, s); }
    void download_f32(float* d, Tensor s) override { b_->download_f32(d, s); }
    void copy(Tensor d, Tensor s) override { b_->copy(d, s); }
    void convert(Tensor d, Tensor s) override { b_->convert(d, s); }
    void upload_bytes(void* d, const void* s, size_t n) override { b_->upload_bytes(d, s, n); }
    void download_bytes(void* d, const void* s, size_t n) override { b_->download_bytes(d, s, n); }
    void synchronize() override {}
    void embedding(Tensor o, Tensor t, std::span<const int32_t> ids) override { b_->embedding(o, t, ids); }
    void rms_norm(Tensor o, Tensor i, Tensor w, float e) override { b_->rms_norm(o, i, w, e); }
    void matmul(Tensor o, Tensor i, Tensor w) override { b_->matmul(o, i, w); }
    void rope(Tensor x, std::span<const int32_t> p, Tensor f, int d, RopeStyle s) override { b_->rope(x, p, f, d, s); }
    void swiglu(Tensor o, Tensor g, Tensor u) override { b_->swiglu(o, g, u); }
    void add(Tensor o, Tensor a, Tensor b) override { b_->add(o, a, b); }
    void split_qkv_rope(Tensor q, Tensor k, Tensor v, Tensor qkv, std::span<const int32_t> p, Tensor f, int d,
                        RopeStyle s) override {
      b_->split_qkv_rope(q, k, v, qkv, p, f, d, s);
    }
    void swiglu_fused(Tensor o, Tensor gu) override { b_->swiglu_fused(o, gu); }
    void add_rms_norm(Tensor o, Tensor x, Tensor h, Tensor w, float e) override { b_->add_rms_norm(o, x, h, w, e); }
    void partial_attention(const AttentionCall& c) override { b_->partial_attention(c); }
    void merge_partials(float* o, float* l, float* e, std::span<const AttentionPartial> p, int64_t n, int hd) override {
      b_->merge_partials(o, l, e, p, n, hd);
    }
    void merge_sum_terms(float* t, const float* o, const float* l, const float* e, const float* m, int64_t n,
                         int hd) override {
      b_->merge_sum_terms(t, o, l, e, m, n, hd);
    }
    void merge_sum_finish(float* o, float* l, float* e, const float* t, const float* m, int64_t n, int hd) override {
      b_->merge_sum_finish(o, l, e, t, m, n, hd);
    }

   private:
    std::unique_ptr<Backend> b_;
  };
  NoSsm backend(make_cpu_backend(1));
  TinySource src(tiny_hparams());
  auto m = create_model(src, backend);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), StatusCode::kUnimplemented);
  EXPECT_NE(m.status().message().find("no SSM ops"), std::string::npos) << m.status().to_string();
}


// ---- the reference kit's golden (tests/golden/attamba, made by scripts/reference/starref/golden.py)

namespace golden {

json read() {
  std::ifstream f(std::string(STARSERVE_GOLDEN_DIR) + "/attamba/golden.json");
  SS_CHECK(f.good(), "tests/golden/attamba/golden.json is missing");
  return json::parse(f);
}

struct Loaded {
  std::unique_ptr<Backend> backend = make_cpu_backend(1);
  std::unique_ptr<WeightSource> source;
  std::unique_ptr<Model> model;
};

Loaded& model() {
  static Loaded* l = [] {
    auto* x = new Loaded;
    auto s = HfWeightSource::open(std::string(STARSERVE_GOLDEN_DIR) + "/attamba/hf");
    SS_CHECK(s.ok(), "{}", s.status().to_string());
    x->source = std::move(s).value();
    auto m = create_model(*x->source, *x->backend);
    SS_CHECK(m.ok(), "{}", m.status().to_string());
    x->model = std::move(m).value();
    return x;
  }();
  return *l;
}

// log p(next | row) from a logits row.
double logprob(const float* row, int nv, int32_t next) {
  double mx = row[0], z = 0;
  for (int i = 0; i < nv; ++i) mx = std::max<double>(mx, row[i]);
  for (int i = 0; i < nv; ++i) z += std::exp(row[i] - mx);
  return row[next] - mx - std::log(z);
}

std::vector<int32_t> greedy(Model& m, const std::vector<int32_t>& prompt, int n_new) {
  KvCache cache = make_cache(m);
  LocalAttention attn(m.backend(), cache, m.hparams());
  const int nv = m.hparams().n_vocab;
  std::vector<int32_t> toks = prompt, out;
  std::vector<int32_t> pos = iota_from(static_cast<int64_t>(prompt.size()), 0);
  for (int i = 0; i < n_new; ++i) {
    BatchSeq bs{1, toks, pos, false};
    std::vector<float> lg;
    EXPECT_TRUE(m.forward({&bs, 1}, attn, &lg).ok());
    const int32_t tk = static_cast<int32_t>(std::max_element(lg.begin(), lg.begin() + nv) - lg.begin());
    out.push_back(tk);
    const int32_t next = pos.back() + 1;
    toks = {tk};
    pos = {next};
  }
  return out;
}

}  // namespace golden

TEST(AttambaGolden, RowLogitsAndPromptLogprobs) {
  const json g = golden::read();
  Model& m = *golden::model().model;
  const int nv = m.hparams().n_vocab;
  ASSERT_EQ(nv, g["n_vocab"].get<int>());
  for (int l = 0; l < m.hparams().n_layers; ++l) {
    EXPECT_EQ(m.hparams().attamba.offset(l, m.hparams().n_layers), g["layer_offsets"][l].get<int>());
  }
  for (const json& p : g["prompts"]) {
    const auto ids = p["token_ids"].get<std::vector<int32_t>>();
    KvCache cache = make_cache(m);
    const std::vector<float> lg = local_in_pieces(m, cache, 1, ids, {static_cast<int>(ids.size())});
    const auto rs = p["rows"].get<std::vector<int64_t>>();
    for (size_t i = 0; i < rs.size(); ++i) {
      const auto want = p["row_logits"][i].get<std::vector<float>>();
      EXPECT_LE(max_abs_diff(rows(lg, rs[i], 1, nv), want), logit_tolerance(want))
          << ids.size() << " tokens, row " << rs[i];
    }
    const auto lp = p["prompt_logprobs"].get<std::vector<double>>();
    ASSERT_EQ(lp.size() + 1, ids.size());
    for (size_t i = 0; i < lp.size(); ++i) {
      EXPECT_NEAR(golden::logprob(lg.data() + i * nv, nv, ids[i + 1]), lp[i], 1e-4) << "token " << i + 1;
    }
  }
}

TEST(AttambaGolden, GreedyThroughTheCompressedCache) {
  const json g = golden::read();
  Model& m = *golden::model().model;
  for (const json& e : g["greedy"]) {
    const auto want = e["generated_ids"].get<std::vector<int32_t>>();
    EXPECT_EQ(golden::greedy(m, e["prompt_ids"].get<std::vector<int32_t>>(), static_cast<int>(want.size())), want);
  }
}

TEST(AttambaGolden, CacheHoldsTheReferenceBoundaries) {
  const json g = golden::read();
  Model& m = *golden::model().model;
  const json& cb = g["cache_boundaries"];
  const auto ids = g["prompts"][cb["prompt"].get<int>()]["token_ids"].get<std::vector<int32_t>>();
  KvCache cache = make_cache(m);
  local_in_pieces(m, cache, 4, ids, {11, 30, 49});
  for (int l = 0; l < m.hparams().n_layers; ++l) {
    EXPECT_EQ(cache.stored_positions(l, 4), cb["positions"][l].get<std::vector<int32_t>>()) << "layer " << l;
  }
}

TEST(AttambaGolden, StarAndExactOnOneProcess) {
  const json g = golden::read();
  Model& m = *golden::model().model;
  const int nv = m.hparams().n_vocab;
  for (const json& e : g["star"]) {
    const auto ctx = e["context_ids"].get<std::vector<int32_t>>();
    const auto query = e["query_ids"].get<std::vector<int32_t>>();
    const auto want = e["generated_ids"].get<std::vector<int32_t>>();
    const ContextPlan plan = e["exact"].get<bool>()
                                 ? ContextPlan{AttentionMode::kExact, 0, 0}
                                 : ContextPlan{AttentionMode::kStar, e["block"].get<int>(), e["anchor"].get<int>()};
    const std::string what = "block " + std::to_string(e["block"].get<int>()) + " anchor " +
                             std::to_string(e["anchor"].get<int>()) + (e["exact"].get<bool>() ? " exact" : "");
    auto r = star_one_process(m, ctx, query, plan, static_cast<int>(want.size()));
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    const auto ref = e["last_logits"].get<std::vector<float>>();
    const std::vector<float> last(r->query_logits.end() - nv, r->query_logits.end());
    EXPECT_LE(max_abs_diff(last, ref), logit_tolerance(ref)) << what;
    const auto qlp = e["query_logprobs"].get<std::vector<double>>();
    for (size_t i = 0; i < qlp.size(); ++i) {
      EXPECT_NEAR(golden::logprob(r->query_logits.data() + i * nv, nv, query[i + 1]), qlp[i], 1e-4)
          << what << ", query token " << i + 1;
    }
    EXPECT_EQ(r->generated, want) << what;
  }
}

// Admission counts the rows Attamba stores: a rank's share of n tokens takes ceil(n / P) + 1 rows.
TEST(Attamba, AdmissionCountsTheCompressedRows) {
  auto lay = partition_context(1000, 0, 0, 2);  // 500 tokens per rank, no anchor
  ASSERT_TRUE(lay.ok());
  // Query host: 500 context + 100 query/generated tokens = 600 tokens, 600 / 8 + 1 = 76 rows, 5 pages of 16.
  EXPECT_EQ(kv_demand(*lay, AttentionMode::kStar, 100, 16, 1, 8).pages, 5);
  EXPECT_EQ(kv_demand(*lay, AttentionMode::kStar, 100, 16, 1, 0).pages, 38);  // every token stored
}

}  // namespace
}  // namespace starserve
