#include "model/hf_source.h"

#include <algorithm>
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
  if (type == "longrope" || type == "su") {
    // Phi-3's LongRoPE (transformers: _compute_longrope_parameters). The original context is in
    // the scaling object (5.x) or at the top level (Phi3Config); the attention factor is given or
    // follows from factor (given, or max_position_embeddings / original context).
    rs.type = RopeScaling::Type::kLongRope;
    for (const char* key : {"short_factor", "long_factor"}) {
      const json* a = member(*s, key);
      if (a == nullptr) return not_found("{}: rope_type longrope needs {}", where, key);
      if (!a->is_array() || a->empty()) return data_loss("{}: {} must be a non-empty array of numbers", where, key);
      std::vector<float>& dst = std::string_view(key) == "short_factor" ? rs.short_factor : rs.long_factor;
      for (const json& x : *a) {
        if (!x.is_number()) return data_loss("{}: {} must be a non-empty array of numbers", where, key);
        dst.push_back(x.get<float>());
      }
    }
    const json& orig_holder = member(*s, "original_max_position_embeddings") != nullptr ? *s : cfg;
    if (member(orig_holder, "original_max_position_embeddings") == nullptr) {
      return not_found("{}: rope_type longrope needs original_max_position_embeddings", where);
    }
    SS_ASSIGN_OR_RETURN(rs.original_context,
                        positive_int(orig_holder, "original_max_position_embeddings", std::nullopt, where));
    double factor = static_cast<double>(hp.max_context) / rs.original_context;
    if (member(*s, "factor") != nullptr) {
      SS_ASSIGN_OR_RETURN(float given, positive_float(*s, "factor", 1.0f, where));
      factor = given;
    }
    if (member(*s, "attention_factor") != nullptr) {
      SS_ASSIGN_OR_RETURN(rs.attn_factor, positive_float(*s, "attention_factor", 1.0f, where));
    } else {
      rs.attn_factor = factor <= 1.0 ? 1.0f
                                     : static_cast<float>(std::sqrt(1.0 + std::log(factor) / std::log(
                                                                              static_cast<double>(rs.original_context))));
    }
    return Status();
  }
  return unimplemented("{}: rope_type '{}' is not supported (default, linear, llama3, longrope)", where, type);
}

// Attamba's keys (docs/specs/attamba.md, "Files"). K = SSM_k(h) + h and V = SSM_v(h) + h have the
// model's width, so n_kv_heads = n_heads and n_heads * head_dim = hidden.
Status read_attamba(const json& cfg, std::string_view origin, ModelHParams& hp) {
  AttambaHParams& a = hp.attamba;
  SS_ASSIGN_OR_RETURN(a.chunk, positive_int(cfg, "attamba_chunk_size", std::nullopt, origin));
  const json* lead = member(cfg, "attamba_leading_tokens");
  if (lead == nullptr) return not_found("{}: attamba_leading_tokens is missing", origin);
  if (!lead->is_number_integer() || lead->get<int64_t>() < 0 || lead->get<int64_t>() > kMaxInt) {
    return data_loss("{}: attamba_leading_tokens = {} must be an integer >= 0", origin, lead->dump());
  }
  a.leading = static_cast<int>(lead->get<int64_t>());
  SS_ASSIGN_OR_RETURN(a.cyclic_offsets, boolean(cfg, "attamba_cyclic_offsets", true, origin));
  SS_ASSIGN_OR_RETURN(a.d_inner, positive_int(cfg, "ssm_d_inner", std::nullopt, origin));
  SS_ASSIGN_OR_RETURN(a.d_state, positive_int(cfg, "ssm_d_state", std::nullopt, origin));
  SS_ASSIGN_OR_RETURN(a.n_heads, positive_int(cfg, "ssm_n_heads", std::nullopt, origin));
  SS_ASSIGN_OR_RETURN(a.n_groups, positive_int(cfg, "ssm_n_groups", 1, origin));
  SS_ASSIGN_OR_RETURN(a.conv_width, positive_int(cfg, "ssm_conv_width", 4, origin));
  if (hp.n_kv_heads != hp.n_heads) {
    return data_loss("{}: attamba needs num_key_value_heads = num_attention_heads ({} != {})", origin, hp.n_kv_heads,
                     hp.n_heads);
  }
  if (int64_t{hp.n_heads} * hp.head_dim != hp.hidden) {
    return data_loss("{}: attamba needs num_attention_heads x head_dim = hidden_size ({} x {} != {})", origin,
                     hp.n_heads, hp.head_dim, hp.hidden);
  }
  if (a.d_inner % a.n_heads != 0 || a.n_heads % a.n_groups != 0) {
    return data_loss("{}: ssm_d_inner {} must be a multiple of ssm_n_heads {}, which must be a multiple of "
                     "ssm_n_groups {}",
                     origin, a.d_inner, a.n_heads, a.n_groups);
  }
  return Status();
}

