// The tokenizer pipeline of tokenizer.h: added-token split, normalizers, pre-tokenizer steps, byte-level and
// SentencePiece-style BPE, decoding.
#include "model/tokenizer.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <fstream>
#include <functional>
#include <queue>
#include <sstream>
#include <unordered_map>
#include <utility>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <fmt/format.h>

#include "model/tokenizer_unicode.h"

namespace starserve {
namespace {

// Pre-tokenizer regexes. GPT-2's own; Llama 3 adds case-insensitive contractions, keeps one leading non-letter with
// a word, groups digits by at most three and keeps newlines apart; Qwen2 is Llama 3 with single digits.
constexpr std::string_view kGpt2Regex =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
constexpr std::string_view kLlama3Regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr std::string_view kQwen2Regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
// Hugging Face Digits(individual_digits=true): every digit its own piece (SmolLM, StarCoder).
constexpr std::string_view kSingleDigitRegex = R"(\p{N})";

constexpr std::array<std::string_view, 11> kKnownPre = {
    "default", "gpt2", "gpt-2", "llama3", "llama-bpe", "llama-v3", "smollm", "starcoder", "refact", "qwen2",
    "deepseek-r1-qwen"};

Result<std::vector<std::string>> regexes_for_pre(const std::string& pre) {
  using Regexes = std::vector<std::string>;
  if (pre.empty() || pre == "default" || pre == "gpt2" || pre == "gpt-2") return Regexes{std::string(kGpt2Regex)};
  if (pre == "llama3" || pre == "llama-bpe" || pre == "llama-v3") return Regexes{std::string(kLlama3Regex)};
  if (pre == "smollm" || pre == "starcoder" || pre == "refact") {
    return Regexes{std::string(kSingleDigitRegex), std::string(kGpt2Regex)};
  }
  if (pre == "qwen2" || pre == "deepseek-r1-qwen") return Regexes{std::string(kQwen2Regex)};
  return unimplemented("pre-tokenizer '{}' is not supported (known: {})", pre, fmt::join(kKnownPre, ", "));
}

// ---------------------------------------------------------------------------------------------------------------
// UTF-8

// Classifies the UTF-8 sequence starting at s[i] (Unicode 15 table 3-7 of well-formed byte sequences).
struct Utf8Step {
  enum Kind { kValid, kInvalid, kTruncated } kind;
  size_t len;  // kValid: sequence length; kInvalid: bytes of the maximal ill-formed subpart (>= 1);
               // kTruncated: bytes present, a valid prefix cut by the end of input
};

Utf8Step utf8_step(std::string_view s, size_t i) {
  const auto b0 = static_cast<uint8_t>(s[i]);
  if (b0 < 0x80) return {Utf8Step::kValid, 1};
  size_t need;
  uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    need = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    need = 3;
    if (b0 == 0xE0) lo = 0xA0;  // overlong
    if (b0 == 0xED) hi = 0x9F;  // surrogates
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    need = 4;
    if (b0 == 0xF0) lo = 0x90;  // overlong
    if (b0 == 0xF4) hi = 0x8F;  // beyond U+10FFFF
  } else {
    return {Utf8Step::kInvalid, 1};
  }
  for (size_t k = 1; k < need; ++k) {
    if (i + k >= s.size()) return {Utf8Step::kTruncated, k};
    const auto b = static_cast<uint8_t>(s[i + k]);
    const bool ok = k == 1 ? (b >= lo && b <= hi) : (b >= 0x80 && b <= 0xBF);
    if (!ok) return {Utf8Step::kInvalid, k};
  }
  return {Utf8Step::kValid, need};
}

constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

// Code point of a valid sequence of length len at s[i].
uint32_t decode_code_point(std::string_view s, size_t i, size_t len) {
  const auto b = [&](size_t k) { return static_cast<uint32_t>(static_cast<uint8_t>(s[i + k])); };
  switch (len) {
    case 1: return b(0);
    case 2: return ((b(0) & 0x1F) << 6) | (b(1) & 0x3F);
    case 3: return ((b(0) & 0x0F) << 12) | ((b(1) & 0x3F) << 6) | (b(2) & 0x3F);
    default: return ((b(0) & 0x07) << 18) | ((b(1) & 0x3F) << 12) | ((b(2) & 0x3F) << 6) | (b(3) & 0x3F);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// GPT-2 byte-level alphabet: each byte maps to one printable code point so BPE vocabularies are plain text. Bytes
// that are already printable and not space (33..126, 161..172, 174..255) map to themselves; the other 68 bytes map,
// in byte order, to U+0100, U+0101, ... (so space 0x20 becomes U+0120 'Ġ' and newline 0x0A becomes U+010A 'Ċ').
struct ByteLevelAlphabet {
  std::array<std::string, 256> byte_to_text;  // UTF-8 of the code point of each byte
  std::array<int16_t, 256 + 68> code_point_to_byte;  // -1 where the code point is not in the alphabet

  ByteLevelAlphabet() {
    code_point_to_byte.fill(-1);
    uint32_t next_extra = 256;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      const uint32_t cp = printable ? b : next_extra++;
      tokenizer_unicode::append_utf8(cp, byte_to_text[b]);
      code_point_to_byte[cp] = static_cast<int16_t>(b);
    }
  }
};

const ByteLevelAlphabet& byte_level() {
  static const ByteLevelAlphabet kAlphabet;
  return kAlphabet;
}

std::string byte_level_encode(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size() * 2);
  for (char c : bytes) out += byte_level().byte_to_text[static_cast<uint8_t>(c)];
  return out;
}

// Inverse of byte_level_encode; code points outside the alphabet (tokens a converter left in literal form) are kept
// as their UTF-8, invalid bytes are kept as they are.
std::string byte_level_decode(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size();) {
    const Utf8Step step = utf8_step(text, i);
    if (step.kind != Utf8Step::kValid) {
      out.append(text.substr(i, step.len));
      i += step.len;
      continue;
    }
    const uint32_t cp = decode_code_point(text, i, step.len);
    if (cp < byte_level().code_point_to_byte.size() && byte_level().code_point_to_byte[cp] >= 0) {
      out.push_back(static_cast<char>(byte_level().code_point_to_byte[cp]));
    } else {
      out.append(text.substr(i, step.len));
    }
    i += step.len;
  }
  return out;
}

