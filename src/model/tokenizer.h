// BPE tokenizers of the model families we serve, built from a plain TokenizerSpec that a loader fills (GGUF:
// tokenizer_gguf.h; Hugging Face tokenizer.json: Tokenizer::from_hf_json), so this file knows no file format.
// Two model kinds:
//   "gpt2"  byte-level BPE (SmolLM, Llama 3, Qwen2, StarCoder): symbols are bytes written in GPT-2's byte alphabet;
//   "llama" SentencePiece-style BPE (Llama 2, Mistral, Gemma): symbols are characters, "\u2581" stands for a space,
//           a character without a token becomes its UTF-8 bytes as <0xNN> tokens (byte fallback).
// Encoding follows Hugging Face `tokenizers`:
//   1. added tokens with normalized=false are cut out of the raw text (leftmost, then longest match; lstrip / rstrip
//      take the whitespace around them, single_word refuses a match inside a word);
//   2. each remaining span is normalized (NFC/NFD/NFKC/NFKD through utf8proc, Lowercase, Prepend, Replace, Strip),
//      then added tokens with normalized=true are cut out of the normalized text;
//   3. pre-tokenization: a sequence of steps, each splitting every piece of the previous stage: regex splits (PCRE2
//      with UTF + UCP so \p{L}, \p{N}, \s are Unicode classes) and Metaspace (spaces -> "\u2581", optional prefix);
//   4. BPE on each piece: merge the adjacent pair of lowest merge rank (leftmost on ties) until no ranked pair
//      remains; a "llama" vocabulary without merges merges instead the adjacent pair whose concatenation is the token
//      of highest score (SentencePiece BPE, Sennrich et al. 2016 with SentencePiece's piece scores).
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
  kUnknown = 2,      // <unk>: special like kControl (parse_special, skip_special)
  kControl = 3,      // <|im_start|>, <|eot_id|>: text form only with parse_special, dropped by skip_special
  kUserDefined = 4,  // added tokens: always cut out of the text, decoded as their literal text
  kUnused = 5,
  kByte = 6,  // <0xAB> byte-fallback tokens (sentencepiece vocabularies)
};

// One normalizer step (Hugging Face `normalizers`), applied in order to every span outside added tokens.
struct NormalizerStep {
  enum class Kind { kNfc, kNfd, kNfkc, kNfkd, kLowercase, kPrepend, kReplace, kStrip };
  Kind kind = Kind::kNfc;
  std::string pattern;            // kReplace: the text to replace, a PCRE2 regex when pattern_is_regex
  bool pattern_is_regex = false;
  std::string content;            // kPrepend: the prefix (added to non-empty spans); kReplace: the replacement
  bool strip_left = false, strip_right = false;  // kStrip: remove Unicode White_Space at either end
};

// One pre-tokenizer step (Hugging Face `pre_tokenizers`).
struct PreTokenizerStep {
  enum class Kind { kSplit, kMetaspace };
  // How a kSplit match joins the text around it.
  enum class Behavior { kIsolated, kRemoved, kMergedWithPrevious, kMergedWithNext };
  enum class Prepend { kNever, kFirst, kAlways };  // kMetaspace: when a piece gets a leading replacement

  Kind kind = Kind::kSplit;
  std::string pattern;  // kSplit: PCRE2 regex (a literal is escaped by the loader)
  Behavior behavior = Behavior::kIsolated;
  bool invert = false;  // kSplit: the pattern matches the pieces kept, not the delimiters (only with kIsolated)
  std::string replacement = "\u2581";  // kMetaspace
  Prepend prepend = Prepend::kAlways;   // kMetaspace; kFirst: only the piece at the start of the input
  bool split = true;                    // kMetaspace: split before every replacement character
};

// Per-token options of an added token (tokenizer.json `added_tokens`). Control and user-defined tokens without an
// entry here are matched in the raw text with no stripping.
struct AddedTokenSpec {
  int32_t id = 0;
  bool lstrip = false;       // the match takes the whitespace before it
  bool rstrip = false;       // the match takes the whitespace after it
  bool single_word = false;  // no match when a word character touches it on either side
  bool normalized = false;   // matched in the normalized text instead of the raw text; its text is then its
                             // normalized content (Hugging Face: "fizz" behind Prepend("\u2581") is "\u2581fizz")
};

// How ids become text for a "llama" (SentencePiece-style) vocabulary: the decoders of tokenizer.json.
struct SpDecoderSpec {
  bool replace_marker = true;  // "\u2581" -> " " (Replace decoder, or Metaspace)
  bool byte_fallback = true;   // <0xNN> tokens -> that byte (ByteFallback); otherwise their literal text
  int strip_leading = 0;       // spaces removed from the start of the text (Strip start=n, after Fuse)
  bool metaspace_first = false;  // Metaspace decoder with a prefix: "\u2581" removed from the first token
};

