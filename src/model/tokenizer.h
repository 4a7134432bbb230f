// Byte-level BPE tokenizer (the GPT-2 family: SmolLM, Llama 3, Qwen2, StarCoder, ...).
//
// Built from a plain TokenizerSpec that a loader fills (GGUF: tokenizer_gguf.h; Hugging Face tokenizer.json:
// Tokenizer::from_hf_json), so this file knows no file format. Encoding follows Hugging Face `tokenizers`:
//   1. special-token split: added tokens are cut out of the raw text first (leftmost, then longest match);
//   2. pre-tokenization: a sequence of regexes, each splitting every piece of the previous stage into matched and
//      unmatched spans ("isolated"); PCRE2 with UTF + UCP so \p{L}, \p{N}, \s are Unicode classes;
//   3. byte-level BPE on each piece: start from one symbol per byte, merge the adjacent pair of lowest merge rank
//      (leftmost on ties) until no ranked pair remains.
// A Tokenizer is immutable after create(); copies share state and all const methods are safe from many threads.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace starserve {

// GGUF token types (tokenizer.ggml.token_type); tokenizer.json added tokens map to kControl (special) or
// kUserDefined (not special).
enum class TokenType : int32_t {
  kUndefined = 0,
  kNormal = 1,
  kUnknown = 2,
  kControl = 3,      // <|im_start|>, <|eot_id|>: text form only with parse_special, dropped by skip_special
  kUserDefined = 4,  // added tokens: always cut out of the text, decoded as their literal text
  kUnused = 5,
  kByte = 6,  // <0xAB> byte-fallback tokens (sentencepiece vocabularies)
};

// What a weights file says about its vocabulary.
struct TokenizerSpec {
  std::string model;                      // "gpt2" (byte-level BPE); others -> kUnimplemented
  std::string pre;                        // pre-tokenizer name (GGUF tokenizer.ggml.pre): "default"/"gpt2",
                                          // "llama-bpe"/"llama3", "smollm", "qwen2", "starcoder", "refact"
  std::vector<std::string> pre_regexes;   // when non-empty, overrides `pre`: applied in sequence
  std::vector<std::string> tokens;        // id -> token text; byte-level form ("Ġ" for space) for normal tokens,
                                          // literal text for control / user-defined tokens
  std::vector<int32_t> token_types;       // TokenType values, one per token; may be empty (all normal)
  std::vector<std::string> merges;        // "left right" by rank (index 0 merges first)
  std::optional<int32_t> bos_id, eos_id, eot_id, pad_id;
  std::optional<int32_t> unk_id;  // stands for bytes with no token; unused when it is a control token (then dropped)
  bool add_bos = false, add_eos = false;  // encode(add_special=true) prepends BOS / appends EOS
  bool ignore_merges = false;             // a piece that is itself a token is emitted whole (Llama 3)
  std::string chat_template;              // jinja text, may be empty
};

// Names accepted in TokenizerSpec::pre, for messages and tests.
std::span<const std::string_view> known_pre_tokenizers();

struct TokenizerImpl;  // tokenizer.cpp: vocabulary tables, merge ranks, compiled regexes

class Tokenizer {
 public:
  class StreamDecoder;

  // Validates the spec (ids in range, merges name existing tokens, regexes compile); a malformed spec is kDataLoss
  // naming the offending value, an unsupported model or pre-tokenizer is kUnimplemented.
  static Result<Tokenizer> create(TokenizerSpec spec);
  // Reads a Hugging Face tokenizer.json (BPE model, ByteLevel pre-tokenizer family) and, when the path is non-empty,
  // tokenizer_config.json (bos/eos tokens, add_bos_token/add_eos_token, chat_template).
  static Result<Tokenizer> from_hf_json(const std::string& tokenizer_json_path,
                                        const std::string& tokenizer_config_path_or_empty);

  // add_special: BOS/EOS per add_bos/add_eos. parse_special: control tokens written in the text (<|im_start|>) become
  // their ids; otherwise they are tokenized as ordinary text. User-defined tokens are always recognised, as in
  // Hugging Face and llama.cpp.
  std::vector<int32_t> encode(std::string_view text, bool add_special, bool parse_special) const;
  // Concatenated token bytes; invalid UTF-8 becomes U+FFFD (one per maximal ill-formed subsequence, like Rust's
  // String::from_utf8_lossy which Hugging Face uses). skip_special drops control tokens. Ids out of range are skipped.
  std::string decode(std::span<const int32_t> ids, bool skip_special = false) const;
  // Raw bytes of one token (byte-level decoded; may be part of a UTF-8 character). Empty for ids out of range.
  std::string token_to_bytes(int32_t id) const;
  // Token text as stored in the vocabulary (byte-level form), or nullopt.
  std::optional<int32_t> token_id(std::string_view token_text) const;
  TokenType token_type(int32_t id) const;

  int32_t n_vocab() const;
  std::optional<int32_t> bos_id() const;
  std::optional<int32_t> eos_id() const;
  std::optional<int32_t> eot_id() const;
  std::optional<int32_t> pad_id() const;
  bool add_bos() const;
  bool add_eos() const;
  // True for eos, eot and control tokens that end a turn or a document (<|im_end|>, <|eot_id|>, <|eom_id|>,
  // <|end_of_text|>, <|endoftext|>, <end_of_turn>, <|end|>, </s>).
  bool is_end_of_generation(int32_t id) const;
  const std::string& chat_template() const;

  // Streaming detokenizer for one sequence: push ids one at a time and get only complete UTF-8 text; a multi-byte
  // character split across tokens is held back until it completes. Concatenating every push() and the final flush()
  // gives exactly decode(all ids, skip_special).
  class StreamDecoder {
   public:
    explicit StreamDecoder(const Tokenizer& tokenizer, bool skip_special = false);
    std::string push(int32_t id);
    // The held-back bytes, with an incomplete character as U+FFFD; the decoder is then empty and reusable.
    std::string flush();

   private:
    std::shared_ptr<const TokenizerImpl> impl_;  // shared with the Tokenizer, so it may outlive it
    bool skip_special_;
    std::string pending_;  // bytes of an unfinished UTF-8 sequence, at most 3
  };

 private:
  explicit Tokenizer(std::shared_ptr<const TokenizerImpl> impl) : impl_(std::move(impl)) {}
  std::shared_ptr<const TokenizerImpl> impl_;
};

// Helpers shared with the chat and server code.
// Appends `bytes` to `out` with each maximal ill-formed UTF-8 subsequence replaced by U+FFFD.
void append_utf8_lossy(std::string_view bytes, std::string& out);
bool is_valid_utf8(std::string_view bytes);

}  // namespace starserve