// "<0x0A>" -> 0x0A (sentencepiece byte-fallback tokens).
std::optional<uint8_t> parse_byte_token(std::string_view text) {
  if (text.size() != 6 || text.substr(0, 3) != "<0x" || text[5] != '>') return std::nullopt;
  int value = 0;
  for (char c : text.substr(3, 2)) {
    value *= 16;
    if (c >= '0' && c <= '9') value += c - '0';
    else if (c >= 'A' && c <= 'F') value += c - 'A' + 10;
    else if (c >= 'a' && c <= 'f') value += c - 'a' + 10;
    else return std::nullopt;
  }
  return static_cast<uint8_t>(value);
}

// ---------------------------------------------------------------------------------------------------------------
// PCRE2 wrapper for one pre-tokenizer stage.

class PreRegex {
 public:
  static Result<std::unique_ptr<PreRegex>> compile(const std::string& pattern) {
    int error = 0;
    PCRE2_SIZE error_offset = 0;
    // UCP: \s \d \w and POSIX classes use Unicode properties, as Hugging Face's Oniguruma regexes do.
    // MATCH_INVALID_UTF: text that is not valid UTF-8 is matched, its bad bytes simply never match, so they end up in
    // unmatched spans and still reach BPE as bytes.
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                     PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &error, &error_offset, nullptr);
    if (code == nullptr) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(error, message, sizeof(message));
      return data_loss("pre-tokenizer regex '{}' does not compile at offset {}: {}", pattern, error_offset,
                       reinterpret_cast<const char*>(message));
    }
    // JIT is an optimisation only; without it pcre2_match interprets.
    pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
    return std::unique_ptr<PreRegex>(new PreRegex(code));
  }
  ~PreRegex() { pcre2_code_free(code_); }
  PreRegex(const PreRegex&) = delete;
  PreRegex& operator=(const PreRegex&) = delete;

  pcre2_code* code() const { return code_; }

  // Appends to `out` the [begin, end) byte ranges of the non-empty matches in `text`, left to right.
  void find_all(std::string_view text, pcre2_match_data* match, std::vector<std::pair<size_t, size_t>>& out) const {
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
    const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(match);
    size_t start = 0;  // where the next search begins
    while (start < text.size()) {
      int rc = pcre2_match(code_, subject, text.size(), start, 0, match, nullptr);
      if (rc < 0 && rc != PCRE2_ERROR_NOMATCH) {
        // A JIT resource limit: the interpreter has none that these patterns can reach.
        rc = pcre2_match(code_, subject, text.size(), start, PCRE2_NO_JIT, match, nullptr);
      }
      if (rc < 0) break;  // no further match
      const size_t begin = ovector[0], end = ovector[1];
      if (end == begin) {  // empty match: step over one character and search again
        start = begin + std::max<size_t>(1, utf8_step(text, begin).len);
        continue;
      }
      out.emplace_back(begin, end);
      start = end;
    }
  }

 private:
  explicit PreRegex(pcre2_code* code) : code_(code) {}
  pcre2_code* code_;
};

struct MatchDataDeleter {
  void operator()(pcre2_match_data* m) const { pcre2_match_data_free(m); }
};
using MatchData = std::unique_ptr<pcre2_match_data, MatchDataDeleter>;

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};

uint64_t pair_key(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

// Text of control tokens that end a turn or a document in the families we serve.
constexpr std::array<std::string_view, 9> kEndOfGenerationTexts = {
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>", "<end_of_turn>", "<|end|>", "</s>",
    "<EOT>"};
// Tried in order when the spec names no end-of-turn token.
constexpr std::array<std::string_view, 5> kEndOfTurnTexts = {"<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>",
                                                             "<EOT>"};

constexpr std::string_view kSpaceMarker = "\xE2\x96\x81";  // U+2581, SentencePiece's stand-in for a space

std::string replace_all(std::string_view text, std::string_view from, std::string_view to) {
  std::string out;
  out.reserve(text.size() + text.size() / 4);
  size_t pos = 0;
  for (size_t at = text.find(from); at != std::string_view::npos; at = text.find(from, pos)) {
    out.append(text.substr(pos, at - pos)).append(to);
    pos = at + from.size();
  }
  out.append(text.substr(pos));
  return out;
}

// Unicode White_Space characters ending `s` / starting `s`, in bytes (Hugging Face's lstrip / rstrip).
size_t trailing_whitespace(std::string_view s) {
  size_t end = s.size();
  while (end > 0) {
    size_t start = end - 1;
    while (start > 0 && (static_cast<uint8_t>(s[start]) & 0xC0) == 0x80 && end - start < 4) --start;
    const auto c = tokenizer_unicode::next_code_point(s, start);
    if (c.cp == 0xFFFFFFFFu || start + c.len != end || !tokenizer_unicode::is_whitespace(c.cp)) break;
    end = start;
  }
  return s.size() - end;
}

size_t leading_whitespace(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = tokenizer_unicode::next_code_point(s, i);
    if (c.cp == 0xFFFFFFFFu || !tokenizer_unicode::is_whitespace(c.cp)) break;
    i += c.len;
  }
  return i;
}

bool ends_with_word_char(std::string_view s) {
  if (s.empty()) return false;
  size_t start = s.size() - 1;
  while (start > 0 && (static_cast<uint8_t>(s[start]) & 0xC0) == 0x80 && s.size() - start < 4) --start;
  const auto c = tokenizer_unicode::next_code_point(s, start);
  return c.cp != 0xFFFFFFFFu && tokenizer_unicode::is_word_char(c.cp);
}