// What a weights file says about its vocabulary.
struct TokenizerSpec {
  std::string model;                      // "gpt2" (byte-level BPE) or "llama" (SentencePiece BPE); others ->
                                          // kUnimplemented
  std::string pre;                        // pre-tokenizer name (GGUF tokenizer.ggml.pre): "default"/"gpt2",
                                          // "llama-bpe"/"llama3", "smollm", "qwen2", "starcoder", "refact"
  std::vector<std::string> pre_regexes;   // "gpt2": when non-empty, overrides `pre`: isolated splits in sequence
  std::vector<PreTokenizerStep> pre_steps;  // when non-empty, overrides `pre_regexes` and `pre` (both models)
  std::vector<NormalizerStep> normalizers;  // applied in order; empty: none
  std::vector<std::string> tokens;        // id -> token text; byte-level form ("Ġ" for space) for normal tokens,
                                          // literal text for control / user-defined tokens
  std::vector<int32_t> token_types;       // TokenType values, one per token; may be empty (all normal)
  std::vector<std::string> merges;        // "left right" by rank (index 0 merges first)
  std::vector<float> scores;              // "llama" without merges: merge priority of each token (higher first)
  std::vector<AddedTokenSpec> added_tokens;  // options of control / user-defined tokens; see AddedTokenSpec
  bool byte_fallback = false;             // "llama": characters without a token become <0xNN> byte tokens
  bool fuse_unk = false;                  // consecutive unknown characters give one unknown token
  SpDecoderSpec sp_decoder;               // "llama" only
  std::optional<int32_t> bos_id, eos_id, eot_id, pad_id;
  std::optional<int32_t> unk_id;  // stands for text with no token; "gpt2": unused when it is a control token (then
                                  // the bytes are dropped)
  bool add_bos = false, add_eos = false;  // encode(add_special=true) prepends BOS / appends EOS
  bool ignore_merges = false;             // a piece that is itself a token is emitted whole (Llama 3)
  std::string chat_template;              // jinja text, may be empty
};

// Names accepted in TokenizerSpec::pre, for messages and tests.
std::span<const std::string_view> known_pre_tokenizers();
// GPT-2's pre-tokenizer regex (Hugging Face ByteLevel with use_regex=true).
std::string_view gpt2_pre_tokenizer_regex();

struct TokenizerImpl;  // tokenizer.cpp: vocabulary tables, merge ranks, compiled regexes

class Tokenizer {
 public:
  class StreamDecoder;

  // Validates the spec (ids in range, merges name existing tokens, regexes compile); a malformed spec is kDataLoss
  // naming the offending value, an unsupported model or pre-tokenizer is kUnimplemented.
  static Result<Tokenizer> create(TokenizerSpec spec);
  // Reads a Hugging Face tokenizer.json (tokenizer_hf_json.cpp: BPE model, byte-level or with byte fallback) and,
  // when the path is non-empty, tokenizer_config.json (bos/eos tokens, add_bos_token/add_eos_token, chat_template).
  // A normalizer, pre-tokenizer, decoder or model type outside what is listed above is kUnimplemented naming it.
  static Result<Tokenizer> from_hf_json(const std::string& tokenizer_json_path,
                                        const std::string& tokenizer_config_path_or_empty);

  // add_special: BOS/EOS per add_bos/add_eos. parse_special: control tokens written in the text (<|im_start|>) become
  // their ids; otherwise they are tokenized as ordinary text. User-defined tokens are always recognised, as in
  // Hugging Face and llama.cpp.
  std::vector<int32_t> encode(std::string_view text, bool add_special, bool parse_special) const;
  // Concatenated token bytes; invalid UTF-8 becomes U+FFFD (one per maximal ill-formed subsequence, like Rust's
  // String::from_utf8_lossy which Hugging Face's byte-level decoder uses; its ByteFallback decoder writes one U+FFFD
  // per byte of an ill-formed run instead, which only ids that no text encodes to can show). "llama": "\u2581" is a
  // space and the decoder's leading strip applies. skip_special drops control and unknown tokens. Ids out of range
  // are skipped.
  std::string decode(std::span<const int32_t> ids, bool skip_special = false) const;
  // Raw bytes of one token (byte-level decoded; may be part of a UTF-8 character). Empty for ids out of range.
  std::string token_to_bytes(int32_t id) const;
  // Token text as stored in the vocabulary (byte-level form), or nullopt.
  std::optional<int32_t> token_id(std::string_view token_text) const;
  TokenType token_type(int32_t id) const;

  // "byte-level BPE" or "SentencePiece BPE", for model descriptions.
  std::string kind() const;
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
    size_t pushed_ = 0;    // tokens taken so far (not skipped): the first one decodes differently in Metaspace
    int stripped_ = 0;     // leading spaces removed so far; -1 once a byte other than a leading space was seen
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
