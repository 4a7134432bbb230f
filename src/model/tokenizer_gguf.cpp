#include "model/tokenizer_gguf.h"

#include <utility>

namespace starserve {

namespace {

// tokenizer.ggml.model = "llama": a SentencePiece BPE vocabulary. The pipeline is llama.cpp's (the format's reference):
// spaces become "\u2581", with add_space_prefix one more is put before the text and after every special token (as
// the Prepend normalizer of Llama 2's tokenizer.json does), characters without a token fall back to <0xNN> bytes,
// and pieces merge by score unless the file has merges. Decoding strips the prefix space again.
Status sentencepiece_from_gguf(const gguf::GgufFile& file, TokenizerSpec& spec) {
  if (file.find("tokenizer.ggml.scores") != nullptr) {
    SS_ASSIGN_OR_RETURN(spec.scores, file.get_f32_array("tokenizer.ggml.scores"));
  }
  SS_ASSIGN_OR_RETURN(const bool add_space_prefix, file.get_bool_or("tokenizer.ggml.add_space_prefix", true));
  SS_ASSIGN_OR_RETURN(const std::string arch, file.get_string_or("general.architecture", ""));
  if (arch == "gemma" || arch == "gemma2" || arch == "gemma3") {
    // Gemma files store tokens of two or more spaces as real spaces while the text reaching BPE has "\u2581" for
    // each space: spelt with "\u2581" they take part in merges as in Gemma's own tokenizer. Gemma's scores do not
    // follow its merge order (the whitespace tokens carry placeholder scores); the order of the tokens in the file
    // does, so the priority of a token is its position.
    for (size_t i = 0; i < spec.tokens.size(); ++i) {
      std::string& t = spec.tokens[i];
      if (t.size() >= 2 && t.find_first_not_of(' ') == std::string::npos) {
        std::string marked;
        for (size_t k = 0; k < t.size(); ++k) marked += "\u2581";
        t = std::move(marked);
        if (i < spec.token_types.size()) spec.token_types[i] = static_cast<int32_t>(TokenType::kNormal);
      }
    }
    spec.scores.resize(spec.tokens.size());
    for (size_t i = 0; i < spec.scores.size(); ++i) spec.scores[i] = -static_cast<float>(i);
  }
  if (spec.merges.empty() && spec.scores.empty()) {
    return data_loss("tokenizer.ggml.model 'llama' has neither tokenizer.ggml.merges nor tokenizer.ggml.scores");
  }
  spec.pre.clear();
  if (add_space_prefix) {
    NormalizerStep prepend;
    prepend.kind = NormalizerStep::Kind::kPrepend;
    prepend.content = "\u2581";
    spec.normalizers.push_back(std::move(prepend));
  }
  NormalizerStep replace;
  replace.kind = NormalizerStep::Kind::kReplace;
  replace.pattern = " ";
  replace.content = "\u2581";
  spec.normalizers.push_back(std::move(replace));
  spec.byte_fallback = true;
  spec.fuse_unk = true;
  spec.sp_decoder.replace_marker = true;
  spec.sp_decoder.byte_fallback = true;
  spec.sp_decoder.strip_leading = add_space_prefix ? 1 : 0;
  return Status::ok_status();
}

}  // namespace

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
  if (spec.model == "llama") {
    SS_RETURN_IF_ERROR(sentencepiece_from_gguf(file, spec));
    return spec;
  }
  // Llama 3's tokenizer.json sets ignore_merges; GGUF has no key for it, so llama.cpp ties it to the pre-tokenizer.
  spec.ignore_merges = spec.pre == "llama3" || spec.pre == "llama-bpe" || spec.pre == "llama-v3";
  return spec;
}

Result<Tokenizer> tokenizer_from_gguf(const gguf::GgufFile& file) {
  SS_ASSIGN_OR_RETURN(TokenizerSpec spec, tokenizer_spec_from_gguf(file));
  return Tokenizer::create(std::move(spec));
}

}  // namespace starserve