// Expected (out, in) shape of each canonical tensor, from the hyper-parameters.
std::optional<std::vector<int64_t>> expected_shape(const std::string& canonical, const ModelHParams& hp) {
  const int64_t qkv_rows = int64_t{hp.n_heads + 2 * hp.n_kv_heads} * hp.head_dim;
  const int64_t hidden = hp.hidden, q_dim = int64_t{hp.n_heads} * hp.head_dim,
                kv_dim = int64_t{hp.n_kv_heads} * hp.head_dim, ffn = hp.ffn_hidden, vocab = hp.n_vocab;
  if (canonical == "token_embd.weight" || canonical == "output.weight") return std::vector<int64_t>{vocab, hidden};
  if (canonical == "output_norm.weight" || canonical == "output_norm.bias") return std::vector<int64_t>{hidden};
  if (canonical == "position_embd.weight") return std::vector<int64_t>{hp.max_context, hidden};
  const size_t dot = canonical.find('.', 4);  // after "blk.N"
  if (canonical.rfind("blk.", 0) != 0 || dot == std::string::npos) return std::nullopt;
  const std::string_view leaf = std::string_view(canonical).substr(dot + 1);
  // GPT-2's LayerNorm and projection biases.
  if (leaf == "attn_norm.bias" || leaf == "ffn_norm.bias" || leaf == "attn_output.bias" || leaf == "ffn_down.bias") {
    return std::vector<int64_t>{hidden};
  }
  if (leaf == "attn_qkv.bias") return std::vector<int64_t>{qkv_rows};
  // The LayerNorm-free GPT-2's fused FFN, its residual scalars and the temperature.
  if (leaf == "ffn_fused.weight") return std::vector<int64_t>{hidden, hidden};
  if (leaf == "ffn_fused.bias") return std::vector<int64_t>{hidden};
  if (leaf == "ffn_alpha" || leaf == "ffn_beta") return std::vector<int64_t>{1};
  if (leaf == "attn_temperature") return std::vector<int64_t>{hp.n_heads, hp.max_context};
  if (leaf == "ffn_up.bias") return std::vector<int64_t>{ffn};
  if (leaf == "attn_norm.weight" || leaf == "ffn_norm.weight" || leaf == "post_attention_norm.weight" ||
      leaf == "post_ffw_norm.weight") {
    return std::vector<int64_t>{hidden};
  }
  if (leaf == "attn_q_norm.weight" || leaf == "attn_k_norm.weight") return std::vector<int64_t>{hp.head_dim};
  if (leaf == "attn_q.bias") return std::vector<int64_t>{q_dim};
  if (leaf == "attn_k.bias" || leaf == "attn_v.bias") return std::vector<int64_t>{kv_dim};
  if (leaf == "attn_qkv.weight") return std::vector<int64_t>{qkv_rows, hidden};
  if (leaf == "ffn_up.weight" && hp.arch == "phi3") return std::vector<int64_t>{2 * ffn, hidden};
  if (leaf == "attn_k_shift" || leaf == "attn_v_shift") return std::vector<int64_t>{hp.n_kv_heads, 2};
  if (hp.attamba.enabled() && (leaf.substr(0, 6) == "k_ssm." || leaf.substr(0, 6) == "v_ssm.")) {
    const AttambaHParams& a = hp.attamba;
    const std::string_view part = leaf.substr(6);
    if (part == "in_proj.weight") return std::vector<int64_t>{a.in_proj_rows(), hidden};
    if (part == "conv1d.weight") return std::vector<int64_t>{a.conv_dim(), 1, a.conv_width};
    if (part == "conv1d.bias") return std::vector<int64_t>{a.conv_dim()};
    if (part == "dt_bias" || part == "A_log" || part == "D") return std::vector<int64_t>{a.n_heads};
    if (part == "norm.weight") return std::vector<int64_t>{a.d_inner};
    if (part == "out_proj.weight") return std::vector<int64_t>{hidden, a.d_inner};
    return std::nullopt;
  }
  if (leaf == "attn_q.weight") return std::vector<int64_t>{q_dim, hidden};
  if (leaf == "attn_k.weight" || leaf == "attn_v.weight") return std::vector<int64_t>{kv_dim, hidden};
  if (leaf == "attn_output.weight") return std::vector<int64_t>{hidden, q_dim};
  if (leaf == "ffn_gate.weight" || leaf == "ffn_up.weight") return std::vector<int64_t>{ffn, hidden};
  if (leaf == "ffn_down.weight") return std::vector<int64_t>{hidden, ffn};
  return std::nullopt;
}

