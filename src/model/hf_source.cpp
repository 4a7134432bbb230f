#include "model/hf_source.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>
#include <vector>

#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

namespace starserve {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

constexpr int64_t kMaxInt = std::numeric_limits<int>::max();

// Member `key` of an object, nullptr when absent or null (transformers writes null for unset
// optional fields such as head_dim or rope_scaling).
const json* member(const json& obj, std::string_view key) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return nullptr;
  return &*it;
}

// An integer in [1, INT_MAX]; `fallback` when given and the key is absent.
Result<int> positive_int(const json& obj, std::string_view key, std::optional<int> fallback, std::string_view origin) {
  const json* v = member(obj, key);
  if (v == nullptr) {
    if (fallback) return *fallback;
    return not_found("{}: {} is missing", origin, key);
  }
  if (!v->is_number_integer()) return data_loss("{}: {} = {} must be an integer", origin, key, v->dump());
  const int64_t x = v->is_number_unsigned() ? static_cast<int64_t>(std::min<uint64_t>(v->get<uint64_t>(), kMaxInt + 1ull))
                                            : v->get<int64_t>();
  if (x <= 0 || x > kMaxInt) return data_loss("{}: {} = {} must be in [1, {}]", origin, key, v->dump(), kMaxInt);
  return static_cast<int>(x);
}

Result<float> positive_float(const json& obj, std::string_view key, float fallback, std::string_view origin) {
  const json* v = member(obj, key);
  if (v == nullptr) return fallback;
  if (!v->is_number()) return data_loss("{}: {} = {} must be a number", origin, key, v->dump());
  const double x = v->get<double>();
  if (!(x > 0.0) || !std::isfinite(static_cast<float>(x))) {
    return data_loss("{}: {} = {} must be a finite number > 0", origin, key, v->dump());
  }
  return static_cast<float>(x);
}

Result<bool> boolean(const json& obj, std::string_view key, bool fallback, std::string_view origin) {
  const json* v = member(obj, key);
  if (v == nullptr) return fallback;
  if (!v->is_boolean()) return data_loss("{}: {} = {} must be true or false", origin, key, v->dump());
  return v->get<bool>();
}

Result<std::string> string_or(const json& obj, std::string_view key, std::string_view fallback, std::string_view origin) {
  const json* v = member(obj, key);
  if (v == nullptr) return std::string(fallback);
  if (!v->is_string()) return data_loss("{}: {} = {} must be a string", origin, key, v->dump());
  return v->get<std::string>();
}

// RoPE base and scaling. transformers 4.x writes "rope_theta" at the top level and the scaling as
// "rope_scaling" {"rope_type" (older: "type"), "factor", ...}; 5.x writes both into
// "rope_parameters" {"rope_theta", "rope_type", "factor", ...}.
Status read_rope(const json& cfg, std::string_view origin, ModelHParams& hp) {
  const json* params = member(cfg, "rope_parameters");
  const json* scaling = member(cfg, "rope_scaling");
  if (params != nullptr && !params->is_object()) return data_loss("{}: rope_parameters must be an object", origin);
  if (scaling != nullptr && !scaling->is_object()) return data_loss("{}: rope_scaling must be an object", origin);

  hp.rope_theta = 10000.0f;
  if (member(cfg, "rope_theta") != nullptr) {
    SS_ASSIGN_OR_RETURN(hp.rope_theta, positive_float(cfg, "rope_theta", 10000.0f, origin));
  } else if (params != nullptr) {
    SS_ASSIGN_OR_RETURN(hp.rope_theta, positive_float(*params, "rope_theta", 10000.0f, origin));
  }

  const json* s = scaling != nullptr ? scaling : params;
  hp.rope_scaling = RopeScaling{};
  if (s == nullptr) return Status();
  const std::string where = fmt::format("{} ({})", origin, scaling != nullptr ? "rope_scaling" : "rope_parameters");
  std::string type;
  SS_ASSIGN_OR_RETURN(type, string_or(*s, "rope_type", "", where));
  if (type.empty()) {
    SS_ASSIGN_OR_RETURN(type, string_or(*s, "type", "default", where));
  }
  RopeScaling& rs = hp.rope_scaling;
  if (type == "default") return Status();
  if (type == "linear") {
    rs.type = RopeScaling::Type::kLinear;
    SS_ASSIGN_OR_RETURN(rs.factor, positive_float(*s, "factor", 1.0f, where));
    return Status();
  }
  if (type == "llama3") {
    rs.type = RopeScaling::Type::kLlama3;
    // transformers requires all four for llama3; so do we (no silent defaults for a scaling rule).
    for (const char* key : {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}) {
      if (member(*s, key) == nullptr) return not_found("{}: rope_type llama3 needs {}", where, key);
    }
    SS_ASSIGN_OR_RETURN(rs.factor, positive_float(*s, "factor", 1.0f, where));
    SS_ASSIGN_OR_RETURN(rs.low_freq_factor, positive_float(*s, "low_freq_factor", 1.0f, where));
    SS_ASSIGN_OR_RETURN(rs.high_freq_factor, positive_float(*s, "high_freq_factor", 4.0f, where));
    SS_ASSIGN_OR_RETURN(rs.original_context, positive_int(*s, "original_max_position_embeddings", std::nullopt, where));
    // The smoothing between the two wavelength bands divides by their difference.
    if (!(rs.high_freq_factor > rs.low_freq_factor)) {
      return data_loss("{}: llama3 high_freq_factor {} must be > low_freq_factor {}", where, rs.high_freq_factor,
                       rs.low_freq_factor);
    }
    return Status();
  }
  return unimplemented("{}: rope_type '{}' is not supported (default, linear, llama3)", where, type);
}

