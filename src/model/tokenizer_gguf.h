// GGUF metadata (tokenizer.ggml.*) -> TokenizerSpec. Kept apart from tokenizer.cpp so the tokenizer itself knows no
// file format.
#pragma once

#include "common/status.h"
#include "model/gguf.h"
#include "model/tokenizer.h"

namespace starserve {

// Reads tokenizer.ggml.{model, pre, tokens, token_type, merges, scores, *_token_id, add_bos_token, add_eos_token,
// add_space_prefix} and tokenizer.chat_template; "gpt2" is byte-level BPE, "llama" SentencePiece BPE. Absent
// required keys are kNotFound, wrong types kDataLoss (from GgufFile's getters).
Result<TokenizerSpec> tokenizer_spec_from_gguf(const gguf::GgufFile& file);

// tokenizer_spec_from_gguf + Tokenizer::create.
Result<Tokenizer> tokenizer_from_gguf(const gguf::GgufFile& file);

}  // namespace starserve