bool starts_with_word_char(std::string_view s) {
  if (s.empty()) return false;
  const auto c = tokenizer_unicode::next_code_point(s, 0);
  return c.cp != 0xFFFFFFFFu && tokenizer_unicode::is_word_char(c.cp);
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------

struct TokenizerImpl {
  struct Merge {
    int32_t rank;
    int32_t merged_id;
  };
  // A token cut out of the text before normalization (raw) or after it (normalized).
  struct AddedToken {
    std::string_view text;  // into spec.tokens
    int32_t id;
    bool control;  // matched only with parse_special
    AddedTokenSpec options;
  };
  // Added tokens of one pass in a byte trie, so the longest token at a position costs one walk of at most the
  // longest token's length whatever their number (Gemma has 6384, thousands of them starting with '<').
  struct AddedSet {
    std::vector<AddedToken> tokens;
    std::unordered_map<uint64_t, int32_t> edges;  // (node << 8) | byte -> child node; node 0 is the root
    std::vector<int32_t> terminal{-1};            // node -> index into tokens, -1 when no token ends there
    std::array<bool, 256> first_byte{};           // some token starts with this byte
    bool empty() const { return tokens.empty(); }

    void insert(size_t index) {
      int32_t node = 0;
      for (char c : tokens[index].text) {
        const uint64_t key = (static_cast<uint64_t>(node) << 8) | static_cast<uint8_t>(c);
        auto [it, added] = edges.try_emplace(key, static_cast<int32_t>(terminal.size()));
        if (added) terminal.push_back(-1);
        node = it->second;
      }
      if (terminal[static_cast<size_t>(node)] < 0) terminal[static_cast<size_t>(node)] = static_cast<int32_t>(index);
      first_byte[static_cast<uint8_t>(tokens[index].text[0])] = true;
    }
    // The longest token that text[p..] starts with, or nullptr.
    const AddedToken* longest_at(std::string_view text, size_t p) const {
      if (!first_byte[static_cast<uint8_t>(text[p])]) return nullptr;
      int32_t node = 0, best = -1;
      for (size_t i = p; i < text.size(); ++i) {
        auto it = edges.find((static_cast<uint64_t>(node) << 8) | static_cast<uint8_t>(text[i]));
        if (it == edges.end()) break;
        node = it->second;
        if (terminal[static_cast<size_t>(node)] >= 0) best = terminal[static_cast<size_t>(node)];
      }
      return best < 0 ? nullptr : &tokens[static_cast<size_t>(best)];
    }
  };
  struct PreStep {
    PreTokenizerStep spec;
    std::unique_ptr<PreRegex> regex;  // kSplit
  };

  TokenizerSpec spec;
  bool sentencepiece = false;  // model "llama": characters, byte fallback, "\u2581" for spaces
  bool by_score = false;       // "llama" without merges: merge the pair whose concatenation has the highest score
  tokenizer_unicode::Normalizer normalizer;
  std::vector<PreStep> pre;
  std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>> token_to_id;
  std::array<int32_t, 256> byte_token{};  // "gpt2": the one-character token of each byte; "llama": <0xNN>; -1 if none
  std::unordered_map<uint64_t, Merge> merges;  // pair_key(left id, right id) -> rank, merged id
  std::vector<std::string> token_bytes;        // id -> raw bytes when decoded (not the first token of a sequence)
  AddedSet raw_added, normalized_added;
  std::vector<uint8_t> end_of_generation;  // id -> 1 when is_end_of_generation

  TokenType type(int32_t id) const {
    if (spec.token_types.empty()) return TokenType::kNormal;
    return static_cast<TokenType>(spec.token_types[static_cast<size_t>(id)]);
  }

  // Control and unknown tokens: written in the text only with parse_special, dropped by skip_special (llama.cpp and
  // Hugging Face treat <unk> as the special token it is).
  bool is_special(int32_t id) const {
    const TokenType t = type(id);
    return t == TokenType::kControl || t == TokenType::kUnknown;
  }

  std::optional<int32_t> find(std::string_view text) const {
    auto it = token_to_id.find(text);
    if (it == token_to_id.end()) return std::nullopt;
    return it->second;
  }

  // Text of the first token of a decoded sequence: the Metaspace decoder drops its replacement characters.
  std::string first_token_bytes(int32_t id) const {
    if (!sentencepiece || !spec.sp_decoder.metaspace_first || type(id) == TokenType::kByte) {
      return token_bytes[static_cast<size_t>(id)];
    }
    if (spec.sp_decoder.byte_fallback && parse_byte_token(spec.tokens[static_cast<size_t>(id)])) {
      return token_bytes[static_cast<size_t>(id)];
    }
    return replace_all(spec.tokens[static_cast<size_t>(id)], kSpaceMarker, "");
  }

  // Scratch buffers of one encode call.
  struct Symbol {
    int32_t id;
    uint32_t start, len;  // bytes of the piece it covers ("llama" score merges look its text up)
    int32_t prev, next;   // neighbours among live symbols, -1 at the ends
    bool alive;
    bool mergeable;  // "llama" score merges: byte-fallback and unknown symbols take part in none
  };
  struct Candidate {
    double key;                 // lower merges first: the merge rank, or minus the merged token's score
    int32_t left, right;        // symbol indices; left is the position, so it orders ties leftmost-first
    int32_t left_id, right_id;  // ids when queued: the candidate is stale if either symbol changed since
    int32_t merged_id;
    bool operator>(const Candidate& o) const { return key != o.key ? key > o.key : left > o.left; }
  };
  struct Piece {
    std::string text;
    bool at_start;  // begins at offset 0 of the input (Metaspace prepend_scheme "first")
  };
  struct Scratch {
    std::vector<MatchData> match;  // one per pre-tokenizer step (null for Metaspace)
    std::vector<Piece> pieces, next_pieces;
    std::vector<std::pair<size_t, size_t>> ranges;
    std::vector<Symbol> symbols;
    std::vector<Candidate> heap;
  };

  // "gpt2": a byte whose one-character token is missing from the vocabulary (SmolLM2 lacks 0x04, 0xF1, 0xFF, ...)
  // becomes the unknown token, or is dropped as Hugging Face BPE does without one. A control token named as unknown
  // (SmolLM2's GGUF says <|endoftext|>) is not used: it would end the document in the middle of the prompt.
  void push_byte(uint8_t byte, std::vector<int32_t>& out) const {
    if (byte_token[byte] >= 0) {
      out.push_back(byte_token[byte]);
    } else if (usable_unk()) {
      out.push_back(*spec.unk_id);
    }
  }
  bool usable_unk() const { return spec.unk_id && type(*spec.unk_id) != TokenType::kControl; }

  // Merges the initial symbols of s.symbols (linked in order) by rank or by score, then appends their ids.
  // O(n log n) in the number of symbols. `piece` is the text the symbols cover (score lookups).
  void merge_symbols(std::string_view piece, Scratch& s) const {
    const auto n = static_cast<int32_t>(s.symbols.size());
    s.heap.clear();
    const auto greater = std::greater<Candidate>();
    auto try_queue = [&](int32_t left, int32_t right) {
      if (left < 0 || right < 0) return;
      const Symbol& l = s.symbols[left];
      const Symbol& r = s.symbols[right];
      if (l.id < 0 || r.id < 0) return;
      if (by_score) {
        if (!l.mergeable || !r.mergeable) return;
        auto id = find(piece.substr(l.start, l.len + r.len));
        if (!id || type(*id) == TokenType::kByte) return;
        s.heap.push_back({-static_cast<double>(spec.scores[static_cast<size_t>(*id)]), left, right, l.id, r.id, *id});
      } else {
        auto it = merges.find(pair_key(l.id, r.id));
        if (it == merges.end()) return;
        s.heap.push_back({static_cast<double>(it->second.rank), left, right, l.id, r.id, it->second.merged_id});
      }
      std::push_heap(s.heap.begin(), s.heap.end(), greater);
    };
    for (int32_t i = 0; i + 1 < n; ++i) try_queue(i, i + 1);
    while (!s.heap.empty()) {
      std::pop_heap(s.heap.begin(), s.heap.end(), greater);
      const Candidate c = s.heap.back();
      s.heap.pop_back();
      Symbol& left = s.symbols[c.left];
      Symbol& right = s.symbols[c.right];
      if (!left.alive || !right.alive || left.next != c.right || left.id != c.left_id || right.id != c.right_id) {
        continue;  // one side was merged into something else after this candidate was queued
      }
      left.id = c.merged_id;
      left.len += right.len;
      left.next = right.next;
      right.alive = false;
      if (right.next >= 0) s.symbols[right.next].prev = c.left;
      try_queue(left.prev, c.left);
      try_queue(c.left, left.next);
    }
  }

  // Byte-level BPE over the bytes of one piece (Sennrich et al. 2016, applied to bytes as in GPT-2).
  void bpe_bytes(std::string_view piece, Scratch& s, std::vector<int32_t>& out) const {
    if (piece.size() == 1) {
      push_byte(static_cast<uint8_t>(piece[0]), out);
      return;
    }
    if (spec.ignore_merges) {
      if (auto id = find(byte_level_encode(piece))) {
        out.push_back(*id);
        return;
      }
    }
    const auto n = static_cast<int32_t>(piece.size());
    s.symbols.resize(piece.size());
    for (int32_t i = 0; i < n; ++i) {
      s.symbols[i] = {byte_token[static_cast<uint8_t>(piece[i])], static_cast<uint32_t>(i), 1, i - 1,
                      i + 1 < n ? i + 1 : -1, true, true};
    }
    merge_symbols(piece, s);
    for (int32_t i = 0; i >= 0; i = s.symbols[i].next) {
      if (s.symbols[i].id >= 0) {
        out.push_back(s.symbols[i].id);
      } else {
        push_byte(static_cast<uint8_t>(piece[i]), out);
      }
    }
  }

  // SentencePiece-style BPE over the characters of one piece. A character without a token becomes its bytes as
  // <0xNN> tokens (byte_fallback) or the unknown token (consecutive ones fused into one with fuse_unk), or is dropped
  // when the vocabulary has neither, as Hugging Face's BPE model does.
  void bpe_chars(std::string_view piece, Scratch& s, std::vector<int32_t>& out) const {
    if (piece.empty()) return;
    if (spec.ignore_merges) {
      if (auto id = find(piece)) {
        out.push_back(*id);
        return;
      }
    }
    s.symbols.clear();
    bool last_is_unk = false;
    auto add = [&](int32_t id, size_t start, size_t len, bool mergeable) {
      const auto index = static_cast<int32_t>(s.symbols.size());
      if (index > 0) s.symbols.back().next = index;
      s.symbols.push_back({id, static_cast<uint32_t>(start), static_cast<uint32_t>(len), index - 1, -1, true,
                           mergeable});
    };
    for (size_t i = 0; i < piece.size();) {
      const Utf8Step step = utf8_step(piece, i);
      const size_t len = step.len;  // an ill-formed subpart goes to byte fallback as a whole
      std::optional<int32_t> id;
      if (step.kind == Utf8Step::kValid) id = find(piece.substr(i, len));
      if (id) {
        add(*id, i, len, true);
        last_is_unk = false;
      } else {
        bool bytes_ok = spec.byte_fallback;
        for (size_t k = 0; bytes_ok && k < len; ++k) bytes_ok = byte_token[static_cast<uint8_t>(piece[i + k])] >= 0;
        if (bytes_ok) {
          for (size_t k = 0; k < len; ++k) add(byte_token[static_cast<uint8_t>(piece[i + k])], i + k, 1, false);
          last_is_unk = false;
        } else if (spec.unk_id) {
          if (spec.fuse_unk && last_is_unk) {
            s.symbols.back().len += static_cast<uint32_t>(len);
          } else {
            add(*spec.unk_id, i, len, false);
          }
          last_is_unk = true;
        }
      }
      i += len;
    }
    if (s.symbols.empty()) return;
    merge_symbols(piece, s);
    for (int32_t i = 0; i >= 0; i = s.symbols[i].next) out.push_back(s.symbols[i].id);
  }

  // Runs the pre-tokenizer steps over one span of normalized text.
  void pre_tokenize(std::string_view text, bool at_start, Scratch& s) const {
    s.pieces.clear();
    s.pieces.push_back({std::string(text), at_start});
    for (size_t r = 0; r < pre.size(); ++r) {
      const PreTokenizerStep& step = pre[r].spec;
      s.next_pieces.clear();
      for (Piece& piece : s.pieces) {
        if (step.kind == PreTokenizerStep::Kind::kMetaspace) {
          std::string replaced = replace_all(piece.text, " ", step.replacement);
          const bool starts = replaced.compare(0, step.replacement.size(), step.replacement) == 0;
          if (!starts && (step.prepend == PreTokenizerStep::Prepend::kAlways ||
                          (step.prepend == PreTokenizerStep::Prepend::kFirst && piece.at_start))) {
            replaced.insert(0, step.replacement);
          }
          if (!step.split) {
            s.next_pieces.push_back({std::move(replaced), piece.at_start});
            continue;
          }
          // Split before every replacement character (MergedWithNext).
          size_t from = 0;
          for (size_t at = replaced.find(step.replacement, 1); at != std::string::npos;
               at = replaced.find(step.replacement, at + step.replacement.size())) {
            s.next_pieces.push_back({replaced.substr(from, at - from), piece.at_start && from == 0});
            from = at;
          }
          if (from < replaced.size()) s.next_pieces.push_back({replaced.substr(from), piece.at_start && from == 0});
          continue;
        }
        split_piece(piece, step, r, s);
      }
      std::swap(s.pieces, s.next_pieces);
    }
  }

  // One regex split step (Hugging Face's Split / ByteLevel regex / Digits) over one piece.
  void split_piece(const Piece& piece, const PreTokenizerStep& step, size_t r, Scratch& s) const {
    s.ranges.clear();
    pre[r].regex->find_all(piece.text, s.match[r].get(), s.ranges);
    // Spans in order: (begin, end, is_match).
    struct Span {
      size_t begin, end;
      bool match;
    };
    std::vector<Span> spans;
    size_t last = 0;
    for (const auto& [b, e] : s.ranges) {
      if (b > last) spans.push_back({last, b, false});
      spans.push_back({b, e, true});
      last = e;
    }
    if (last < piece.text.size()) spans.push_back({last, piece.text.size(), false});
    std::vector<Span> kept;
    switch (step.behavior) {
      case PreTokenizerStep::Behavior::kIsolated:
        kept = spans;
        break;
      case PreTokenizerStep::Behavior::kRemoved:
        for (const Span& sp : spans) {
          if (!sp.match) kept.push_back(sp);
        }
        break;
      case PreTokenizerStep::Behavior::kMergedWithPrevious: {
        bool previous_match = false;
        for (const Span& sp : spans) {
          if (sp.match && !previous_match && !kept.empty()) {
            kept.back().end = sp.end;
          } else {
            kept.push_back(sp);
          }
          previous_match = sp.match;
        }
        break;
      }
      case PreTokenizerStep::Behavior::kMergedWithNext: {
        bool next_match = false;  // walking right to left: whether the span after this one is a match
        for (size_t k = spans.size(); k-- > 0;) {
          const Span& sp = spans[k];
          if (sp.match && !next_match && !kept.empty()) {
            kept.back().begin = sp.begin;
          } else {
            kept.push_back(sp);
          }
          next_match = sp.match;
        }
        std::reverse(kept.begin(), kept.end());
        break;
      }
    }
    for (const Span& sp : kept) {
      s.next_pieces.push_back({piece.text.substr(sp.begin, sp.end - sp.begin), piece.at_start && sp.begin == 0});
    }
  }

  // Normalized text of one span with no raw added token: normalized added tokens, pre-tokenization, BPE.
  void encode_normalized(std::string_view text, bool at_start, bool parse_special, Scratch& s,
                         std::vector<int32_t>& out) const {
    if (text.empty()) return;
    auto model = [&](std::string_view span, bool span_at_start) {
      if (span.empty()) return;
      pre_tokenize(span, span_at_start, s);
      for (const Piece& piece : s.pieces) {
        if (sentencepiece) {
          bpe_chars(piece.text, s, out);
        } else {
          bpe_bytes(piece.text, s, out);
        }
      }
    };
    if (normalized_added.empty()) {
      model(text, at_start);
      return;
    }
    split_added(text, normalized_added, parse_special, [&](std::string_view span, size_t offset, int32_t id) {
      if (id >= 0) {
        out.push_back(id);
      } else {
        model(span, at_start && offset == 0);
      }
    });
  }

  // Cuts the added tokens of `set` out of `text`, as Hugging Face's added vocabulary does: the leftmost-longest
  // matches left to right, none overlapping; a single_word token touching a word character, or a control token
  // without parse_special, is not cut (its text stays in the span around it); lstrip / rstrip widen a match over the
  // whitespace beside it. Calls emit(span, offset, -1) for text and emit(text, offset, id) for tokens, in order.
  template <typename Emit>
  void split_added(std::string_view text, const AddedSet& set, bool parse_special, Emit&& emit) const {
    size_t emitted = 0;  // end of the last thing emitted
    size_t pos = 0;      // where the next search begins
    while (pos < text.size()) {
      // The leftmost-longest match at or after pos.
      size_t at = std::string_view::npos;
      const AddedToken* hit = nullptr;
      for (size_t p = pos; p < text.size() && hit == nullptr; ++p) {
        hit = set.longest_at(text, p);
        at = p;
      }
      if (hit == nullptr) break;
      size_t begin = at, end = at + hit->text.size();
      pos = end;
      if (hit->control && !parse_special) continue;
      if (hit->options.single_word &&
          (ends_with_word_char(text.substr(0, begin)) || starts_with_word_char(text.substr(end)))) {
        continue;
      }
      if (hit->options.lstrip) begin = std::max(begin - trailing_whitespace(text.substr(0, begin)), emitted);
      if (hit->options.rstrip) end += leading_whitespace(text.substr(end));
      if (begin > emitted) emit(text.substr(emitted, begin - emitted), emitted, -1);
      emit(text.substr(begin, end - begin), begin, hit->id);
      emitted = end;
      pos = std::max(pos, end);
    }
    if (emitted < text.size()) emit(text.substr(emitted), emitted, -1);
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Validation and construction.

Result<Tokenizer> Tokenizer::create(TokenizerSpec spec) {
  if (spec.model != "gpt2" && spec.model != "llama") {
    return unimplemented(
        "tokenizer model '{}' is not supported (supported: 'gpt2' byte-level BPE, 'llama' SentencePiece BPE)",
        spec.model);
  }
  const size_t n_vocab = spec.tokens.size();
  if (n_vocab == 0) return data_loss("tokenizer has no tokens");
  if (n_vocab > static_cast<size_t>(INT32_MAX)) return data_loss("tokenizer has {} tokens, more than int32", n_vocab);
  if (!spec.token_types.empty() && spec.token_types.size() != n_vocab) {
    return data_loss("tokenizer has {} token types for {} tokens", spec.token_types.size(), n_vocab);
  }
  for (size_t i = 0; i < spec.token_types.size(); ++i) {
    if (spec.token_types[i] < 0 || spec.token_types[i] > static_cast<int32_t>(TokenType::kByte)) {
      return data_loss("token {} has type {}, outside 0..6", i, spec.token_types[i]);
    }
  }
  if (!spec.scores.empty() && spec.scores.size() != n_vocab) {
    return data_loss("tokenizer has {} scores for {} tokens", spec.scores.size(), n_vocab);
  }
  const std::pair<const char*, const std::optional<int32_t>*> special_ids[] = {
      {"bos_id", &spec.bos_id}, {"eos_id", &spec.eos_id}, {"eot_id", &spec.eot_id},
      {"pad_id", &spec.pad_id}, {"unk_id", &spec.unk_id}};
  for (const auto& [name, id] : special_ids) {
    if (id->has_value() && (**id < 0 || static_cast<size_t>(**id) >= n_vocab)) {
      return data_loss("tokenizer {} = {} is outside the vocabulary [0, {})", name, **id, n_vocab);
    }
  }
  for (const AddedTokenSpec& a : spec.added_tokens) {
    if (a.id < 0 || static_cast<size_t>(a.id) >= n_vocab) {
      return data_loss("added token id {} is outside the vocabulary [0, {})", a.id, n_vocab);
    }
  }
  if (spec.add_bos && !spec.bos_id) return data_loss("tokenizer adds BOS but has no bos_id");
  if (spec.add_eos && !spec.eos_id) return data_loss("tokenizer adds EOS but has no eos_id");

  auto impl = std::make_shared<TokenizerImpl>();
  TokenizerImpl& t = *impl;
  t.spec = std::move(spec);
  t.sentencepiece = t.spec.model == "llama";
  if (t.sentencepiece && t.spec.merges.empty()) {
    if (t.spec.scores.empty()) return data_loss("tokenizer model 'llama' has neither merges nor scores");
    t.by_score = true;
  }
  if (!t.sentencepiece && t.spec.byte_fallback) {
    return unimplemented("byte_fallback with the byte-level model 'gpt2' is not supported");
  }

  SS_ASSIGN_OR_RETURN(t.normalizer, tokenizer_unicode::Normalizer::create(t.spec.normalizers));

  // Pre-tokenizer steps: explicit steps, else (byte-level) the regexes, else the named pre-tokenizer's regexes.
  std::vector<PreTokenizerStep> steps = t.spec.pre_steps;
  if (steps.empty() && !t.sentencepiece) {
    std::vector<std::string> regexes = t.spec.pre_regexes;
    if (regexes.empty()) {
      SS_ASSIGN_OR_RETURN(regexes, regexes_for_pre(t.spec.pre));
    }
    for (std::string& pattern : regexes) {
      PreTokenizerStep step;
      step.pattern = std::move(pattern);
      steps.push_back(std::move(step));
    }
  }
  for (PreTokenizerStep& step : steps) {
    TokenizerImpl::PreStep compiled;
    if (step.kind == PreTokenizerStep::Kind::kMetaspace) {
      if (!t.sentencepiece) return unimplemented("Metaspace pre-tokenizer with the byte-level model 'gpt2'");
      if (step.replacement.empty()) return data_loss("Metaspace pre-tokenizer with an empty replacement");
    } else {
      if (step.invert && step.behavior != PreTokenizerStep::Behavior::kIsolated) {
        return unimplemented("Split with invert=true is supported only with behavior Isolated");
      }
      SS_ASSIGN_OR_RETURN(compiled.regex, PreRegex::compile(step.pattern));
    }
    compiled.spec = std::move(step);
    t.pre.push_back(std::move(compiled));
  }

  // An added token matched in the normalized text is the normalized form of its content, in matching and in
  // decoding (Hugging Face normalizes the content when it builds its matcher: "fizz" behind Prepend("\u2581") is
  // "\u2581fizz").
  if (!t.normalizer.empty()) {
    for (const AddedTokenSpec& a : t.spec.added_tokens) {
      const TokenType type = t.type(a.id);
      if (!a.normalized || (type != TokenType::kControl && type != TokenType::kUserDefined)) continue;
      std::string& text = t.spec.tokens[static_cast<size_t>(a.id)];
      std::string normalized = t.normalizer.apply(text);
      if (!normalized.empty()) text = std::move(normalized);
    }
  }

  // Vocabulary lookups. A text that occurs twice keeps its first id.
  t.token_to_id.reserve(n_vocab);
  t.token_bytes.resize(n_vocab);
  for (size_t i = 0; i < n_vocab; ++i) {
    const auto id = static_cast<int32_t>(i);
    const std::string& text = t.spec.tokens[i];
    if (!text.empty()) t.token_to_id.emplace(text, id);
    const TokenType type = t.type(id);
    if (t.sentencepiece) {
      // The decoder chain of tokenizer.json runs over every token, added ones included.
      const auto byte = parse_byte_token(text);
      if (byte && t.spec.sp_decoder.byte_fallback) {
        t.token_bytes[i] = std::string(1, static_cast<char>(*byte));
      } else if (t.spec.sp_decoder.replace_marker) {
        t.token_bytes[i] = replace_all(text, kSpaceMarker, " ");
      } else {
        t.token_bytes[i] = text;
      }
      continue;
    }
    switch (type) {
      case TokenType::kControl:
      case TokenType::kUserDefined:
        t.token_bytes[i] = text;  // stored in literal form by converters
        break;
      case TokenType::kByte:
        if (auto byte = parse_byte_token(text)) {
          t.token_bytes[i] = std::string(1, static_cast<char>(*byte));
        } else {
          t.token_bytes[i] = byte_level_decode(text);
        }
        break;
      default:
        t.token_bytes[i] = byte_level_decode(text);
    }
  }
  for (int b = 0; b < 256; ++b) {
    std::optional<int32_t> id;
    if (t.sentencepiece) {
      id = t.find(fmt::format("<0x{:02X}>", b));
    } else {
      id = t.find(byte_level().byte_to_text[b]);
    }
    t.byte_token[b] = id ? *id : -1;
  }

  // Merge ranks.
  t.merges.reserve(t.spec.merges.size());
  for (size_t rank = 0; rank < t.spec.merges.size(); ++rank) {
    const std::string& m = t.spec.merges[rank];
    // Split at the first space after the first character, so a left part may itself start with a space.
    const size_t space = m.size() > 1 ? m.find(' ', 1) : std::string::npos;
    if (space == std::string::npos) return data_loss("merge {} '{}' is not 'left right'", rank, m);
    const std::string_view left = std::string_view(m).substr(0, space);
    const std::string_view right = std::string_view(m).substr(space + 1);
    const auto left_id = t.find(left), right_id = t.find(right);
    if (!left_id || !right_id) {
      return data_loss("merge {} '{}' names token '{}' that is not in the vocabulary", rank, m,
                       left_id ? right : left);
    }
    std::string merged;
    merged.reserve(m.size() - 1);
    merged.append(left).append(right);
    const auto merged_id = t.find(merged);
    if (!merged_id) return data_loss("merge {} '{}' makes '{}' that is not in the vocabulary", rank, m, merged);
    t.merges.try_emplace(pair_key(*left_id, *right_id),
                         TokenizerImpl::Merge{static_cast<int32_t>(rank), *merged_id});
  }

  // Added tokens: control and user-defined tokens, raw or normalized per their options.
  std::unordered_map<int32_t, AddedTokenSpec> options;
  for (const AddedTokenSpec& a : t.spec.added_tokens) options[a.id] = a;
  for (size_t i = 0; i < n_vocab; ++i) {
    const auto id = static_cast<int32_t>(i);
    const TokenType type = t.type(id);
    const bool special = type == TokenType::kControl || type == TokenType::kUnknown;
    if ((!special && type != TokenType::kUserDefined) || t.spec.tokens[i].empty()) continue;
    AddedTokenSpec opt;
    opt.id = id;
    if (auto it = options.find(id); it != options.end()) opt = it->second;
    TokenizerImpl::AddedSet& set = opt.normalized ? t.normalized_added : t.raw_added;
    set.tokens.push_back({t.spec.tokens[i], id, special, opt});
  }
  for (TokenizerImpl::AddedSet* set : {&t.raw_added, &t.normalized_added}) {
    for (size_t k = 0; k < set->tokens.size(); ++k) set->insert(k);  // id order: a repeated text keeps its first id
  }

  // End of generation.
  if (!t.spec.eot_id) {
    for (std::string_view text : kEndOfTurnTexts) {
      auto id = t.find(text);
      if (id && t.type(*id) == TokenType::kControl) {
        t.spec.eot_id = id;
        break;
      }
    }
  }
  t.end_of_generation.assign(n_vocab, 0);
  for (std::string_view text : kEndOfGenerationTexts) {
    auto id = t.find(text);
    if (id && (t.type(*id) == TokenType::kControl || t.spec.token_types.empty())) t.end_of_generation[*id] = 1;
  }
  if (t.spec.eos_id) t.end_of_generation[*t.spec.eos_id] = 1;
  if (t.spec.eot_id) t.end_of_generation[*t.spec.eot_id] = 1;

  return Tokenizer(std::move(impl));
}

// ---------------------------------------------------------------------------------------------------------------
// Encode / decode.

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special, bool parse_special) const {
  const TokenizerImpl& t = *impl_;
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 2);
  if (add_special && t.spec.add_bos) out.push_back(*t.spec.bos_id);

  TokenizerImpl::Scratch scratch;
  for (const auto& step : t.pre) {
    scratch.match.emplace_back(step.regex ? pcre2_match_data_create_from_pattern(step.regex->code(), nullptr)
                                          : nullptr);
  }
  auto encode_span = [&](std::string_view span, size_t offset) {
    if (span.empty()) return;
    if (t.normalizer.empty()) {
      t.encode_normalized(span, offset == 0, parse_special, scratch, out);
    } else {
      t.encode_normalized(t.normalizer.apply(span), offset == 0, parse_special, scratch, out);
    }
  };
  t.split_added(text, t.raw_added, parse_special, [&](std::string_view span, size_t offset, int32_t id) {
    if (id >= 0) {
      out.push_back(id);
    } else {
      encode_span(span, offset);
    }
  });

  if (add_special && t.spec.add_eos) out.push_back(*t.spec.eos_id);
  return out;
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special) const {
  const TokenizerImpl& t = *impl_;
  std::string bytes;
  bool first = true;
  for (int32_t id : ids) {
    if (id < 0 || id >= n_vocab()) continue;
    if (skip_special && t.is_special(id)) continue;
    bytes += first ? t.first_token_bytes(id) : t.token_bytes[static_cast<size_t>(id)];
    first = false;
  }
  size_t strip = 0;
  if (t.sentencepiece) {
    while (strip < bytes.size() && static_cast<int>(strip) < t.spec.sp_decoder.strip_leading && bytes[strip] == ' ') {
      ++strip;
    }
  }
  std::string out;
  append_utf8_lossy(std::string_view(bytes).substr(strip), out);
  return out;
}

std::string Tokenizer::token_to_bytes(int32_t id) const {
  if (id < 0 || id >= n_vocab()) return {};
  return impl_->token_bytes[static_cast<size_t>(id)];
}

std::optional<int32_t> Tokenizer::token_id(std::string_view token_text) const { return impl_->find(token_text); }

TokenType Tokenizer::token_type(int32_t id) const {
  if (id < 0 || id >= n_vocab()) return TokenType::kUndefined;
  return impl_->type(id);
}

std::string Tokenizer::kind() const { return impl_->sentencepiece ? "SentencePiece BPE" : "byte-level BPE"; }
int32_t Tokenizer::n_vocab() const { return static_cast<int32_t>(impl_->spec.tokens.size()); }
std::optional<int32_t> Tokenizer::bos_id() const { return impl_->spec.bos_id; }
std::optional<int32_t> Tokenizer::eos_id() const { return impl_->spec.eos_id; }
std::optional<int32_t> Tokenizer::eot_id() const { return impl_->spec.eot_id; }
std::optional<int32_t> Tokenizer::pad_id() const { return impl_->spec.pad_id; }
bool Tokenizer::add_bos() const { return impl_->spec.add_bos; }
bool Tokenizer::add_eos() const { return impl_->spec.add_eos; }
const std::string& Tokenizer::chat_template() const { return impl_->spec.chat_template; }

bool Tokenizer::is_end_of_generation(int32_t id) const {
  return id >= 0 && id < n_vocab() && impl_->end_of_generation[static_cast<size_t>(id)] != 0;
}

Tokenizer::StreamDecoder::StreamDecoder(const Tokenizer& tokenizer, bool skip_special)
    : impl_(tokenizer.impl_), skip_special_(skip_special) {}

std::string Tokenizer::StreamDecoder::push(int32_t id) {
  if (id < 0 || static_cast<size_t>(id) >= impl_->spec.tokens.size()) return {};
  if (skip_special_ && impl_->is_special(id)) return {};
  pending_ += pushed_ == 0 ? impl_->first_token_bytes(id) : impl_->token_bytes[static_cast<size_t>(id)];
  ++pushed_;
  // The decoder's leading strip: spaces at the very start of the text, up to strip_leading of them.
  const int strip_leading = impl_->sentencepiece ? impl_->spec.sp_decoder.strip_leading : 0;
  while (stripped_ >= 0 && !pending_.empty()) {
    if (stripped_ < strip_leading && pending_[0] == ' ') {
      pending_.erase(0, 1);
      ++stripped_;
    } else {
      stripped_ = -1;
    }
  }
  // Everything up to a trailing truncated sequence is final: lossy conversion replaces ill-formed subparts locally,
  // so converting it now gives the same text as converting the whole sequence at the end.
  size_t keep_from = pending_.size();
  for (size_t i = 0; i < pending_.size();) {
    const Utf8Step step = utf8_step(pending_, i);
    if (step.kind == Utf8Step::kTruncated) {
      keep_from = i;
      break;
    }
    i += step.len;
  }
  std::string out;
  append_utf8_lossy(std::string_view(pending_).substr(0, keep_from), out);
  pending_.erase(0, keep_from);
  return out;
}

std::string Tokenizer::StreamDecoder::flush() {
  std::string out;
  append_utf8_lossy(pending_, out);
  pending_.clear();
  pushed_ = 0;
  stripped_ = 0;
  return out;
}

void append_utf8_lossy(std::string_view bytes, std::string& out) {
  out.reserve(out.size() + bytes.size());
  for (size_t i = 0; i < bytes.size();) {
    const Utf8Step step = utf8_step(bytes, i);
    if (step.kind == Utf8Step::kValid) {
      out.append(bytes.substr(i, step.len));
    } else {
      out.append(kReplacementChar);
    }
    i += step.len;
  }
}

bool is_valid_utf8(std::string_view bytes) {
  for (size_t i = 0; i < bytes.size();) {
    const Utf8Step step = utf8_step(bytes, i);
    if (step.kind != Utf8Step::kValid) return false;
    i += step.len;
  }
  return true;
}

std::span<const std::string_view> known_pre_tokenizers() { return kKnownPre; }
std::string_view gpt2_pre_tokenizer_regex() { return kGpt2Regex; }

}  // namespace starserve