// An Attamba SSM's tensors, under self_attn.{k,v}_ssm. (HF) and blk.N.{k,v}_ssm. (canonical).
constexpr std::string_view kAttambaSsmLeaves[] = {"in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias",
                                                   "A_log",          "D",             "norm.weight", "out_proj.weight"};
// Interned "k_ssm.in_proj.weight" etc., so that layer_leaves can hand out views.
std::string_view attamba_leaf(std::string_view ssm, std::string_view part) {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> n;
    for (std::string_view s : {"k_ssm.", "v_ssm."}) {
      for (std::string_view p : kAttambaSsmLeaves) n.push_back(std::string(s) + std::string(p));
    }
    return n;
  }();
  for (const std::string& n : names) {
    if (n.size() == ssm.size() + part.size() && n.compare(0, ssm.size(), ssm) == 0 &&
        n.compare(ssm.size(), part.size(), part) == 0) {
      return n;
    }
  }
  return {};
}

// The canonical tensors every layer of an architecture must have.
std::vector<std::string_view> layer_leaves(const std::string& arch) {
  std::vector<std::string_view> v = {"attn_norm.weight", "attn_output.weight", "ffn_norm.weight", "ffn_up.weight",
                                     "ffn_down.weight"};
  if (arch == "gpt2") {
    for (std::string_view leaf : {"attn_qkv.weight", "attn_norm.bias", "attn_qkv.bias", "attn_output.bias",
                                  "ffn_norm.bias", "ffn_up.bias", "ffn_down.bias"}) {
      v.push_back(leaf);
    }
    return v;
  }
  if (arch == "gpt2_lnfree") {
    return {"attn_qkv.weight", "attn_qkv.bias",  "attn_output.weight", "attn_output.bias",
            "ffn_fused.weight", "ffn_fused.bias", "ffn_alpha",          "ffn_beta"};
  }
  if (arch == "phi3") {
    v.push_back("attn_qkv.weight");
    return v;
  }
  if (arch == "attamba") {
    // K and V come from the two SSMs (k_ssm, v_ssm) with a residual, not from projections.
    for (std::string_view leaf : {"attn_q.weight", "ffn_gate.weight"}) v.push_back(leaf);
    for (std::string_view ssm : {"k_ssm.", "v_ssm."}) {
      for (std::string_view part : kAttambaSsmLeaves) v.push_back(attamba_leaf(ssm, part));
    }
    return v;
  }
  for (std::string_view leaf : {"attn_q.weight", "attn_k.weight", "attn_v.weight", "ffn_gate.weight"}) v.push_back(leaf);
  if (arch == "qwen2") {
    for (std::string_view leaf : {"attn_q.bias", "attn_k.bias", "attn_v.bias"}) v.push_back(leaf);
  }
  if (arch == "qwen3" || arch == "gemma3") {
    for (std::string_view leaf : {"attn_q_norm.weight", "attn_k_norm.weight"}) v.push_back(leaf);
  }
  if (arch == "gemma2" || arch == "gemma3") {
    for (std::string_view leaf : {"post_attention_norm.weight", "post_ffw_norm.weight"}) v.push_back(leaf);
  }
  if (arch == "kvshift") {
    for (std::string_view leaf : {"attn_k_shift", "attn_v_shift"}) v.push_back(leaf);
  }
  return v;
}

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

