// WeightSource over a Hugging Face checkpoint directory: config.json for the hyper-parameters,
// model.safetensors or a sharded model.safetensors.index.json for the weights, and the paths of
// tokenizer.json / tokenizer_config.json for the tokenizer loader.
//
// Hugging Face names are mapped onto the canonical (GGUF) names:
//   model.embed_tokens.weight                       -> token_embd.weight
//   model.norm.weight                               -> output_norm.weight
//   lm_head.weight                                  -> output.weight
//   model.layers.N.input_layernorm.weight           -> blk.N.attn_norm.weight
//   model.layers.N.self_attn.{q,k,v,o}_proj.weight  -> blk.N.attn_{q,k,v,output}.weight
//   model.layers.N.post_attention_layernorm.weight  -> blk.N.ffn_norm.weight
//   model.layers.N.mlp.{gate,up,down}_proj.weight   -> blk.N.ffn_{gate,up,down}.weight
// Shapes stay as stored, (out_features, in_features), which is already HostTensor's convention.
// Q/K rows are in Hugging Face's order, so hparams().rope_style is RopeStyle::kHalf.
// GPT-2 (model_type gpt2) has names of its own ([transformer.] prefix optional):
//   wte / wpe / ln_f.{weight,bias}                  -> token_embd / position_embd / output_norm.*
//   h.N.ln_1.*, h.N.ln_2.*                          -> blk.N.attn_norm.*, blk.N.ffn_norm.*
//   h.N.attn.c_attn.*, h.N.attn.c_proj.*            -> blk.N.attn_qkv.*, blk.N.attn_output.*
//   h.N.mlp.c_fc.*, h.N.mlp.c_proj.*                -> blk.N.ffn_up.*, blk.N.ffn_down.*
// and its Conv1D weights are stored (in, out); load() hands them over transposed, as (out, in).
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>

#include "common/status.h"
#include "model/hparams.h"
#include "model/safetensors.h"
#include "model/weight_source.h"

namespace starserve {

// Reads ModelHParams from the text of a config.json; `origin` names it in messages.
// model_type llama, mistral (sliding_window), qwen2, qwen3, gemma2, gemma3_text (and gemma3 with a
// text_config), phi3 and gpt2 (GPT2Config's keys: n_layer, n_embd, n_head, n_inner, n_positions,
// layer_norm_epsilon) are supported; other model types, biases the family does not have,
// activations other than the family's and RoPE types other than default / linear / llama3 (e.g.
// Phi-3's longrope) give kUnimplemented naming the value. num_hidden_layers, hidden_size,
// intermediate_size and num_attention_heads are required (kNotFound); the others default as in
// transformers' LlamaConfig. RoPE settings are read from both spellings transformers has written:
// top-level "rope_theta" + "rope_scaling" {"rope_type" or "type", ...} (4.x) and
// "rope_parameters" {"rope_theta", "rope_type", ...} (5.x). Inconsistent values (n_heads not a
// multiple of n_kv_heads, ...) give kDataLoss.
Result<ModelHParams> parse_hf_config(std::string_view json_text, std::string_view origin = "config.json");

// Canonical name of a Hugging Face tensor name ("model.layers.3.mlp.up_proj.weight" ->
// "blk.3.ffn_up.weight"); nullopt for names that are not Llama weights.
// arch (ModelHParams::arch) picks the family's names: Gemma's sandwich norms
// (post_attention_layernorm -> post_attention_norm, pre_feedforward_layernorm -> ffn_norm,
// post_feedforward_layernorm -> post_ffw_norm), Qwen's q/k/v biases and q/k norms (attn_q.bias,
// attn_q_norm.weight), Phi-3's fused qkv_proj -> attn_qkv and gate_up_proj -> ffn_up (2 ffn rows).
std::optional<std::string> hf_to_canonical_name(std::string_view hf_name, std::string_view arch = "llama");

class HfWeightSource : public WeightSource {
 public:
  // kNotFound when dir has no config.json or no weights; kDataLoss for malformed files, a tensor
  // whose shape disagrees with config.json, or a missing layer tensor; kUnimplemented for an
  // unsupported model type, bias tensors, or a dtype other than F32 / F16 / BF16.
  static Result<std::unique_ptr<HfWeightSource>> open(const std::string& dir);

  const ModelHParams& hparams() const override { return hparams_; }
  // Canonical names. "output.weight" is absent when the embeddings are tied (tie_word_embeddings,
  // or no lm_head.weight in the checkpoint), even if the checkpoint stores a copy of it.
  bool has(const std::string& name) const override;
  // Converts to fp32 with the stored shape. kNotFound when the tensor is absent.
  Result<HostTensor> load(const std::string& name) const override;
  // "safetensors, 4 files, 21 tensors (BF16, F16, F32), llama 'SmolLM2-135M'"
  std::string describe() const override;

  const std::string& dir() const { return dir_; }
  // dir/tokenizer.json and dir/tokenizer_config.json; empty when the file does not exist.
  const std::string& tokenizer_json_path() const { return tokenizer_json_; }
  const std::string& tokenizer_config_path() const { return tokenizer_config_; }
  // The Hugging Face name behind a canonical name; empty when absent.
  std::string hf_name(const std::string& canonical) const;

 private:
  HfWeightSource() = default;

  std::string dir_;
  ModelHParams hparams_;
  std::unique_ptr<safetensors::Checkpoint> ckpt_;
  std::map<std::string, const safetensors::TensorInfo*, std::less<>> tensors_;  // canonical -> stored
  std::string tokenizer_json_;
  std::string tokenizer_config_;
  size_t n_ignored_ = 0;  // checkpoint tensors that are not Llama weights (e.g. rotary inv_freq)
  std::set<std::string, std::less<>> transposed_;  // canonical names stored (in, out): GPT-2's Conv1D weights
};

}  // namespace starserve