// Expected (out, in) shape of each canonical tensor, from the hyper-parameters.
std::optional<std::vector<int64_t>> expected_shape(const std::string& canonical, const ModelHParams& hp) {
  const int64_t hidden = hp.hidden, q_dim = int64_t{hp.n_heads} * hp.head_dim,
                kv_dim = int64_t{hp.n_kv_heads} * hp.head_dim, ffn = hp.ffn_hidden, vocab = hp.n_vocab;
  if (canonical == "token_embd.weight" || canonical == "output.weight") return std::vector<int64_t>{vocab, hidden};
  if (canonical == "output_norm.weight") return std::vector<int64_t>{hidden};
  const size_t dot = canonical.find('.', 4);  // after "blk.N"
  if (canonical.rfind("blk.", 0) != 0 || dot == std::string::npos) return std::nullopt;
  const std::string_view leaf = std::string_view(canonical).substr(dot + 1);
  if (leaf == "attn_norm.weight" || leaf == "ffn_norm.weight") return std::vector<int64_t>{hidden};
  if (leaf == "attn_q.weight") return std::vector<int64_t>{q_dim, hidden};
  if (leaf == "attn_k.weight" || leaf == "attn_v.weight") return std::vector<int64_t>{kv_dim, hidden};
  if (leaf == "attn_output.weight") return std::vector<int64_t>{hidden, q_dim};
  if (leaf == "ffn_gate.weight" || leaf == "ffn_up.weight") return std::vector<int64_t>{ffn, hidden};
  if (leaf == "ffn_down.weight") return std::vector<int64_t>{hidden, ffn};
  return std::nullopt;
}

constexpr const char* kLayerLeaves[] = {"attn_norm.weight", "attn_q.weight",   "attn_k.weight",
                                        "attn_v.weight",    "attn_output.weight", "ffn_norm.weight",
                                        "ffn_gate.weight",  "ffn_up.weight",   "ffn_down.weight"};

Result<std::string> read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return internal_error("cannot open {}", path.string());
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

std::string existing_or_empty(const fs::path& p) {
  std::error_code ec;
  return fs::is_regular_file(p, ec) ? p.string() : std::string();
}

}  // namespace