// GPT-2's config.json (transformers GPT2Config): its own key names, learned positions, LayerNorm.
// Defaults are GPT2Config's.
Result<ModelHParams> parse_gpt2_config(const json& cfg, std::string_view origin, ModelHParams hp) {
  hp.arch = hp.arch_name;  // gpt2 or gpt2_lnfree
  SS_ASSIGN_OR_RETURN(hp.n_layers, positive_int(cfg, "n_layer", std::nullopt, origin));
  SS_ASSIGN_OR_RETURN(hp.hidden, positive_int(cfg, "n_embd", std::nullopt, origin));
  SS_ASSIGN_OR_RETURN(hp.n_heads, positive_int(cfg, "n_head", std::nullopt, origin));
  if (hp.hidden % hp.n_heads != 0) {
    return data_loss("{}: n_embd {} is not a multiple of n_head {}", origin, hp.hidden, hp.n_heads);
  }
  hp.n_kv_heads = hp.n_heads;
  hp.head_dim = hp.hidden / hp.n_heads;
  if (int64_t{hp.hidden} * 4 > kMaxInt) return data_loss("{}: n_embd {} is too large", origin, hp.hidden);
  SS_ASSIGN_OR_RETURN(hp.ffn_hidden, positive_int(cfg, "n_inner", 4 * hp.hidden, origin));  // null: 4 n_embd
  SS_ASSIGN_OR_RETURN(hp.n_vocab, positive_int(cfg, "vocab_size", 50257, origin));
  SS_ASSIGN_OR_RETURN(hp.max_context, positive_int(cfg, "n_positions", 1024, origin));
  SS_ASSIGN_OR_RETURN(hp.rms_eps, positive_float(cfg, "layer_norm_epsilon", 1e-5f, origin));
  SS_ASSIGN_OR_RETURN(hp.tied_embeddings, boolean(cfg, "tie_word_embeddings", true, origin));
  hp.rope_dim = 0;
  hp.learned_positions = true;
  const bool lnfree = hp.arch == "gpt2_lnfree";
  hp.layer_norm = !lnfree;
  if (lnfree) {
    // docs/specs/lnfree-gpt2.md "Config layout": no LayerNorm, the linear FFN fused into one d x d
    // matrix, the residual scalars alpha / beta, optionally the temperature t[h, i].
    SS_ASSIGN_OR_RETURN(std::string act, string_or(cfg, "activation_function", "linear", origin));
    SS_ASSIGN_OR_RETURN(std::string ffn, string_or(cfg, "lnfree_ffn", "fused", origin));
    SS_ASSIGN_OR_RETURN(bool scaling, boolean(cfg, "lnfree_residual_scaling", true, origin));
    SS_ASSIGN_OR_RETURN(hp.attn_temperature, boolean(cfg, "lnfree_attn_temperature", false, origin));
    if (act != "linear" || ffn != "fused" || !scaling) {
      return unimplemented("{}: {} is not supported for model_type 'gpt2_lnfree' (activation_function 'linear', "
                           "lnfree_ffn 'fused', lnfree_residual_scaling true)",
                           origin,
                           act != "linear" ? fmt::format("activation_function '{}'", act)
                           : ffn != "fused" ? fmt::format("lnfree_ffn '{}'", ffn)
                                            : std::string("lnfree_residual_scaling false"));
    }
  } else {
    // "gelu_new" and "gelu_pytorch_tanh" are the same tanh approximation; the exact (erf) GELU and
    // other activations are not what the backend's gelu_tanh computes.
    SS_ASSIGN_OR_RETURN(std::string act, string_or(cfg, "activation_function", "gelu_new", origin));
    if (act != "gelu_new" && act != "gelu_pytorch_tanh") {
      return unimplemented("{}: activation_function '{}' is not supported (gelu_new, gelu_pytorch_tanh)", origin,
                           act);
    }
  }
  // Attention variants of GPT2Config that the blocks here do not have.
  SS_ASSIGN_OR_RETURN(bool scale, boolean(cfg, "scale_attn_weights", true, origin));
  SS_ASSIGN_OR_RETURN(bool by_layer, boolean(cfg, "scale_attn_by_inverse_layer_idx", false, origin));
  SS_ASSIGN_OR_RETURN(bool cross, boolean(cfg, "add_cross_attention", false, origin));
  if (!scale || by_layer || cross) {
    return unimplemented("{}: {} is not supported for model_type '{}'", origin, hp.arch_name,
                         !scale ? "scale_attn_weights = false"
                                : by_layer ? "scale_attn_by_inverse_layer_idx = true" : "add_cross_attention = true");
  }
  return hp;
}

}  // namespace

