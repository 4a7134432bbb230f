// Hugging Face checkpoint source: config.json parsing (both transformers 4.x and 5.x spellings),
// the name mapping, error cases on synthetic checkpoints, and the real sharded tiny Llama made by
// scripts/make_golden.py (tests/golden/tiny_llama).
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "backend/backend.h"
#include "kv/kv_cache.h"
#include "star/local_attention.h"
#include "model/hf_source.h"
#include "model/model.h"

#ifndef STARSERVE_GOLDEN_DIR
#error "STARSERVE_GOLDEN_DIR must name tests/golden (tests/CMakeLists.txt defines it)"
#endif

namespace starserve {
namespace {

using nlohmann::json;

// A minimal Llama config.json; tests patch fields into it.
json base_config() {
  return json{{"model_type", "llama"},       {"num_hidden_layers", 1},  {"hidden_size", 8},
              {"intermediate_size", 12},     {"num_attention_heads", 2}, {"num_key_value_heads", 1},
              {"vocab_size", 16},            {"max_position_embeddings", 64}, {"rms_norm_eps", 1e-5},
              {"tie_word_embeddings", false}};
}

Result<ModelHParams> parse(const json& cfg) { return parse_hf_config(cfg.dump(), "config.json"); }

void expect_error(const Result<ModelHParams>& r, StatusCode code, const std::string& needle) {
  ASSERT_FALSE(r.ok()) << "accepted";
  EXPECT_EQ(r.status().code(), code) << r.status().to_string();
  EXPECT_NE(r.status().message().find(needle), std::string::npos) << "'" << needle << "' not in: " << r.status().message();
}

// ---------------------------------------------------------------------------------------------
// config.json

TEST(HfConfig, ReadsLlamaFieldsAndDefaults) {
  auto r = parse(base_config());
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  const ModelHParams& hp = *r;
  EXPECT_EQ(hp.arch, "llama");
  EXPECT_EQ(hp.arch_name, "llama");
  EXPECT_EQ(hp.n_layers, 1);
  EXPECT_EQ(hp.hidden, 8);
  EXPECT_EQ(hp.ffn_hidden, 12);
  EXPECT_EQ(hp.n_heads, 2);
  EXPECT_EQ(hp.n_kv_heads, 1);
  EXPECT_EQ(hp.head_dim, 4);
  EXPECT_EQ(hp.rope_dim, 4);
  EXPECT_EQ(hp.n_vocab, 16);
  EXPECT_EQ(hp.max_context, 64);
  EXPECT_FLOAT_EQ(hp.rms_eps, 1e-5f);
  EXPECT_FLOAT_EQ(hp.rope_theta, 10000.0f);
  EXPECT_EQ(hp.rope_style, RopeStyle::kHalf);
  EXPECT_EQ(hp.rope_scaling.type, RopeScaling::Type::kNone);
  EXPECT_FALSE(hp.tied_embeddings);

  json cfg = base_config();
  cfg.erase("num_key_value_heads");
  cfg.erase("rms_norm_eps");
  cfg.erase("tie_word_embeddings");
  cfg["head_dim"] = nullptr;  // transformers writes null for unset optional fields
  auto d = parse(cfg);
  ASSERT_TRUE(d.ok()) << d.status().to_string();
  EXPECT_EQ(d->n_kv_heads, 2);
  EXPECT_FLOAT_EQ(d->rms_eps, 1e-6f);
  EXPECT_FALSE(d->tied_embeddings);
  EXPECT_EQ(d->head_dim, 4);
}

TEST(HfConfig, ExplicitHeadDimMayDifferFromHiddenOverHeads) {
  json cfg = base_config();
  cfg["head_dim"] = 16;
  auto r = parse(cfg);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_EQ(r->head_dim, 16);
  EXPECT_EQ(r->rope_dim, 16);
}

TEST(HfConfig, RopeTransformers4Spelling) {
  json cfg = base_config();
  cfg["rope_theta"] = 500000.0;
  cfg["rope_scaling"] = {{"type", "linear"}, {"factor", 4.0}};
  auto r = parse(cfg);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_FLOAT_EQ(r->rope_theta, 500000.0f);
  EXPECT_EQ(r->rope_scaling.type, RopeScaling::Type::kLinear);
  EXPECT_FLOAT_EQ(r->rope_scaling.factor, 4.0f);

  // Llama 3.1's config.json.
  cfg["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", 1.0},
                         {"high_freq_factor", 4.0}, {"original_max_position_embeddings", 8192}};
  r = parse(cfg);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_EQ(r->rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_FLOAT_EQ(r->rope_scaling.factor, 8.0f);
  EXPECT_FLOAT_EQ(r->rope_scaling.low_freq_factor, 1.0f);
  EXPECT_FLOAT_EQ(r->rope_scaling.high_freq_factor, 4.0f);
  EXPECT_EQ(r->rope_scaling.original_context, 8192);

  cfg["rope_scaling"] = {{"rope_type", "default"}};
  r = parse(cfg);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_EQ(r->rope_scaling.type, RopeScaling::Type::kNone);
}

TEST(HfConfig, RopeTransformers5Spelling) {
  json cfg = base_config();
  cfg["rope_parameters"] = {{"rope_theta", 100000.0}, {"rope_type", "default"}};
  auto r = parse(cfg);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_FLOAT_EQ(r->rope_theta, 100000.0f);
  EXPECT_EQ(r->rope_scaling.type, RopeScaling::Type::kNone);

  cfg["rope_parameters"] = {{"rope_theta", 10000.0},         {"rope_type", "llama3"},
                            {"factor", 32.0},                {"low_freq_factor", 1.0},
                            {"high_freq_factor", 4.0},       {"original_max_position_embeddings", 8192}};
  r = parse(cfg);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_EQ(r->rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_FLOAT_EQ(r->rope_scaling.factor, 32.0f);
}

TEST(HfConfig, UnsupportedModelsAndFeaturesAreUnimplemented) {
  json cfg = base_config();
  cfg["model_type"] = "falcon";
  expect_error(parse(cfg), StatusCode::kUnimplemented, "model_type 'falcon'");

  cfg = base_config();
  cfg["attention_bias"] = true;
  expect_error(parse(cfg), StatusCode::kUnimplemented, "attention_bias");
  cfg = base_config();
  cfg["mlp_bias"] = true;
  expect_error(parse(cfg), StatusCode::kUnimplemented, "mlp_bias");
  cfg = base_config();
  cfg["hidden_act"] = "gelu";
  expect_error(parse(cfg), StatusCode::kUnimplemented, "hidden_act 'gelu'");
  cfg = base_config();
  cfg["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
  expect_error(parse(cfg), StatusCode::kUnimplemented, "rope_type 'yarn'");

  // Mistral is Llama without biases, with a sliding window when sliding_window is set.
  cfg = base_config();
  cfg["model_type"] = "mistral";
  cfg["sliding_window"] = nullptr;
  auto m = parse(cfg);
  ASSERT_TRUE(m.ok()) << m.status().to_string();
  EXPECT_EQ(m->arch, "llama");
  EXPECT_EQ(m->arch_name, "mistral");
  EXPECT_EQ(m->max_window(), 0);
  cfg["sliding_window"] = 16;
  m = parse(cfg);
  ASSERT_TRUE(m.ok()) << m.status().to_string();
  EXPECT_EQ(m->window_of(0), 16);
}

TEST(HfConfig, MissingAndInconsistentValues) {
  expect_error(parse_hf_config("{", "cfg.json"), StatusCode::kDataLoss, "cfg.json is not valid JSON");
  expect_error(parse_hf_config("[]", "cfg.json"), StatusCode::kDataLoss, "expected an object");
  json cfg = base_config();
  cfg.erase("model_type");
  expect_error(parse(cfg), StatusCode::kNotFound, "model_type");
  cfg = base_config();
  cfg.erase("num_hidden_layers");
  expect_error(parse(cfg), StatusCode::kNotFound, "num_hidden_layers");
  cfg = base_config();
  cfg["hidden_size"] = 0;
  expect_error(parse(cfg), StatusCode::kDataLoss, "hidden_size = 0");
  cfg = base_config();
  cfg["hidden_size"] = "8";
  expect_error(parse(cfg), StatusCode::kDataLoss, "must be an integer");
  cfg = base_config();
  cfg["num_key_value_heads"] = 3;
  expect_error(parse(cfg), StatusCode::kDataLoss, "not a multiple of num_key_value_heads 3");
  cfg = base_config();
  cfg["hidden_size"] = 9;
  expect_error(parse(cfg), StatusCode::kDataLoss, "no head_dim");
  cfg = base_config();
  cfg["rms_norm_eps"] = -1.0;
  expect_error(parse(cfg), StatusCode::kDataLoss, "rms_norm_eps");
  cfg = base_config();
  cfg["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", 1.0}, {"high_freq_factor", 4.0}};
  expect_error(parse(cfg), StatusCode::kNotFound, "original_max_position_embeddings");
  cfg["rope_scaling"]["original_max_position_embeddings"] = 64;
  cfg["rope_scaling"]["high_freq_factor"] = 1.0;
  expect_error(parse(cfg), StatusCode::kDataLoss, "high_freq_factor");
}

// ---------------------------------------------------------------------------------------------
// Names

TEST(HfNames, MapsEveryLlamaTensor) {
  EXPECT_EQ(hf_to_canonical_name("model.embed_tokens.weight"), "token_embd.weight");
  EXPECT_EQ(hf_to_canonical_name("model.norm.weight"), "output_norm.weight");
  EXPECT_EQ(hf_to_canonical_name("lm_head.weight"), "output.weight");
  EXPECT_EQ(hf_to_canonical_name("model.layers.0.input_layernorm.weight"), "blk.0.attn_norm.weight");
  EXPECT_EQ(hf_to_canonical_name("model.layers.12.self_attn.q_proj.weight"), "blk.12.attn_q.weight");
  EXPECT_EQ(hf_to_canonical_name("model.layers.3.self_attn.k_proj.weight"), "blk.3.attn_k.weight");
  EXPECT_EQ(hf_to_canonical_name("model.layers.3.self_attn.v_proj.weight"), "blk.3.attn_v.weight");
  EXPECT_EQ(hf_to_canonical_name("model.layers.3.self_attn.o_proj.weight"), "blk.3.attn_output.weight");
  EXPECT_EQ(hf_to_canonical_name("model.layers.3.post_attention_layernorm.weight"), "blk.3.ffn_norm.weight");
  EXPECT_EQ(hf_to_canonical_name("model.layers.3.mlp.gate_proj.weight"), "blk.3.ffn_gate.weight");
  EXPECT_EQ(hf_to_canonical_name("model.layers.3.mlp.up_proj.weight"), "blk.3.ffn_up.weight");
  EXPECT_EQ(hf_to_canonical_name("model.layers.3.mlp.down_proj.weight"), "blk.3.ffn_down.weight");
  for (const char* other : {"model.layers.0.self_attn.rotary_emb.inv_freq", "model.layers.01.mlp.up_proj.weight",
                            "model.layers..mlp.up_proj.weight", "model.layers.x.mlp.up_proj.weight",
                            "model.layers.0.self_attn.q_proj.bias", "model.layers.0", "embed_tokens.weight", ""}) {
    EXPECT_FALSE(hf_to_canonical_name(other).has_value()) << other;
  }
}

// ---------------------------------------------------------------------------------------------
// Synthetic checkpoints

class TempDir {
 public:
  explicit TempDir(const std::string& tag)
      : path_(std::filesystem::temp_directory_path() / ("starserve_hf_" + tag + "_" + std::to_string(::getpid()))) {
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  std::string str() const { return path_.string(); }

 private:
  std::filesystem::path path_;
};

struct Tensor {
  std::string name;
  std::vector<int64_t> shape;
  std::string dtype = "F32";  // F32 (values i * 0.5 + tag) or I32
};

// Writes model.safetensors with F32 tensors whose element i is tag + i / 1024, where tag is the
// tensor's index in `tensors`, so a test can tell which stored tensor a load returned.
void write_safetensors(const std::string& path, const std::vector<Tensor>& tensors) {
  json header = json::object();
  std::vector<uint8_t> data;
  for (size_t k = 0; k < tensors.size(); ++k) {
    const Tensor& t = tensors[k];
    int64_t n = 1;
    for (int64_t d : t.shape) n *= d;
    const uint64_t begin = data.size();
    for (int64_t i = 0; i < n; ++i) {
      if (t.dtype == "I32") {
        const int32_t v = static_cast<int32_t>(i);
        const auto* p = reinterpret_cast<const uint8_t*>(&v);
        data.insert(data.end(), p, p + 4);
      } else {
        const float v = static_cast<float>(k) + static_cast<float>(i) / 1024.0f;
        const auto* p = reinterpret_cast<const uint8_t*>(&v);
        data.insert(data.end(), p, p + 4);
      }
    }
    header[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {begin, data.size()}}};
  }
  const std::string h = header.dump();
  const uint64_t n = h.size();
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(&n), 8);
  out << h;
  out.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
}

// Tensors of a valid 1-layer model for base_config() (hidden 8, 2 heads x 4, 1 kv head, ffn 12).
std::vector<Tensor> base_tensors(bool with_lm_head) {
  std::vector<Tensor> t = {
      {"model.embed_tokens.weight", {16, 8}},
      {"model.norm.weight", {8}},
      {"model.layers.0.input_layernorm.weight", {8}},
      {"model.layers.0.self_attn.q_proj.weight", {8, 8}},
      {"model.layers.0.self_attn.k_proj.weight", {4, 8}},
      {"model.layers.0.self_attn.v_proj.weight", {4, 8}},
      {"model.layers.0.self_attn.o_proj.weight", {8, 8}},
      {"model.layers.0.post_attention_layernorm.weight", {8}},
      {"model.layers.0.mlp.gate_proj.weight", {12, 8}},
      {"model.layers.0.mlp.up_proj.weight", {12, 8}},
      {"model.layers.0.mlp.down_proj.weight", {8, 12}},
  };
  if (with_lm_head) t.push_back({"lm_head.weight", {16, 8}});
  return t;
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

Status open_error(const json& cfg, const std::vector<Tensor>& tensors) {
  TempDir dir("err");
  write_text(dir.file("config.json"), cfg.dump());
  write_safetensors(dir.file("model.safetensors"), tensors);
  auto r = HfWeightSource::open(dir.str());
  EXPECT_FALSE(r.ok()) << "accepted";
  return r.ok() ? Status() : r.status();
}

TEST(HfSource, OpensSyntheticCheckpoint) {
  TempDir dir("ok");
  write_text(dir.file("config.json"), base_config().dump());
  std::vector<Tensor> tensors = base_tensors(true);
  tensors.push_back({"model.layers.0.self_attn.rotary_emb.inv_freq", {2}});  // ignored
  write_safetensors(dir.file("model.safetensors"), tensors);
  auto r = HfWeightSource::open(dir.str());
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  const HfWeightSource& src = **r;
  EXPECT_FALSE(src.hparams().tied_embeddings);
  EXPECT_TRUE(src.has("output.weight"));
  EXPECT_TRUE(src.has("blk.0.ffn_down.weight"));
  EXPECT_FALSE(src.has("blk.1.ffn_down.weight"));
  EXPECT_EQ(src.hf_name("blk.0.attn_output.weight"), "model.layers.0.self_attn.o_proj.weight");
  EXPECT_TRUE(src.tokenizer_json_path().empty());
  EXPECT_TRUE(src.tokenizer_config_path().empty());
  EXPECT_NE(src.describe().find("1 other tensors ignored"), std::string::npos) << src.describe();

  // Tensor 10 in write order is down_proj: (hidden 8, ffn 12), element i = 10 + i / 1024.
  auto down = src.load("blk.0.ffn_down.weight");
  ASSERT_TRUE(down.ok()) << down.status().to_string();
  EXPECT_EQ(down->shape, (std::vector<int64_t>{8, 12}));
  ASSERT_EQ(down->data.size(), 96u);
  EXPECT_FLOAT_EQ(down->data[0], 10.0f);
  EXPECT_FLOAT_EQ(down->data[95], 10.0f + 95.0f / 1024.0f);
  EXPECT_EQ(src.load("blk.0.nope.weight").status().code(), StatusCode::kNotFound);

  // Tokenizer files are reported when present.
  write_text(dir.file("tokenizer.json"), "{}");
  write_text(dir.file("tokenizer_config.json"), "{}");
  auto with_tok = HfWeightSource::open(dir.str());
  ASSERT_TRUE(with_tok.ok());
  EXPECT_EQ((*with_tok)->tokenizer_json_path(), dir.file("tokenizer.json"));
  EXPECT_EQ((*with_tok)->tokenizer_config_path(), dir.file("tokenizer_config.json"));
}

TEST(HfSource, TiedWhenConfiguredOrWithoutLmHead) {
  {
    TempDir dir("tied_flag");
    json cfg = base_config();
    cfg["tie_word_embeddings"] = true;
    write_text(dir.file("config.json"), cfg.dump());
    write_safetensors(dir.file("model.safetensors"), base_tensors(true));  // a stored copy is ignored
    auto r = HfWeightSource::open(dir.str());
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    EXPECT_TRUE((*r)->hparams().tied_embeddings);
    EXPECT_FALSE((*r)->has("output.weight"));
  }
  {
    TempDir dir("tied_missing");
    write_text(dir.file("config.json"), base_config().dump());
    write_safetensors(dir.file("model.safetensors"), base_tensors(false));
    auto r = HfWeightSource::open(dir.str());
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    EXPECT_TRUE((*r)->hparams().tied_embeddings);
    EXPECT_FALSE((*r)->has("output.weight"));
  }
}

TEST(HfSource, RejectsBadCheckpoints) {
  EXPECT_EQ(HfWeightSource::open("/nonexistent/dir").status().code(), StatusCode::kNotFound);
  {
    TempDir dir("noconfig");
    write_safetensors(dir.file("model.safetensors"), base_tensors(true));
    auto r = HfWeightSource::open(dir.str());
    EXPECT_EQ(r.status().code(), StatusCode::kNotFound);
    EXPECT_NE(r.status().message().find("config.json"), std::string::npos);
  }
  {
    TempDir dir("noweights");
    write_text(dir.file("config.json"), base_config().dump());
    EXPECT_EQ(HfWeightSource::open(dir.str()).status().code(), StatusCode::kNotFound);
  }

  std::vector<Tensor> t = base_tensors(true);
  t[4].shape = {8, 8};  // k_proj with n_heads rows instead of n_kv_heads
  Status s = open_error(base_config(), t);
  EXPECT_EQ(s.code(), StatusCode::kDataLoss) << s.to_string();
  EXPECT_NE(s.message().find("'model.layers.0.self_attn.k_proj.weight' has shape [8, 8], expected [4, 8]"),
            std::string::npos)
      << s.message();

  t = base_tensors(true);
  t.erase(t.begin() + 9);  // up_proj
  s = open_error(base_config(), t);
  EXPECT_EQ(s.code(), StatusCode::kDataLoss) << s.to_string();
  EXPECT_NE(s.message().find("blk.0.ffn_up.weight"), std::string::npos) << s.message();

  t = base_tensors(true);
  t.push_back({"model.layers.0.self_attn.q_proj.bias", {8}});
  s = open_error(base_config(), t);
  EXPECT_EQ(s.code(), StatusCode::kUnimplemented) << s.to_string();
  EXPECT_NE(s.message().find("q_proj.bias"), std::string::npos) << s.message();

  t = base_tensors(true);
  t[1].dtype = "I32";
  s = open_error(base_config(), t);
  EXPECT_EQ(s.code(), StatusCode::kUnimplemented) << s.to_string();
  EXPECT_NE(s.message().find("'model.norm.weight' has dtype I32"), std::string::npos) << s.message();

  t = base_tensors(true);
  t.push_back({"model.layers.1.mlp.up_proj.weight", {12, 8}});  // beyond num_hidden_layers
  s = open_error(base_config(), t);
  EXPECT_EQ(s.code(), StatusCode::kDataLoss) << s.to_string();
  EXPECT_NE(s.message().find("layer 1"), std::string::npos) << s.message();

  json cfg = base_config();
  cfg["model_type"] = "gemma";
  s = open_error(cfg, base_tensors(true));
  EXPECT_EQ(s.code(), StatusCode::kUnimplemented) << s.to_string();
  EXPECT_NE(s.message().find("gemma"), std::string::npos) << s.message();
}

// ---------------------------------------------------------------------------------------------
// The real sharded checkpoint written by transformers (scripts/make_golden.py)

TEST(HfSource, TinyLlamaGoldenCheckpoint) {
  const std::string dir = std::string(STARSERVE_GOLDEN_DIR) + "/tiny_llama";
  auto r = HfWeightSource::open(dir);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  const HfWeightSource& src = **r;
  const ModelHParams& hp = src.hparams();
  EXPECT_EQ(hp.arch, "llama");
  EXPECT_EQ(hp.n_layers, 2);
  EXPECT_EQ(hp.hidden, 64);
  EXPECT_EQ(hp.n_heads, 4);
  EXPECT_EQ(hp.n_kv_heads, 2);
  EXPECT_EQ(hp.head_dim, 16);
  EXPECT_EQ(hp.rope_dim, 16);
  EXPECT_EQ(hp.ffn_hidden, 160);
  EXPECT_EQ(hp.n_vocab, 512);
  EXPECT_EQ(hp.max_context, 256);
  EXPECT_FLOAT_EQ(hp.rms_eps, 1e-5f);
  EXPECT_FLOAT_EQ(hp.rope_theta, 10000.0f);
  EXPECT_EQ(hp.rope_style, RopeStyle::kHalf);
  EXPECT_EQ(hp.rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_FLOAT_EQ(hp.rope_scaling.factor, 8.0f);
  EXPECT_FLOAT_EQ(hp.rope_scaling.low_freq_factor, 1.0f);
  EXPECT_FLOAT_EQ(hp.rope_scaling.high_freq_factor, 4.0f);
  EXPECT_EQ(hp.rope_scaling.original_context, 64);
  EXPECT_FALSE(hp.tied_embeddings);
  EXPECT_TRUE(src.tokenizer_json_path().empty());
  // Four shards holding BF16 projections, F32 norms and an F16 lm_head (see golden.json).
  EXPECT_NE(src.describe().find("4 files, 21 tensors (BF16, F16, F32)"), std::string::npos) << src.describe();

  // The hyper-parameters agree with what the script recorded.
  std::ifstream in(dir + "/golden.json");
  const json golden = json::parse(in);
  const json& g = golden.at("hparams");
  EXPECT_EQ(g.at("n_layers").get<int>(), hp.n_layers);
  EXPECT_EQ(g.at("head_dim").get<int>(), hp.head_dim);
  EXPECT_EQ(g.at("n_vocab").get<int>(), hp.n_vocab);

  std::vector<std::string> names = {"token_embd.weight", "output_norm.weight", "output.weight"};
  for (int l = 0; l < hp.n_layers; ++l) {
    for (const char* leaf : {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate",
                             "ffn_up", "ffn_down"}) {
      names.push_back("blk." + std::to_string(l) + "." + leaf + ".weight");
    }
  }
  for (const std::string& name : names) {
    ASSERT_TRUE(src.has(name)) << name;
    auto t = src.load(name);
    ASSERT_TRUE(t.ok()) << t.status().to_string();
    EXPECT_EQ(static_cast<int64_t>(t->data.size()), t->numel()) << name;
    for (float v : t->data) ASSERT_TRUE(std::isfinite(v)) << name;
  }
  auto emb = src.load("token_embd.weight");
  EXPECT_EQ(emb->shape, (std::vector<int64_t>{512, 64}));
  EXPECT_EQ(src.load("blk.1.attn_k.weight")->shape, (std::vector<int64_t>{32, 64}));
  EXPECT_EQ(src.load("blk.1.ffn_down.weight")->shape, (std::vector<int64_t>{64, 160}));
  // The script draws norm gains uniformly from [0.5, 1.5] (stored as F32).
  auto norm = src.load("blk.0.ffn_norm.weight");
  ASSERT_TRUE(norm.ok());
  for (float v : norm->data) {
    EXPECT_GE(v, 0.5f);
    EXPECT_LE(v, 1.5f);
  }
}

// End to end through the Llama architecture on the CPU backend: the logits transformers computed
// for the same checkpoint (golden.json). This covers the loader (name mapping, BF16/F16/F32
// conversion, untied lm_head), half-split RoPE on Hugging Face's Q/K layout, llama3 frequency
// scaling (head_dim 16 has pairs in all three wavelength bands for original context 64) and GQA.
TEST(HfSource, TinyLlamaLogitsMatchTransformers) {
  const std::string dir = std::string(STARSERVE_GOLDEN_DIR) + "/tiny_llama";
  auto src = HfWeightSource::open(dir);
  ASSERT_TRUE(src.ok()) << src.status().to_string();
  std::unique_ptr<Backend> backend = make_cpu_backend(1);
  auto model = create_model(**src, *backend);
  ASSERT_TRUE(model.ok()) << model.status().to_string();
  const ModelHParams& hp = (*model)->hparams();

  std::ifstream in(dir + "/golden.json");
  const json golden = json::parse(in);
  // Both sides compute in fp32 from identical weights; only summation order (dot products of at
  // most 160 terms, 2 layers) and exp/sin/cos differ. Logits are O(4), where an fp32 ulp is 4.8e-7;
  // 2e-5 allows ~40 ulps (measured: 1.7e-6).
  constexpr float kTol = 2e-5f;
  for (const json& seq : golden.at("sequences")) {
    const std::vector<int32_t> ids = seq.at("token_ids").get<std::vector<int32_t>>();
    const bool all = seq.contains("all_logits");
    std::vector<float> want;
    if (all) {
      for (const json& row : seq.at("all_logits")) {
        for (const json& v : row) want.push_back(v.get<float>());
      }
    } else {
      want = seq.at("last_logits").get<std::vector<float>>();
    }

    KvCache cache(*backend, {hp.n_layers, hp.n_kv_heads, hp.head_dim, 16, 8});
    LocalAttention attn(*backend, cache, hp);
    std::vector<int32_t> positions(ids.size());
    std::iota(positions.begin(), positions.end(), 0);
    BatchSeq batch{1, ids, positions, all};
    std::vector<float> got;
    Status s = (*model)->forward({&batch, 1}, attn, &got);
    ASSERT_TRUE(s.ok()) << s.to_string();
    ASSERT_EQ(got.size(), want.size());
    float max_diff = 0.0f;
    for (size_t i = 0; i < want.size(); ++i) max_diff = std::max(max_diff, std::fabs(got[i] - want[i]));
    EXPECT_LT(max_diff, kTol) << ids.size() << " tokens";
    const size_t last = want.size() - static_cast<size_t>(hp.n_vocab);
    EXPECT_EQ(std::max_element(got.begin() + last, got.end()) - got.begin(),
              std::max_element(want.begin() + last, want.end()) - want.begin());
  }
}

}  // namespace
}  // namespace starserve