Result<ModelHParams> parse_hf_config(std::string_view json_text, std::string_view origin) {
  json cfg = json::parse(json_text.begin(), json_text.end(), nullptr, /*allow_exceptions=*/false);
  if (cfg.is_discarded()) return data_loss("{} is not valid JSON", origin);
  if (!cfg.is_object()) return data_loss("{} is a JSON {}, expected an object", origin, cfg.type_name());

  ModelHParams hp;
  SS_ASSIGN_OR_RETURN(hp.arch_name, string_or(cfg, "model_type", "", origin));
  if (hp.arch_name.empty()) return not_found("{}: model_type is missing", origin);
  if (hp.arch_name != "llama" && hp.arch_name != "mistral") {
    return unimplemented("{}: model_type '{}' is not supported (llama, mistral)", origin, hp.arch_name);
  }
  hp.arch = "llama";
  SS_ASSIGN_OR_RETURN(hp.name, string_or(cfg, "_name_or_path", "", origin));

  SS_ASSIGN_OR_RETURN(hp.n_layers, positive_int(cfg, "num_hidden_layers", std::nullopt, origin));
  SS_ASSIGN_OR_RETURN(hp.hidden, positive_int(cfg, "hidden_size", std::nullopt, origin));
  SS_ASSIGN_OR_RETURN(hp.ffn_hidden, positive_int(cfg, "intermediate_size", std::nullopt, origin));
  SS_ASSIGN_OR_RETURN(hp.n_heads, positive_int(cfg, "num_attention_heads", std::nullopt, origin));
  SS_ASSIGN_OR_RETURN(hp.n_kv_heads, positive_int(cfg, "num_key_value_heads", hp.n_heads, origin));
  if (hp.n_heads % hp.n_kv_heads != 0) {
    return data_loss("{}: num_attention_heads {} is not a multiple of num_key_value_heads {}", origin, hp.n_heads,
                     hp.n_kv_heads);
  }
  if (member(cfg, "head_dim") == nullptr && hp.hidden % hp.n_heads != 0) {
    return data_loss("{}: hidden_size {} is not a multiple of num_attention_heads {} and there is no head_dim", origin,
                     hp.hidden, hp.n_heads);
  }
  SS_ASSIGN_OR_RETURN(hp.head_dim, positive_int(cfg, "head_dim", hp.hidden / hp.n_heads, origin));
  if (hp.head_dim % 2 != 0) return data_loss("{}: head_dim {} must be even for RoPE", origin, hp.head_dim);
  hp.rope_dim = hp.head_dim;
  // Defaults are transformers' LlamaConfig defaults.
  SS_ASSIGN_OR_RETURN(hp.n_vocab, positive_int(cfg, "vocab_size", 32000, origin));
  SS_ASSIGN_OR_RETURN(hp.max_context, positive_int(cfg, "max_position_embeddings", 2048, origin));
  SS_ASSIGN_OR_RETURN(hp.rms_eps, positive_float(cfg, "rms_norm_eps", 1e-6f, origin));
  SS_ASSIGN_OR_RETURN(hp.tied_embeddings, boolean(cfg, "tie_word_embeddings", false, origin));
  SS_RETURN_IF_ERROR(read_rope(cfg, origin, hp));
  hp.rope_style = RopeStyle::kHalf;

  // Features of the config classes that the Llama architecture file does not implement.
  SS_ASSIGN_OR_RETURN(bool attention_bias, boolean(cfg, "attention_bias", false, origin));
  SS_ASSIGN_OR_RETURN(bool mlp_bias, boolean(cfg, "mlp_bias", false, origin));
  if (attention_bias || mlp_bias) {
    return unimplemented("{}: {} = true is not supported (no bias terms)", origin,
                         attention_bias ? "attention_bias" : "mlp_bias");
  }
  SS_ASSIGN_OR_RETURN(std::string act, string_or(cfg, "hidden_act", "silu", origin));
  if (act != "silu") return unimplemented("{}: hidden_act '{}' is not supported (silu)", origin, act);
  if (const json* sw = member(cfg, "sliding_window")) {
    if (!sw->is_number_integer()) return data_loss("{}: sliding_window = {} must be an integer", origin, sw->dump());
    if (sw->get<int64_t>() < hp.max_context) {
      return unimplemented("{}: sliding_window {} < max_position_embeddings {} is not supported", origin,
                           sw->get<int64_t>(), hp.max_context);
    }
  }
  return hp;
}

std::optional<std::string> hf_to_canonical_name(std::string_view n) {
  if (n == "model.embed_tokens.weight") return "token_embd.weight";
  if (n == "model.norm.weight") return "output_norm.weight";
  if (n == "lm_head.weight") return "output.weight";
  constexpr std::string_view kLayers = "model.layers.";
  if (n.substr(0, kLayers.size()) != kLayers) return std::nullopt;
  n.remove_prefix(kLayers.size());
  size_t digits = 0;
  while (digits < n.size() && n[digits] >= '0' && n[digits] <= '9') ++digits;
  // A layer index is a plain decimal without leading zeros ("07" would alias layer 7).
  if (digits == 0 || digits > 9 || digits >= n.size() || n[digits] != '.' || (digits > 1 && n[0] == '0')) {
    return std::nullopt;
  }
  const std::string_view layer = n.substr(0, digits);
  const std::string_view leaf = n.substr(digits + 1);
  static constexpr std::pair<std::string_view, std::string_view> kLeaves[] = {
      {"input_layernorm.weight", "attn_norm.weight"},
      {"self_attn.q_proj.weight", "attn_q.weight"},
      {"self_attn.k_proj.weight", "attn_k.weight"},
      {"self_attn.v_proj.weight", "attn_v.weight"},
      {"self_attn.o_proj.weight", "attn_output.weight"},
      {"post_attention_layernorm.weight", "ffn_norm.weight"},
      {"mlp.gate_proj.weight", "ffn_gate.weight"},
      {"mlp.up_proj.weight", "ffn_up.weight"},
      {"mlp.down_proj.weight", "ffn_down.weight"},
  };
  for (const auto& [hf, canonical] : kLeaves) {
    if (leaf == hf) return fmt::format("blk.{}.{}", layer, canonical);
  }
  return std::nullopt;
}