Result<ModelHParams> parse_hf_config(std::string_view json_text, std::string_view origin) {
  json cfg = json::parse(json_text.begin(), json_text.end(), nullptr, /*allow_exceptions=*/false);
  if (cfg.is_discarded()) return data_loss("{} is not valid JSON", origin);
  if (!cfg.is_object()) return data_loss("{} is a JSON {}, expected an object", origin, cfg.type_name());

  ModelHParams hp;
  SS_ASSIGN_OR_RETURN(hp.arch_name, string_or(cfg, "model_type", "", origin));
  if (hp.arch_name.empty()) return not_found("{}: model_type is missing", origin);
  SS_ASSIGN_OR_RETURN(std::string name_or_path, string_or(cfg, "_name_or_path", "", origin));
  // Gemma 3's multimodal checkpoints nest the language model's config as text_config.
  if (hp.arch_name == "gemma3") {
    const json* text = member(cfg, "text_config");
    if (text == nullptr || !text->is_object()) return not_found("{}: model_type gemma3 without a text_config", origin);
    json inner = *text;
    inner["model_type"] = "gemma3_text";
    cfg = std::move(inner);
    hp.arch_name = "gemma3_text";
  }
  const std::string& mt = hp.arch_name;
  if (mt == "gpt2" || mt == "gpt2_lnfree") {
    hp.name = name_or_path;
    return parse_gpt2_config(cfg, origin, std::move(hp));
  }
  if (mt == "llama" || mt == "mistral") {
    hp.arch = "llama";
  } else if (mt == "qwen2" || mt == "qwen3" || mt == "gemma2" || mt == "phi3") {
    hp.arch = mt;
  } else if (mt == "gemma3_text") {
    hp.arch = "gemma3";
  } else if (mt == "kvshift_llama") {
    // Llama blocks with KV-shifting attention (scripts/reference/starref/export.py writes them).
    hp.arch = "kvshift";
    hp.kv_shift = true;
  } else if (mt == "attamba") {
    // Attamba (arXiv 2411.17685; scripts/reference/starref/export.py writes it): docs/specs/attamba.md.
    hp.arch = "attamba";
  } else {
    return unimplemented("{}: model_type '{}' is not supported (llama, mistral, qwen2, qwen3, gemma2, gemma3, "
                         "gemma3_text, phi3, gpt2, gpt2_lnfree, kvshift_llama, attamba)",
                         origin, mt);
  }
  const bool gemma = hp.arch == "gemma2" || hp.arch == "gemma3";
  hp.name = name_or_path;

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
  // The head_dim defaults of the config classes: Qwen3 128, Gemma 256, else hidden / n_heads.
  const int default_head_dim = hp.arch == "qwen3" ? 128 : gemma ? 256 : hp.hidden / hp.n_heads;
  SS_ASSIGN_OR_RETURN(hp.head_dim, positive_int(cfg, "head_dim", default_head_dim, origin));
  if (hp.head_dim % 2 != 0) return data_loss("{}: head_dim {} must be even for RoPE", origin, hp.head_dim);
  hp.rope_dim = hp.head_dim;
  // Defaults are transformers' LlamaConfig defaults.
  SS_ASSIGN_OR_RETURN(hp.n_vocab, positive_int(cfg, "vocab_size", 32000, origin));
  SS_ASSIGN_OR_RETURN(hp.max_context, positive_int(cfg, "max_position_embeddings", 2048, origin));
  SS_ASSIGN_OR_RETURN(hp.rms_eps, positive_float(cfg, "rms_norm_eps", 1e-6f, origin));
  SS_ASSIGN_OR_RETURN(hp.tied_embeddings, boolean(cfg, "tie_word_embeddings", gemma, origin));
  if (const json* rp = member(cfg, "rope_parameters"); rp != nullptr && rp->is_object() && rp->contains("full_attention")) {
    // transformers 5.x Gemma 3: one RoPE per layer type; the global layers' may be scaled.
    json global = cfg;
    global["rope_parameters"] = (*rp)["full_attention"];
    SS_RETURN_IF_ERROR(read_rope(global, origin, hp));
    if (const json* local = member(*rp, "sliding_attention")) {
      json local_cfg = cfg;
      local_cfg["rope_parameters"] = *local;
      ModelHParams lp;
      SS_RETURN_IF_ERROR(read_rope(local_cfg, origin, lp));
      if (lp.rope_scaling.type != RopeScaling::Type::kNone) {
        return unimplemented("{}: RoPE scaling of the sliding-window layers is not supported", origin);
      }
      hp.rope_theta_local = lp.rope_theta;
    }
  } else {
    SS_RETURN_IF_ERROR(read_rope(cfg, origin, hp));
    if (hp.arch == "gemma3") {
      SS_ASSIGN_OR_RETURN(hp.rope_theta_local, positive_float(cfg, "rope_local_base_freq", 10000.0f, origin));
    }
  }
  hp.rope_style = RopeStyle::kHalf;
  if (hp.arch == "phi3") {
    // Partial rotation: the first partial_rotary_factor of each head's dimensions (4.x: top level,
    // 5.x: inside rope_parameters).
    const json* rp = member(cfg, "rope_parameters");
    const json& holder = rp != nullptr && rp->contains("partial_rotary_factor") ? *rp : cfg;
    SS_ASSIGN_OR_RETURN(float factor, positive_float(holder, "partial_rotary_factor", 1.0f, origin));
    hp.rope_dim = static_cast<int>(static_cast<float>(hp.head_dim) * factor);
    if (factor > 1.0f || hp.rope_dim % 2 != 0 || hp.rope_dim == 0) {
      return data_loss("{}: partial_rotary_factor {} gives {} rotated dimensions of {}", origin, factor, hp.rope_dim,
                       hp.head_dim);
    }
  }

  // Biases: Qwen2's q/k/v biases are part of the architecture; elsewhere attention_bias would add
  // an output bias too, and mlp_bias MLP biases, neither of which the architecture files have.
  SS_ASSIGN_OR_RETURN(bool attention_bias, boolean(cfg, "attention_bias", false, origin));
  SS_ASSIGN_OR_RETURN(bool mlp_bias, boolean(cfg, "mlp_bias", false, origin));
  if ((attention_bias && hp.arch != "qwen2") || mlp_bias) {
    return unimplemented("{}: {} = true is not supported for model_type '{}'", origin,
                         mlp_bias ? "mlp_bias" : "attention_bias", mt);
  }
  const char* act_key = gemma ? "hidden_activation" : "hidden_act";
  SS_ASSIGN_OR_RETURN(std::string act, string_or(cfg, act_key, gemma ? "gelu_pytorch_tanh" : "silu", origin));
  const char* want_act = gemma ? "gelu_pytorch_tanh" : "silu";
  if (act != want_act) return unimplemented("{}: {} '{}' is not supported ({})", origin, act_key, act, want_act);

  // Sliding windows: which layers have one (layer_types where the file has it, else each family's
  // rule) and how wide.
  if (const json* sw = member(cfg, "sliding_window")) {
    if (!sw->is_number_integer() || sw->get<int64_t>() <= 0 || sw->get<int64_t>() > kMaxInt) {
      return data_loss("{}: sliding_window = {} must be a positive integer", origin, sw->dump());
    }
    hp.sliding_window = static_cast<int>(sw->get<int64_t>());
  }
  if (const json* lt = member(cfg, "layer_types")) {
    if (!lt->is_array() || static_cast<int>(lt->size()) != hp.n_layers) {
      return data_loss("{}: layer_types must list {} layer types", origin, hp.n_layers);
    }
    hp.sliding_layers.assign(hp.n_layers, 0);
    for (int l = 0; l < hp.n_layers; ++l) {
      const json& t = (*lt)[l];
      if (t == "sliding_attention") {
        hp.sliding_layers[l] = 1;
      } else if (t != "full_attention") {
        return unimplemented("{}: layer_types[{}] = {} is not supported (full_attention, sliding_attention)", origin,
                             l, t.dump());
      }
    }
  } else if (hp.arch == "qwen2" || hp.arch == "qwen3") {
    // Qwen: windows only with use_sliding_window, on the layers from max_window_layers on.
    SS_ASSIGN_OR_RETURN(bool use, boolean(cfg, "use_sliding_window", false, origin));
    SS_ASSIGN_OR_RETURN(int from, positive_int(cfg, "max_window_layers", 28, origin));
    hp.sliding_layers.assign(hp.n_layers, 0);
    for (int l = 0; l < hp.n_layers; ++l) hp.sliding_layers[l] = use && l >= from ? 1 : 0;
  } else if (gemma) {
    SS_ASSIGN_OR_RETURN(int period, positive_int(cfg, "sliding_window_pattern", hp.arch == "gemma2" ? 2 : 6, origin));
    hp.sliding_layers.assign(hp.n_layers, 0);
    for (int l = 0; l < hp.n_layers; ++l) hp.sliding_layers[l] = (l + 1) % period != 0 ? 1 : 0;
  }
  if (hp.sliding_window == 0) hp.sliding_layers.clear();
  if (hp.arch == "attamba") SS_RETURN_IF_ERROR(read_attamba(cfg, origin, hp));

  if (gemma) {
    hp.norm_weight_offset = 1.0f;  // Gemma's RMSNorm multiplies by (1 + w)
    hp.embed_scale = std::sqrt(static_cast<float>(hp.hidden));
    SS_ASSIGN_OR_RETURN(int qpas, positive_int(cfg, "query_pre_attn_scalar", 256, origin));
    hp.attn_scale = 1.0f / std::sqrt(static_cast<float>(qpas));
    SS_ASSIGN_OR_RETURN(hp.attn_softcap, positive_float(cfg, "attn_logit_softcapping", 0.0f, origin));
    SS_ASSIGN_OR_RETURN(hp.final_softcap, positive_float(cfg, "final_logit_softcapping", 0.0f, origin));
    SS_ASSIGN_OR_RETURN(bool bidirectional, boolean(cfg, "use_bidirectional_attention", false, origin));
    if (bidirectional) return unimplemented("{}: use_bidirectional_attention = true is not supported", origin);
  }
  return hp;
}

