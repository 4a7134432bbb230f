#include "model/gguf_source.h"

#include <cmath>
#include <limits>
#include <map>
#include <new>
#include <optional>

#include <fmt/ranges.h>

#include "model/dequant.h"

namespace starserve {
namespace {

constexpr int64_t kMaxInt = std::numeric_limits<int>::max();

// A size read from `key` that must be in [1, INT_MAX]; `fallback` when given and the key is absent.
Result<int> positive_int(const gguf::GgufFile& f, const std::string& key, std::optional<int64_t> fallback) {
  Result<int64_t> v = fallback ? f.get_i64_or(key, *fallback) : f.get_i64(key);
  if (!v.ok()) return v.status();
  if (*v <= 0 || *v > kMaxInt) return data_loss("gguf: {} = {} must be in [1, {}]", key, *v, kMaxInt);
  return static_cast<int>(*v);
}

Result<float> positive_float(const gguf::GgufFile& f, const std::string& key, float fallback) {
  SS_ASSIGN_OR_RETURN(float v, f.get_f32_or(key, fallback));
  if (!(v > 0.0f) || !std::isfinite(v)) return data_loss("gguf: {} = {} must be a finite number > 0", key, v);
  return v;
}

Result<RopeScaling> read_rope_scaling(const gguf::GgufFile& f, const std::string& arch) {
  RopeScaling s;
  SS_ASSIGN_OR_RETURN(std::string type, f.get_string_or(arch + ".rope.scaling.type", ""));
  if (type.empty()) {
    // Files converted before rope.scaling.* existed store the linear factor as rope.scale_linear.
    SS_ASSIGN_OR_RETURN(float legacy, positive_float(f, arch + ".rope.scale_linear", 1.0f));
    if (legacy != 1.0f) {
      s.type = RopeScaling::Type::kLinear;
      s.factor = legacy;
    }
    return s;
  }
  if (type == "none") return s;
  if (type == "longrope") {
    s.type = RopeScaling::Type::kLongRope;  // the rest in read_longrope
    return s;
  }
  if (type == "linear") {
    s.type = RopeScaling::Type::kLinear;
    SS_ASSIGN_OR_RETURN(s.factor, positive_float(f, arch + ".rope.scaling.factor", 1.0f));
    return s;
  }
  return unimplemented("gguf: {}.rope.scaling.type '{}' is not supported (none, linear, longrope)", arch, type);
}

// LongRoPE as llama.cpp's converter writes Phi-3 (no scaling type key): the factors as the tensors
// rope_factors_{long,short}.weight (read by Rope::load), <arch>.rope.scaling.original_context_length,
// and <arch>.rope.scaling.attn_factor (else sqrt(1 + ln(s) / ln(original)), s = context_length /
// original, as transformers derives it).
Status read_longrope(const gguf::GgufFile& f, ModelHParams& hp) {
  const std::string& a = hp.arch_name;
  const bool tensors =
      f.find_tensor("rope_factors_long.weight") != nullptr || f.find_tensor("rope_factors_short.weight") != nullptr;
  if (!tensors && hp.rope_scaling.type != RopeScaling::Type::kLongRope) return Status();
  if (f.find_tensor("rope_factors_long.weight") == nullptr || f.find_tensor("rope_factors_short.weight") == nullptr) {
    return data_loss("gguf: LongRoPE needs both rope_factors_long.weight and rope_factors_short.weight");
  }
  RopeScaling& rs = hp.rope_scaling;
  rs = RopeScaling{};
  rs.type = RopeScaling::Type::kLongRope;
  const std::string orig_key = a + ".rope.scaling.original_context_length";
  if (f.find(orig_key) == nullptr) return not_found("gguf: LongRoPE needs {}", orig_key);
  SS_ASSIGN_OR_RETURN(rs.original_context, positive_int(f, orig_key, std::nullopt));
  const double s = static_cast<double>(hp.max_context) / rs.original_context;
  const float derived =
      s <= 1.0 ? 1.0f : static_cast<float>(std::sqrt(1.0 + std::log(s) / std::log(static_cast<double>(rs.original_context))));
  SS_ASSIGN_OR_RETURN(rs.attn_factor, positive_float(f, a + ".rope.scaling.attn_factor", derived));
  return Status();
}

// The vocabulary size: <arch>.vocab_size, else the length of tokenizer.ggml.tokens, else the
// rows of token_embd.weight.
Result<int> read_vocab_size(const gguf::GgufFile& f, const std::string& arch) {
  const std::string key = arch + ".vocab_size";
  if (f.find(key) != nullptr) return positive_int(f, key, std::nullopt);
  if (const gguf::Value* tokens = f.find("tokenizer.ggml.tokens")) {
    if (tokens->type() != gguf::ValueType::kArray) {
      return data_loss("gguf: tokenizer.ggml.tokens (at byte {}) is {}, expected array<string>", tokens->file_offset(),
                       tokens->type_string());
    }
    if (tokens->size() == 0 || tokens->size() > static_cast<uint64_t>(kMaxInt)) {
      return data_loss("gguf: tokenizer.ggml.tokens has {} entries", tokens->size());
    }
    return static_cast<int>(tokens->size());
  }
  if (const gguf::TensorInfo* emb = f.find_tensor("token_embd.weight"); emb != nullptr && emb->dims.size() == 2) {
    if (emb->dims[1] <= 0 || emb->dims[1] > kMaxInt) return data_loss("gguf: token_embd.weight has {} rows", emb->dims[1]);
    return static_cast<int>(emb->dims[1]);
  }
  return not_found("gguf: no vocabulary size: none of {}, tokenizer.ggml.tokens, token_embd.weight", key);
}

// The GGUF architectures read here (general.architecture; the registry entry has the same name).
// gpt2_lnfree is starserve's own (scripts/lnfree_to_gguf.py; docs/specs/lnfree-gpt2.md "GGUF layout").
constexpr std::string_view kGgufArchs[] = {"llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2", "gpt2_lnfree"};

// What llama.cpp hard-codes per architecture rather than storing in the file: which layers use
// the sliding window, the local RoPE base of Gemma 3, Gemma's embedding scale and query scale.
Status read_family_keys(const gguf::GgufFile& f, ModelHParams& hp) {
  const std::string& a = hp.arch_name;
  const bool gemma = a == "gemma2" || a == "gemma3";
  if (f.find(a + ".attention.sliding_window") != nullptr) {
    SS_ASSIGN_OR_RETURN(hp.sliding_window, positive_int(f, a + ".attention.sliding_window", std::nullopt));
  }
  if (gemma) {
    // Gemma 2: every other layer windowed (0, 2, ...); Gemma 3: five local layers to one global.
    const int period = a == "gemma2" ? 2 : 6;
    hp.sliding_layers.assign(hp.n_layers, 0);
    for (int l = 0; l < hp.n_layers; ++l) hp.sliding_layers[l] = (l % period) < period - 1 ? 1 : 0;
    hp.embed_scale = std::sqrt(static_cast<float>(hp.hidden));
    SS_ASSIGN_OR_RETURN(hp.attn_softcap, f.get_f32_or(a + ".attn_logit_softcapping", 0.0f));
    SS_ASSIGN_OR_RETURN(hp.final_softcap, f.get_f32_or(a + ".final_logit_softcapping", 0.0f));
    // Queries are scaled by query_pre_attn_scalar^-1/2, which llama.cpp takes to be head_dim except
    // for the 27B models (hidden / n_heads; 46 layers in Gemma 2, 62 in Gemma 3).
    const bool big = (a == "gemma2" && hp.n_layers == 46) || (a == "gemma3" && hp.n_layers == 62);
    hp.attn_scale = 1.0f / std::sqrt(static_cast<float>(big ? hp.hidden / hp.n_heads : hp.head_dim));
    if (a == "gemma3") hp.rope_theta_local = 10000.0f;
  }
  return read_longrope(f, hp);
}

}  // namespace

Result<ModelHParams> read_gguf_hparams(const gguf::GgufFile& f) {
  ModelHParams hp;
  SS_ASSIGN_OR_RETURN(hp.arch_name, f.get_string("general.architecture"));
  bool known = false;
  for (std::string_view k : kGgufArchs) known = known || k == hp.arch_name;
  if (hp.arch_name.rfind("kvshift", 0) == 0) {
    // No converter writes KV-shifting weights (attn_{k,v}_shift) into GGUF; starserve reads them
    // from the Hugging Face layout only.
    return unimplemented("gguf: architecture '{}': KV-shifting models have no GGUF format; load the Hugging Face "
                         "directory (config.json model_type kvshift_llama, model.safetensors) instead",
                         hp.arch_name);
  }
  if (hp.arch_name == "attamba") {
    // Attamba's SSM tensors (k_ssm / v_ssm) have no GGUF naming; starserve reads the HF layout only.
    return unimplemented("gguf: architecture 'attamba' has no GGUF format; load the Hugging Face directory "
                         "(config.json model_type attamba, model.safetensors) instead");
  }
  if (!known) {
    return unimplemented("gguf: architecture '{}' is not supported (llama, qwen2, qwen3, gemma2, gemma3, phi3, gpt2, "
                         "gpt2_lnfree)",
                         hp.arch_name);
  }
  hp.arch = hp.arch_name;
  const std::string& a = hp.arch_name;
  SS_ASSIGN_OR_RETURN(hp.name, f.get_string_or("general.name", ""));

  SS_ASSIGN_OR_RETURN(hp.n_layers, positive_int(f, a + ".block_count", std::nullopt));
  SS_ASSIGN_OR_RETURN(hp.hidden, positive_int(f, a + ".embedding_length", std::nullopt));
  SS_ASSIGN_OR_RETURN(hp.ffn_hidden, positive_int(f, a + ".feed_forward_length", std::nullopt));
  SS_ASSIGN_OR_RETURN(hp.n_heads, positive_int(f, a + ".attention.head_count", std::nullopt));
  SS_ASSIGN_OR_RETURN(hp.n_kv_heads, positive_int(f, a + ".attention.head_count_kv", hp.n_heads));
  SS_ASSIGN_OR_RETURN(hp.max_context, positive_int(f, a + ".context_length", std::nullopt));

  if (f.find(a + ".attention.key_length") == nullptr && hp.hidden % hp.n_heads != 0) {
    return data_loss("gguf: {}.embedding_length {} is not a multiple of {}.attention.head_count {} and there is no "
                     "{}.attention.key_length",
                     a, hp.hidden, a, hp.n_heads, a);
  }
  SS_ASSIGN_OR_RETURN(hp.head_dim, positive_int(f, a + ".attention.key_length", hp.hidden / hp.n_heads));
  if (a == "llama" && static_cast<int64_t>(hp.n_heads) * hp.head_dim != hp.hidden) {
    return data_loss("gguf: llama needs hidden == n_heads * head_dim, got {} != {} * {}", hp.hidden, hp.n_heads,
                     hp.head_dim);
  }
  SS_ASSIGN_OR_RETURN(int value_dim, positive_int(f, a + ".attention.value_length", hp.head_dim));
  if (value_dim != hp.head_dim) {
    return unimplemented("gguf: value head size {} != key head size {} is not supported", value_dim, hp.head_dim);
  }
  if (hp.n_heads % hp.n_kv_heads != 0) {
    return data_loss("gguf: n_heads {} is not a multiple of n_kv_heads {}", hp.n_heads, hp.n_kv_heads);
  }

  SS_ASSIGN_OR_RETURN(hp.rope_dim, positive_int(f, a + ".rope.dimension_count", hp.head_dim));
  if (hp.rope_dim > hp.head_dim || hp.rope_dim % 2 != 0) {
    return data_loss("gguf: {}.rope.dimension_count {} must be even and <= head_dim {}", a, hp.rope_dim, hp.head_dim);
  }
  SS_ASSIGN_OR_RETURN(hp.rope_theta, positive_float(f, a + ".rope.freq_base", 10000.0f));
  SS_ASSIGN_OR_RETURN(hp.rms_eps, positive_float(f, a + ".attention.layer_norm_rms_epsilon", 1e-5f));
  SS_ASSIGN_OR_RETURN(hp.rope_scaling, read_rope_scaling(f, a));
  // llama.cpp's converter permutes the rows of attn_q / attn_k of "llama" so that RoPE pairs are
  // adjacent; the other architectures keep Hugging Face's rows and rotate halves (NEOX style).
  hp.rope_style = a == "llama" ? RopeStyle::kInterleaved : RopeStyle::kHalf;
  if (a == "gpt2" || a == "gpt2_lnfree") {
    // Learned positions (position_embd.weight, context_length rows) instead of RoPE. gpt2: LayerNorm
    // with weight and bias, its epsilon under layer_norm_epsilon. gpt2_lnfree: no norm at all, and the
    // per-head, per-position temperature exactly when its tensors are there (blk.0.attn_temperature).
    const bool lnfree = a == "gpt2_lnfree";
    if (!lnfree) {
      SS_ASSIGN_OR_RETURN(hp.rms_eps, positive_float(f, a + ".attention.layer_norm_epsilon", 1e-5f));
    }
    hp.rope_dim = 0;
    hp.learned_positions = true;
    hp.layer_norm = !lnfree;
    hp.attn_temperature = lnfree && f.find_tensor("blk.0.attn_temperature") != nullptr;
    if (hp.n_kv_heads != hp.n_heads || int64_t{hp.n_heads} * hp.head_dim != hp.hidden) {
      return data_loss("gguf: {} needs head_count_kv == head_count and hidden == n_heads * head_dim, got {} / {} "
                       "heads of {} for hidden {}",
                       a, hp.n_kv_heads, hp.n_heads, hp.head_dim, hp.hidden);
    }
    if (const gguf::TensorInfo* pos = f.find_tensor("position_embd.weight");
        pos == nullptr || pos->dims.size() != 2 || pos->dims[0] != hp.hidden || pos->dims[1] != hp.max_context) {
      return data_loss("gguf: {} needs position_embd.weight of ggml dims [{}, {}] (hidden, context_length)", a,
                       hp.hidden, hp.max_context);
    }
    if (lnfree && f.find_tensor("output.weight") != nullptr) {
      return data_loss("gguf: gpt2_lnfree has an output.weight; its logits are the tied token embedding's");
    }
  }

  SS_ASSIGN_OR_RETURN(hp.n_vocab, read_vocab_size(f, a));
  if (const gguf::TensorInfo* emb = f.find_tensor("token_embd.weight")) {
    if (emb->dims.size() != 2 || emb->dims[0] != hp.hidden || emb->dims[1] != hp.n_vocab) {
      return data_loss("gguf: token_embd.weight has ggml dims [{}], expected [{}, {}] (hidden, n_vocab)",
                       fmt::join(emb->dims, ", "), hp.hidden, hp.n_vocab);
    }
  }
  // Without an output projection the logits reuse the token embedding.
  hp.tied_embeddings = f.find_tensor("output.weight") == nullptr;
  SS_RETURN_IF_ERROR(read_family_keys(f, hp));
  return hp;
}

Result<std::unique_ptr<GgufWeightSource>> GgufWeightSource::open(const std::string& path) {
  SS_ASSIGN_OR_RETURN(std::unique_ptr<gguf::GgufFile> file, gguf::GgufFile::open(path));
  return from_file(std::move(file));
}

Result<std::unique_ptr<GgufWeightSource>> GgufWeightSource::from_file(std::unique_ptr<gguf::GgufFile> file) {
  Result<ModelHParams> hp = read_gguf_hparams(*file);
  if (!hp.ok()) {
    if (file->path().empty()) return hp.status();
    return Status(hp.status().code(), fmt::format("{} (in {})", hp.status().message(), file->path()));
  }
  return std::unique_ptr<GgufWeightSource>(new GgufWeightSource(std::move(file), std::move(hp).value()));
}

bool GgufWeightSource::has(const std::string& name) const { return file_->find_tensor(name) != nullptr; }

Result<HostTensor> GgufWeightSource::load(const std::string& name) const {
  const gguf::TensorInfo* t = file_->find_tensor(name);
  if (t == nullptr) return not_found("gguf: tensor '{}' not found in {}", name, describe());
  if (!gguf::can_dequantize(t->type)) {
    return unimplemented("gguf: tensor '{}' has type {}, which cannot be dequantized", name,
                         gguf::ggml_type_name(t->type));
  }
  HostTensor out;
  out.shape.assign(t->dims.rbegin(), t->dims.rend());  // ggml's dims[0] is the innermost
  try {
    out.data.resize(static_cast<size_t>(t->n_elements));
  } catch (const std::bad_alloc&) {
    return resource_exhausted("gguf: no memory for tensor '{}' ({} fp32 values)", name, t->n_elements);
  }
  Status st = gguf::dequantize(t->type, t->data, t->n_bytes, out.data.data(), t->n_elements);
  if (!st.ok()) return Status(st.code(), fmt::format("gguf: tensor '{}': {}", name, st.message()));
  return out;
}

std::string GgufWeightSource::describe() const {
  // The type holding the most bytes names the quantization ("Q4_1" even though norms are F32).
  std::map<uint32_t, uint64_t> bytes_by_type;
  for (const gguf::TensorInfo& t : file_->tensors()) bytes_by_type[static_cast<uint32_t>(t.type)] += t.n_bytes;
  std::string main_type = "no tensors";
  uint64_t best = 0;
  for (const auto& [type, bytes] : bytes_by_type) {
    if (bytes >= best) {
      best = bytes;
      main_type = gguf::ggml_type_name(static_cast<gguf::GgmlType>(type));
    }
  }
  return fmt::format("gguf v{}, {} tensors, {}, {} '{}'", file_->version(), file_->tensors().size(), main_type,
                     hparams_.arch_name, hparams_.name);
}

}  // namespace starserve