Result<std::unique_ptr<HfWeightSource>> HfWeightSource::open(const std::string& dir) {
  const fs::path root(dir);
  const fs::path config_path = root / "config.json";
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return not_found("hf: {} is not a directory", dir);
  if (!fs::is_regular_file(config_path, ec)) return not_found("hf: {} has no config.json", dir);
  SS_ASSIGN_OR_RETURN(std::string config_text, read_text(config_path));
  SS_ASSIGN_OR_RETURN(ModelHParams hp, parse_hf_config(config_text, config_path.string()));
  if (hp.name.empty()) hp.name = root.filename().empty() ? root.parent_path().filename().string() : root.filename().string();

  std::unique_ptr<HfWeightSource> src(new HfWeightSource());
  src->dir_ = dir;
  SS_ASSIGN_OR_RETURN(src->ckpt_, safetensors::Checkpoint::open_dir(dir));

  for (const std::string& name : src->ckpt_->names()) {
    const safetensors::TensorInfo* t = src->ckpt_->find(name);
    std::optional<std::string> canonical = hf_to_canonical_name(name);
    if (!canonical) {
      // Bias terms would be silently dropped otherwise; everything else unknown (e.g. the rotary
      // inv_freq buffer older checkpoints saved) is recomputed or unused.
      if (name.size() >= 5 && name.compare(name.size() - 5, 5, ".bias") == 0) {
        return unimplemented("hf: tensor '{}' is a bias, which the llama architecture does not have", name);
      }
      ++src->n_ignored_;
      continue;
    }
    if (t->dtype != safetensors::Dtype::kF32 && t->dtype != safetensors::Dtype::kF16 &&
        t->dtype != safetensors::Dtype::kBF16) {
      return unimplemented("hf: tensor '{}' has dtype {}; only F32, F16 and BF16 are supported", name,
                           safetensors::dtype_name(t->dtype));
    }
    if (canonical->rfind("blk.", 0) == 0) {
      const int layer = std::stoi(canonical->substr(4));
      if (layer >= hp.n_layers) {
        return data_loss("hf: tensor '{}' is for layer {} but num_hidden_layers is {}", name, layer, hp.n_layers);
      }
    }
    const std::optional<std::vector<int64_t>> want = expected_shape(*canonical, hp);
    if (want && t->shape != *want) {
      return data_loss("hf: tensor '{}' has shape [{}], expected [{}] from config.json", name,
                       fmt::join(t->shape, ", "), fmt::join(*want, ", "));
    }
    src->tensors_.emplace(*canonical, t);
  }

  // Checked here so that a truncated checkpoint fails at open with the Hugging Face name rather
  // than halfway through building the model.
  std::vector<std::string> required = {"token_embd.weight", "output_norm.weight"};
  for (int l = 0; l < hp.n_layers; ++l) {
    for (const char* leaf : kLayerLeaves) required.push_back(fmt::format("blk.{}.{}", l, leaf));
  }
  for (const std::string& name : required) {
    if (src->tensors_.find(name) == src->tensors_.end()) {
      return data_loss("hf: {} has no tensor for {} (config.json has {} layers)", dir, name, hp.n_layers);
    }
  }
  if (hp.tied_embeddings || src->tensors_.find("output.weight") == src->tensors_.end()) {
    hp.tied_embeddings = true;
    src->tensors_.erase("output.weight");
  }
  src->hparams_ = std::move(hp);
  src->tokenizer_json_ = existing_or_empty(root / "tokenizer.json");
  src->tokenizer_config_ = existing_or_empty(root / "tokenizer_config.json");
  return src;
}

bool HfWeightSource::has(const std::string& name) const { return tensors_.find(name) != tensors_.end(); }

Result<HostTensor> HfWeightSource::load(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) return not_found("hf: no tensor {} in {}", name, dir_);
  const safetensors::TensorInfo& t = *it->second;
  HostTensor out;
  out.shape = t.shape;
  out.data.resize(static_cast<size_t>(t.numel));
  SS_RETURN_IF_ERROR(safetensors::to_f32(t, out.data.data()));
  return out;
}

std::string HfWeightSource::describe() const {
  std::set<std::string_view> dtypes;
  for (const auto& [name, t] : tensors_) dtypes.insert(safetensors::dtype_name(t->dtype));
  std::string s = fmt::format("safetensors, {} file{}, {} tensors ({}), {} '{}'", ckpt_->n_files(),
                              ckpt_->n_files() == 1 ? "" : "s", tensors_.size(), fmt::join(dtypes, ", "),
                              hparams_.arch_name, hparams_.name);
  if (n_ignored_ > 0) s += fmt::format(", {} other tensors ignored", n_ignored_);
  return s;
}

std::string HfWeightSource::hf_name(const std::string& canonical) const {
  auto it = tensors_.find(canonical);
  return it == tensors_.end() ? std::string() : it->second->name;
}

}  // namespace starserve
