#include "model/tokenizer_gguf.h"

#include <utility>

namespace starserve {

Result<TokenizerSpec> tokenizer_spec_from_gguf(const gguf::GgufFile& file) {
  TokenizerSpec spec;
  SS_ASSIGN_OR_RETURN(spec.model, file.get_string("tokenizer.ggml.model"));
  SS_ASSIGN_OR_RETURN(spec.pre, file.get_string_or("tokenizer.ggml.pre", "default"));
  SS_ASSIGN_OR_RETURN(spec.tokens, file.get_string_array("tokenizer.ggml.tokens"));
  if (file.find("tokenizer.ggml.token_type") != nullptr) {
    SS_ASSIGN_OR_RETURN(spec.token_types, file.get_i32_array("tokenizer.ggml.token_type"));
  }
  if (file.find("tokenizer.ggml.merges") != nullptr) {
    SS_ASSIGN_OR_RETURN(spec.merges, file.get_string_array("tokenizer.ggml.merges"));
  }

  const std::pair<const char*, std::optional<int32_t>*> ids[] = {
      {"tokenizer.ggml.bos_token_id", &spec.bos_id},     {"tokenizer.ggml.eos_token_id", &spec.eos_id},
      {"tokenizer.ggml.eot_token_id", &spec.eot_id},     {"tokenizer.ggml.padding_token_id", &spec.pad_id},
      {"tokenizer.ggml.unknown_token_id", &spec.unk_id}};
  for (const auto& [key, slot] : ids) {
    if (file.find(key) == nullptr) continue;
    SS_ASSIGN_OR_RETURN(uint32_t id, file.get_u32(key));
    if (id > static_cast<uint32_t>(INT32_MAX)) return data_loss("{} = {} does not fit int32", key, id);
    *slot = static_cast<int32_t>(id);
  }
  SS_ASSIGN_OR_RETURN(spec.add_bos, file.get_bool_or("tokenizer.ggml.add_bos_token", false));
  SS_ASSIGN_OR_RETURN(spec.add_eos, file.get_bool_or("tokenizer.ggml.add_eos_token", false));
  SS_ASSIGN_OR_RETURN(spec.chat_template, file.get_string_or("tokenizer.chat_template", ""));
  // Llama 3's tokenizer.json sets ignore_merges; GGUF has no key for it, so llama.cpp ties it to the pre-tokenizer.
  spec.ignore_merges = spec.pre == "llama3" || spec.pre == "llama-bpe" || spec.pre == "llama-v3";
  return spec;
}

Result<Tokenizer> tokenizer_from_gguf(const gguf::GgufFile& file) {
  SS_ASSIGN_OR_RETURN(TokenizerSpec spec, tokenizer_spec_from_gguf(file));
  return Tokenizer::create(std::move(spec));
}

}  // namespace starserve