namespace {

// GPT-2's names, with or without the "transformer." prefix (GPT2LMHeadModel's state dict has it,
// the original checkpoints' GPT2Model does not); nullopt for the causal-mask buffers
// (h.N.attn.bias, h.N.attn.masked_bias) and anything else.
std::optional<std::string> gpt2_canonical_name(std::string_view n) {
  if (n == "lm_head.weight") return "output.weight";
  constexpr std::string_view kPrefix = "transformer.";
  if (n.substr(0, kPrefix.size()) == kPrefix) n.remove_prefix(kPrefix.size());
  if (n == "wte.weight") return "token_embd.weight";
  if (n == "wpe.weight") return "position_embd.weight";
  if (n == "ln_f.weight") return "output_norm.weight";
  if (n == "ln_f.bias") return "output_norm.bias";
  if (n.substr(0, 2) != "h.") return std::nullopt;
  n.remove_prefix(2);
  size_t digits = 0;
  while (digits < n.size() && n[digits] >= '0' && n[digits] <= '9') ++digits;
  if (digits == 0 || digits > 9 || digits >= n.size() || n[digits] != '.' || (digits > 1 && n[0] == '0')) {
    return std::nullopt;
  }
  const std::string_view layer = n.substr(0, digits);
  const std::string_view leaf = n.substr(digits + 1);
  static constexpr std::pair<std::string_view, std::string_view> kLeaves[] = {
      {"ln_1.", "attn_norm."},        {"attn.c_attn.", "attn_qkv."}, {"attn.c_proj.", "attn_output."},
      {"ln_2.", "ffn_norm."},         {"mlp.c_fc.", "ffn_up."},      {"mlp.c_proj.", "ffn_down."},
      {"mlp.c_fused.", "ffn_fused."},
  };
  // The LayerNorm-free GPT-2's per-layer scalars and temperature (no weight / bias suffix).
  if (leaf == "alpha") return fmt::format("blk.{}.ffn_alpha", layer);
  if (leaf == "beta") return fmt::format("blk.{}.ffn_beta", layer);
  if (leaf == "attn.temperature") return fmt::format("blk.{}.attn_temperature", layer);
  for (const auto& [hf, canonical] : kLeaves) {
    if (leaf.substr(0, hf.size()) != hf) continue;
    const std::string_view kind = leaf.substr(hf.size());
    if (kind == "weight" || kind == "bias") return fmt::format("blk.{}.{}{}", layer, canonical, kind);
  }
  return std::nullopt;
}

// GPT-2's Conv1D projections store their weights as (in, out), the transpose of nn.Linear's.
bool gpt2_conv1d_weight(const std::string& canonical) {
  for (std::string_view leaf :
       {"attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight", "ffn_fused.weight"}) {
    if (canonical.size() > leaf.size() && canonical.compare(canonical.size() - leaf.size(), leaf.size(), leaf) == 0) {
      return true;
    }
  }
  return false;
}

}  // namespace

std::optional<std::string> hf_to_canonical_name(std::string_view n, std::string_view arch) {
  if (arch == "gpt2" || arch == "gpt2_lnfree") return gpt2_canonical_name(n);
  // Gemma 3's multimodal checkpoints keep the language model under another prefix.
  std::string stripped;
  for (std::string_view prefix : {"model.language_model.", "language_model.model."}) {
    if (n.substr(0, prefix.size()) == prefix) {
      stripped = "model." + std::string(n.substr(prefix.size()));
      n = stripped;
      break;
    }
  }
  if (n == "language_model.lm_head.weight") return "output.weight";
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
  const bool gemma = arch == "gemma2" || arch == "gemma3";
  // Gemma's post_attention_layernorm normalises the attention output (a norm of its own), not the
  // FFN input as in Llama.
  static constexpr std::pair<std::string_view, std::string_view> kGemmaLeaves[] = {
      {"post_attention_layernorm.weight", "post_attention_norm.weight"},
      {"pre_feedforward_layernorm.weight", "ffn_norm.weight"},
      {"post_feedforward_layernorm.weight", "post_ffw_norm.weight"},
  };
  static constexpr std::pair<std::string_view, std::string_view> kFamilyLeaves[] = {
      {"self_attn.q_proj.bias", "attn_q.bias"},           {"self_attn.k_proj.bias", "attn_k.bias"},
      {"self_attn.v_proj.bias", "attn_v.bias"},           {"self_attn.q_norm.weight", "attn_q_norm.weight"},
      {"self_attn.k_norm.weight", "attn_k_norm.weight"},  {"self_attn.qkv_proj.weight", "attn_qkv.weight"},
      {"mlp.gate_up_proj.weight", "ffn_up.weight"},
  };
  if (gemma) {
    for (const auto& [hf, canonical] : kGemmaLeaves) {
      if (leaf == hf) return fmt::format("blk.{}.{}", layer, canonical);
    }
  }
  for (const auto& [hf, canonical] : kLeaves) {
    if (leaf == hf) return fmt::format("blk.{}.{}", layer, canonical);
  }
  // Attamba: the two SSMs that replace the K and V projections (their leaves keep the HF names).
  if (arch == "attamba") {
    for (std::string_view ssm : {"k_ssm.", "v_ssm."}) {
      const std::string hf_prefix = "self_attn." + std::string(ssm);
      if (leaf.substr(0, hf_prefix.size()) != hf_prefix) continue;
      for (std::string_view part : kAttambaSsmLeaves) {
        if (leaf.substr(hf_prefix.size()) == part) return fmt::format("blk.{}.{}{}", layer, ssm, part);
      }
    }
    return std::nullopt;
  }
  // KV-shifting attention's weights, (n_kv_heads, 2): column 0 previous token, column 1 current.
  if (arch == "kvshift") {
    if (leaf == "self_attn.k_shift") return fmt::format("blk.{}.attn_k_shift", layer);
    if (leaf == "self_attn.v_shift") return fmt::format("blk.{}.attn_v_shift", layer);
    return std::nullopt;
  }
  if (arch != "llama") {
    for (const auto& [hf, canonical] : kFamilyLeaves) {
      if (leaf == hf) return fmt::format("blk.{}.{}", layer, canonical);
    }
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
    std::optional<std::string> canonical = hf_to_canonical_name(name, hp.arch);
    if (!canonical) {
      // Bias terms would be silently dropped otherwise; everything else unknown (e.g. the rotary
      // inv_freq buffer older checkpoints saved) is recomputed or unused.
      // GPT-2's h.N.attn.bias / masked_bias are causal-mask buffers, not weights.
      const bool gpt2_mask =
          hp.learned_positions && (name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias"));
      if (!gpt2_mask && name.size() >= 5 && name.compare(name.size() - 5, 5, ".bias") == 0) {
        return unimplemented("hf: tensor '{}' is a bias, which the {} architecture does not have", name, hp.arch);
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
    std::optional<std::vector<int64_t>> want = expected_shape(*canonical, hp);
    const bool transposed = hp.learned_positions && gpt2_conv1d_weight(*canonical);
    if (want && transposed) std::reverse(want->begin(), want->end());
    if (want && t->shape != *want) {
      return data_loss("hf: tensor '{}' has shape [{}], expected [{}] from config.json", name,
                       fmt::join(t->shape, ", "), fmt::join(*want, ", "));
    }
    src->tensors_.emplace(*canonical, t);
    if (transposed) src->transposed_.insert(*canonical);
  }

  // Checked here so that a truncated checkpoint fails at open with the Hugging Face name rather
  // than halfway through building the model.
  std::vector<std::string> required = {"token_embd.weight"};
  if (hp.arch != "gpt2_lnfree") required.push_back("output_norm.weight");  // no final norm there
  if (hp.arch == "gpt2") required.push_back("output_norm.bias");
  if (hp.learned_positions) required.push_back("position_embd.weight");
  for (int l = 0; l < hp.n_layers; ++l) {
    for (std::string_view leaf : layer_leaves(hp.arch)) required.push_back(fmt::format("blk.{}.{}", l, leaf));
    if (hp.attn_temperature) required.push_back(fmt::format("blk.{}.attn_temperature", l));
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
  if (transposed_.count(name) != 0) {
    // (in, out) as stored -> (out, in).
    const int64_t rows = t.shape[0], cols = t.shape[1];
    std::vector<float> tr(out.data.size());
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) tr[static_cast<size_t>(c * rows + r)] = out.data[static_cast<size_t>(r * cols + c)];
    }
    out.data = std::move(tr);
    out.shape = {cols, rows};
  }
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
