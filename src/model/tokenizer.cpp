// Byte-level BPE: see tokenizer.h for the encoding pipeline.
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
#include <nlohmann/json.hpp>

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

void append_code_point(uint32_t cp, std::string& out) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

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
      append_code_point(cp, byte_to_text[b]);
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

  // Appends to `out` the pieces of `text`: every match and every non-empty span between matches, in order.
  void split(std::string_view text, pcre2_match_data* match, std::vector<std::string_view>& out) const {
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
    const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(match);
    size_t emitted = 0;  // end of the last piece pushed
    size_t start = 0;    // where the next search begins
    while (start < text.size()) {
      int rc = pcre2_match(code_, subject, text.size(), start, 0, match, nullptr);
      if (rc < 0 && rc != PCRE2_ERROR_NOMATCH) {
        // A JIT resource limit: the interpreter has none that these patterns can reach.
        rc = pcre2_match(code_, subject, text.size(), start, PCRE2_NO_JIT, match, nullptr);
      }
      if (rc < 0) break;  // no further match: the rest is one unmatched span
      const size_t begin = ovector[0], end = ovector[1];
      if (end == begin) {  // empty match: step over one character and search again
        start = begin + std::max<size_t>(1, utf8_step(text, begin).len);
        continue;
      }
      if (begin > emitted) out.push_back(text.substr(emitted, begin - emitted));
      out.push_back(text.substr(begin, end - begin));
      emitted = start = end;
    }
    if (emitted < text.size()) out.push_back(text.substr(emitted));
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

}  // namespace

// ---------------------------------------------------------------------------------------------------------------

struct TokenizerImpl {
  struct Merge {
    int32_t rank;
    int32_t merged_id;
  };
  struct SpecialToken {
    std::string_view text;  // into spec.tokens
    int32_t id;
    bool control;  // matched only with parse_special
  };

  TokenizerSpec spec;
  std::vector<std::unique_ptr<PreRegex>> pre;
  std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>> token_to_id;
  std::array<int32_t, 256> byte_token{};  // id of the one-character token of each byte, -1 if the vocab lacks it
  std::unordered_map<uint64_t, Merge> merges;  // pair_key(left id, right id) -> rank, merged id
  std::vector<std::string> token_bytes;        // id -> raw bytes
  std::vector<SpecialToken> specials;          // longest first, so the first match at a position is the longest
  std::array<std::vector<uint32_t>, 256> specials_by_first_byte;  // indices into specials, longest first
  std::vector<uint8_t> end_of_generation;      // id -> 1 when is_end_of_generation

  TokenType type(int32_t id) const {
    if (spec.token_types.empty()) return TokenType::kNormal;
    return static_cast<TokenType>(spec.token_types[static_cast<size_t>(id)]);
  }

  std::optional<int32_t> find(std::string_view text) const {
    auto it = token_to_id.find(text);
    if (it == token_to_id.end()) return std::nullopt;
    return it->second;
  }

  // Scratch buffers of one encode call.
  struct Symbol {
    int32_t id;
    int32_t prev, next;  // neighbours among live symbols, -1 at the ends
    bool alive;
  };
  struct Candidate {
    int32_t rank;
    int32_t left, right;       // symbol indices; left is the byte position, so it orders ties leftmost-first
    int32_t left_id, right_id;  // ids when queued: the candidate is stale if either symbol changed since
    int32_t merged_id;
    bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : left > o.left; }
  };
  struct Scratch {
    std::vector<MatchData> match;  // one per pre-tokenizer regex
    std::vector<std::string_view> pieces, next_pieces;
    std::vector<Symbol> symbols;
    std::vector<Candidate> heap;
  };

  // A byte whose one-character token is missing from the vocabulary (SmolLM2 lacks 0x04, 0xF1, 0xFF, ...) becomes the
  // unknown token, or is dropped as Hugging Face BPE does without one. A control token named as unknown
  // (SmolLM2's GGUF says <|endoftext|>) is not used: it would end the document in the middle of the prompt.
  void push_byte(uint8_t byte, std::vector<int32_t>& out) const {
    if (byte_token[byte] >= 0) {
      out.push_back(byte_token[byte]);
    } else if (spec.unk_id && type(*spec.unk_id) != TokenType::kControl) {
      out.push_back(*spec.unk_id);
    }
  }

  // BPE over the bytes of one piece (Sennrich et al. 2016, applied to bytes as in GPT-2): O(n log n) in its length.
  void bpe(std::string_view piece, Scratch& s, std::vector<int32_t>& out) const {
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
      s.symbols[i] = {byte_token[static_cast<uint8_t>(piece[i])], i - 1, i + 1 < n ? i + 1 : -1, true};
    }
    s.heap.clear();
    const auto greater = std::greater<Candidate>();
    auto try_queue = [&](int32_t left, int32_t right) {
      if (left < 0 || right < 0) return;
      const int32_t a = s.symbols[left].id, b = s.symbols[right].id;
      if (a < 0 || b < 0) return;
      auto it = merges.find(pair_key(a, b));
      if (it == merges.end()) return;
      s.heap.push_back({it->second.rank, left, right, a, b, it->second.merged_id});
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
      left.next = right.next;
      right.alive = false;
      if (right.next >= 0) s.symbols[right.next].prev = c.left;
      try_queue(left.prev, c.left);
      try_queue(c.left, left.next);
    }
    for (int32_t i = 0; i >= 0; i = s.symbols[i].next) {
      if (s.symbols[i].id >= 0) {
        out.push_back(s.symbols[i].id);
      } else {
        push_byte(static_cast<uint8_t>(piece[i]), out);
      }
    }
  }

  // Pre-tokenize and BPE one span of text that holds no special token.
  void encode_text(std::string_view text, Scratch& s, std::vector<int32_t>& out) const {
    if (text.empty()) return;
    s.pieces.assign(1, text);
    for (size_t r = 0; r < pre.size(); ++r) {
      s.next_pieces.clear();
      for (std::string_view piece : s.pieces) pre[r]->split(piece, s.match[r].get(), s.next_pieces);
      std::swap(s.pieces, s.next_pieces);
    }
    for (std::string_view piece : s.pieces) bpe(piece, s, out);
  }

  // Leftmost-longest special token at or after `from`: (position, index into specials), or npos.
  std::pair<size_t, size_t> next_special(std::string_view text, size_t from, bool parse_special) const {
    for (size_t pos = from; pos < text.size(); ++pos) {
      for (uint32_t k : specials_by_first_byte[static_cast<uint8_t>(text[pos])]) {
        const SpecialToken& st = specials[k];
        if (st.control && !parse_special) continue;
        if (text.compare(pos, st.text.size(), st.text) == 0) return {pos, k};
      }
    }
    return {std::string_view::npos, 0};
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Validation and construction.

Result<Tokenizer> Tokenizer::create(TokenizerSpec spec) {
  if (spec.model != "gpt2") {
    return unimplemented("tokenizer model '{}' is not supported (only 'gpt2', byte-level BPE)", spec.model);
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
  const std::pair<const char*, const std::optional<int32_t>*> special_ids[] = {
      {"bos_id", &spec.bos_id}, {"eos_id", &spec.eos_id}, {"eot_id", &spec.eot_id},
      {"pad_id", &spec.pad_id}, {"unk_id", &spec.unk_id}};
  for (const auto& [name, id] : special_ids) {
    if (id->has_value() && (**id < 0 || static_cast<size_t>(**id) >= n_vocab)) {
      return data_loss("tokenizer {} = {} is outside the vocabulary [0, {})", name, **id, n_vocab);
    }
  }
  if (spec.add_bos && !spec.bos_id) return data_loss("tokenizer adds BOS but has no bos_id");
  if (spec.add_eos && !spec.eos_id) return data_loss("tokenizer adds EOS but has no eos_id");

  auto impl = std::make_shared<TokenizerImpl>();
  TokenizerImpl& t = *impl;
  t.spec = std::move(spec);

  // Regexes of the pre-tokenizer.
  std::vector<std::string> regexes = t.spec.pre_regexes;
  if (regexes.empty()) {
    SS_ASSIGN_OR_RETURN(regexes, regexes_for_pre(t.spec.pre));
  }
  for (const std::string& pattern : regexes) {
    SS_ASSIGN_OR_RETURN(auto re, PreRegex::compile(pattern));
    t.pre.push_back(std::move(re));
  }

  // Vocabulary lookups. A text that occurs twice keeps its first id.
  t.token_to_id.reserve(n_vocab);
  t.token_bytes.resize(n_vocab);
  for (size_t i = 0; i < n_vocab; ++i) {
    const auto id = static_cast<int32_t>(i);
    const std::string& text = t.spec.tokens[i];
    if (!text.empty()) t.token_to_id.emplace(text, id);
    switch (t.type(id)) {
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
    auto id = t.find(byte_level().byte_to_text[b]);
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

  // Special tokens cut out of the text before pre-tokenization.
  for (size_t i = 0; i < n_vocab; ++i) {
    const auto id = static_cast<int32_t>(i);
    const TokenType type = t.type(id);
    if ((type == TokenType::kControl || type == TokenType::kUserDefined) && !t.spec.tokens[i].empty()) {
      t.specials.push_back({t.spec.tokens[i], id, type == TokenType::kControl});
    }
  }
  std::stable_sort(t.specials.begin(), t.specials.end(),
                   [](const auto& a, const auto& b) { return a.text.size() > b.text.size(); });
  for (size_t k = 0; k < t.specials.size(); ++k) {
    t.specials_by_first_byte[static_cast<uint8_t>(t.specials[k].text[0])].push_back(static_cast<uint32_t>(k));
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
  for (const auto& re : t.pre) scratch.match.emplace_back(pcre2_match_data_create_from_pattern(re->code(), nullptr));

  size_t pos = 0;
  while (pos < text.size()) {
    const auto [at, k] = t.next_special(text, pos, parse_special);
    if (at == std::string_view::npos) {
      t.encode_text(text.substr(pos), scratch, out);
      break;
    }
    t.encode_text(text.substr(pos, at - pos), scratch, out);
    out.push_back(t.specials[k].id);
    pos = at + t.specials[k].text.size();
  }

  if (add_special && t.spec.add_eos) out.push_back(*t.spec.eos_id);
  return out;
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special) const {
  std::string bytes;
  for (int32_t id : ids) {
    if (id < 0 || id >= n_vocab()) continue;
    if (skip_special && impl_->type(id) == TokenType::kControl) continue;
    bytes += impl_->token_bytes[static_cast<size_t>(id)];
  }
  std::string out;
  append_utf8_lossy(bytes, out);
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
  if (skip_special_ && impl_->type(id) == TokenType::kControl) return {};
  pending_ += impl_->token_bytes[static_cast<size_t>(id)];
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

// ---------------------------------------------------------------------------------------------------------------
// Hugging Face tokenizer.json.

namespace {

using nlohmann::json;

Result<json> read_json_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return not_found("cannot open {}", path);
  std::stringstream buffer;
  buffer << in.rdbuf();
  json doc = json::parse(buffer.str(), nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) return data_loss("{} is not valid JSON", path);
  return doc;
}

// Member `key` of an object, nullptr when absent or null.
const json* member(const json& obj, std::string_view key) {
  if (!obj.is_object()) return nullptr;
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return nullptr;
  return &*it;
}

std::string string_member(const json& obj, std::string_view key) {
  const json* v = member(obj, key);
  return v != nullptr && v->is_string() ? v->get<std::string>() : std::string();
}

bool bool_member(const json& obj, std::string_view key, bool fallback) {
  const json* v = member(obj, key);
  return v != nullptr && v->is_boolean() ? v->get<bool>() : fallback;
}

// A literal for PCRE2: every ASCII punctuation character escaped.
std::string regex_escape(std::string_view literal) {
  std::string out;
  for (char c : literal) {
    const auto u = static_cast<unsigned char>(c);
    if (u < 0x80 && !std::isalnum(u)) out.push_back('\\');
    out.push_back(c);
  }
  return out;
}

// Maps a pre_tokenizer node to regex stages. Byte-level mapping must be the last step (later regexes would see
// "Ġ" instead of spaces), and it must be present: this tokenizer only does byte-level BPE.
Status add_hf_pre_tokenizer(const json& node, const std::string& where, std::vector<std::string>& regexes,
                            bool& byte_level_seen) {
  const std::string type = string_member(node, "type");
  if (byte_level_seen) return unimplemented("{}: pre-tokenizer '{}' after ByteLevel is not supported", where, type);
  if (type == "Sequence") {
    const json* list = member(node, "pretokenizers");
    if (list == nullptr || !list->is_array()) return data_loss("{}: Sequence without 'pretokenizers'", where);
    for (const json& child : *list) SS_RETURN_IF_ERROR(add_hf_pre_tokenizer(child, where, regexes, byte_level_seen));
    return Status::ok_status();
  }
  if (type == "Split") {
    const std::string behavior = string_member(node, "behavior");
    if (behavior != "Isolated") {
      return unimplemented("{}: Split behavior '{}' is not supported (only Isolated)", where, behavior);
    }
    if (bool_member(node, "invert", false)) return unimplemented("{}: Split with invert=true is not supported", where);
    const json* pattern = member(node, "pattern");
    if (pattern == nullptr) return data_loss("{}: Split without 'pattern'", where);
    if (const json* re = member(*pattern, "Regex"); re != nullptr && re->is_string()) {
      regexes.push_back(re->get<std::string>());
    } else if (const json* lit = member(*pattern, "String"); lit != nullptr && lit->is_string()) {
      regexes.push_back(regex_escape(lit->get<std::string>()));
    } else {
      return data_loss("{}: Split pattern is neither Regex nor String", where);
    }
    return Status::ok_status();
  }
  if (type == "Digits") {
    regexes.push_back(bool_member(node, "individual_digits", false) ? R"(\p{N})" : R"(\p{N}+)");
    return Status::ok_status();
  }
  if (type == "ByteLevel") {
    if (bool_member(node, "add_prefix_space", false)) {
      return unimplemented("{}: ByteLevel with add_prefix_space=true is not supported", where);
    }
    if (bool_member(node, "use_regex", true)) regexes.emplace_back(kGpt2Regex);
    byte_level_seen = true;
    return Status::ok_status();
  }
  return unimplemented("{}: pre-tokenizer '{}' is not supported (supported: Sequence, Split, Digits, ByteLevel)",
                       where, type.empty() ? node.dump() : type);
}

// Which special tokens a TemplateProcessing post-processor puts around a single sequence.
Status read_post_processor(const json& node, const std::string& where, std::optional<int32_t>& prefix,
                           std::optional<int32_t>& suffix) {
  const std::string type = string_member(node, "type");
  if (type == "ByteLevel") return Status::ok_status();  // offsets only
  if (type == "Sequence") {
    const json* list = member(node, "processors");
    if (list == nullptr || !list->is_array()) return data_loss("{}: Sequence without 'processors'", where);
    for (const json& child : *list) SS_RETURN_IF_ERROR(read_post_processor(child, where, prefix, suffix));
    return Status::ok_status();
  }
  if (type != "TemplateProcessing") {
    return unimplemented("{}: post-processor '{}' is not supported (supported: TemplateProcessing, ByteLevel)", where,
                         type);
  }
  const json* single = member(node, "single");
  const json* special_tokens = member(node, "special_tokens");
  if (single == nullptr || !single->is_array()) return data_loss("{}: TemplateProcessing without 'single'", where);
  bool seen_sequence = false;
  for (const json& item : *single) {
    if (member(item, "Sequence") != nullptr) {
      seen_sequence = true;
      continue;
    }
    const json* st = member(item, "SpecialToken");
    if (st == nullptr) return data_loss("{}: TemplateProcessing item {} is not understood", where, item.dump());
    const std::string name = string_member(*st, "id");
    const json* entry = special_tokens != nullptr ? member(*special_tokens, name) : nullptr;
    const json* ids = entry != nullptr ? member(*entry, "ids") : nullptr;
    if (ids == nullptr || !ids->is_array() || ids->size() != 1 || !(*ids)[0].is_number_integer()) {
      return unimplemented("{}: TemplateProcessing token '{}' must map to exactly one id", where, name);
    }
    std::optional<int32_t>& slot = seen_sequence ? suffix : prefix;
    if (slot) return unimplemented("{}: more than one special token on one side of the sequence", where);
    slot = (*ids)[0].get<int32_t>();
  }
  return Status::ok_status();
}

// tokenizer_config.json names special tokens as a string or as {"content": ...}.
std::string config_token_text(const json& config, std::string_view key) {
  const json* v = member(config, key);
  if (v == nullptr) return {};
  if (v->is_string()) return v->get<std::string>();
  return string_member(*v, "content");
}

}  // namespace

Result<Tokenizer> Tokenizer::from_hf_json(const std::string& tokenizer_json_path,
                                          const std::string& tokenizer_config_path_or_empty) {
  SS_ASSIGN_OR_RETURN(json doc, read_json_file(tokenizer_json_path));
  const std::string& where = tokenizer_json_path;
  TokenizerSpec spec;
  spec.model = "gpt2";
  spec.pre = "tokenizer.json";

  const json* model = member(doc, "model");
  if (model == nullptr) return data_loss("{}: no 'model'", where);
  const std::string model_type = string_member(*model, "type");
  if (!(model_type == "BPE" || (model_type.empty() && member(*model, "merges") != nullptr))) {
    return unimplemented("{}: model type '{}' is not supported (only BPE)", where, model_type);
  }
  if (bool_member(*model, "byte_fallback", false)) {
    return unimplemented("{}: BPE byte_fallback is not supported", where);
  }
  if (!string_member(*model, "continuing_subword_prefix").empty() ||
      !string_member(*model, "end_of_word_suffix").empty()) {
    return unimplemented("{}: BPE subword prefix/suffix is not supported", where);
  }
  if (const json* dropout = member(*model, "dropout"); dropout != nullptr && dropout->is_number() &&
                                                        dropout->get<double>() > 0.0) {
    return unimplemented("{}: BPE dropout is not supported", where);
  }
  spec.ignore_merges = bool_member(*model, "ignore_merges", false);

  // Vocabulary: the model's vocab plus added tokens, dense by id.
  const json* vocab = member(*model, "vocab");
  if (vocab == nullptr || !vocab->is_object()) return data_loss("{}: model has no 'vocab' object", where);
  const json* added = member(doc, "added_tokens");
  int64_t max_id = -1;
  for (const auto& [text, id] : vocab->items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() >= INT32_MAX) {
      return data_loss("{}: vocab entry '{}' has id {}", where, text, id.dump());
    }
    max_id = std::max(max_id, id.get<int64_t>());
  }
  if (added != nullptr) {
    if (!added->is_array()) return data_loss("{}: 'added_tokens' is not an array", where);
    for (const json& a : *added) {
      const json* id = member(a, "id");
      if (id == nullptr || !id->is_number_integer() || id->get<int64_t>() < 0 || id->get<int64_t>() >= INT32_MAX) {
        return data_loss("{}: added token {} has no valid id", where, a.dump());
      }
      max_id = std::max(max_id, id->get<int64_t>());
    }
  }
  if (max_id < 0) return data_loss("{}: empty vocabulary", where);
  spec.tokens.assign(static_cast<size_t>(max_id + 1), std::string());
  spec.token_types.assign(static_cast<size_t>(max_id + 1), static_cast<int32_t>(TokenType::kUnused));
  for (const auto& [text, id] : vocab->items()) {
    spec.tokens[id.get<size_t>()] = text;
    spec.token_types[id.get<size_t>()] = static_cast<int32_t>(TokenType::kNormal);
  }
  if (added != nullptr) {
    for (const json& a : *added) {
      const auto id = member(a, "id")->get<size_t>();
      const std::string content = string_member(a, "content");
      if (bool_member(a, "lstrip", false) || bool_member(a, "rstrip", false) || bool_member(a, "single_word", false)) {
        return unimplemented("{}: added token '{}' uses lstrip/rstrip/single_word, which is not supported", where,
                             content);
      }
      spec.tokens[id] = content;
      spec.token_types[id] = static_cast<int32_t>(bool_member(a, "special", false) ? TokenType::kControl
                                                                                    : TokenType::kUserDefined);
    }
  }
  auto find_text = [&](const std::string& text) -> std::optional<int32_t> {
    if (text.empty()) return std::nullopt;
    for (size_t i = 0; i < spec.tokens.size(); ++i) {
      if (spec.tokens[i] == text) return static_cast<int32_t>(i);
    }
    return std::nullopt;
  };

  // Merges: "a b" strings (tokenizers < 0.20) or ["a", "b"] pairs.
  const json* merges = member(*model, "merges");
  if (merges == nullptr || !merges->is_array()) return data_loss("{}: model has no 'merges' array", where);
  spec.merges.reserve(merges->size());
  for (const json& m : *merges) {
    if (m.is_string()) {
      spec.merges.push_back(m.get<std::string>());
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      spec.merges.push_back(m[0].get<std::string>() + " " + m[1].get<std::string>());
    } else {
      return data_loss("{}: merge {} is neither 'a b' nor [a, b]", where, m.dump());
    }
  }
  if (const std::string unk = string_member(*model, "unk_token"); !unk.empty()) spec.unk_id = find_text(unk);

  // Normalizer: none supported (byte-level BPE models ship without one, except NFC in some).
  if (const json* normalizer = member(doc, "normalizer"); normalizer != nullptr) {
    const json* list = member(*normalizer, "normalizers");
    const bool empty_sequence = string_member(*normalizer, "type") == "Sequence" && list != nullptr &&
                                list->is_array() && list->empty();
    if (!empty_sequence) {
      return unimplemented("{}: normalizer '{}' is not supported", where, string_member(*normalizer, "type"));
    }
  }

  const json* pre = member(doc, "pre_tokenizer");
  bool byte_level_seen = false;
  if (pre != nullptr) SS_RETURN_IF_ERROR(add_hf_pre_tokenizer(*pre, where, spec.pre_regexes, byte_level_seen));
  if (!byte_level_seen) return unimplemented("{}: no ByteLevel pre-tokenizer, so not a byte-level BPE", where);
  // An empty regex list would mean "use the named pre-tokenizer"; ByteLevel(use_regex=false) alone means no split.
  if (spec.pre_regexes.empty()) spec.pre_regexes.push_back(R"((?s).+)");

  if (const json* decoder = member(doc, "decoder"); decoder != nullptr) {
    if (string_member(*decoder, "type") != "ByteLevel") {
      return unimplemented("{}: decoder '{}' is not supported (only ByteLevel)", where,
                           string_member(*decoder, "type"));
    }
  }

  std::optional<int32_t> prefix, suffix;
  if (const json* post = member(doc, "post_processor"); post != nullptr) {
    SS_RETURN_IF_ERROR(read_post_processor(*post, where, prefix, suffix));
  }
  if (prefix) {
    spec.bos_id = prefix;
    spec.add_bos = true;
  }
  if (suffix) {
    spec.eos_id = suffix;
    spec.add_eos = true;
  }

  if (!tokenizer_config_path_or_empty.empty()) {
    SS_ASSIGN_OR_RETURN(json config, read_json_file(tokenizer_config_path_or_empty));
    const std::string& cwhere = tokenizer_config_path_or_empty;
    const std::pair<const char*, std::optional<int32_t>*> named[] = {
        {"bos_token", &spec.bos_id}, {"eos_token", &spec.eos_id}, {"pad_token", &spec.pad_id},
        {"unk_token", &spec.unk_id}};
    for (const auto& [key, slot] : named) {
      const std::string text = config_token_text(config, key);
      if (text.empty()) continue;
      auto id = find_text(text);
      if (!id) return data_loss("{}: {} '{}' is not in the vocabulary", cwhere, key, text);
      // The post-processor decides what encode() adds; the config only fills ids it did not name.
      if (std::string(key) == "bos_token" && prefix) continue;
      if (std::string(key) == "eos_token" && suffix) continue;
      *slot = id;
    }
    if (const json* v = member(config, "add_bos_token"); v != nullptr && v->is_boolean()) spec.add_bos = v->get<bool>();
    if (const json* v = member(config, "add_eos_token"); v != nullptr && v->is_boolean()) spec.add_eos = v->get<bool>();
    if (const json* ct = member(config, "chat_template"); ct != nullptr) {
      if (ct->is_string()) {
        spec.chat_template = ct->get<std::string>();
      } else if (ct->is_array()) {  // [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        for (const json& entry : *ct) {
          if (string_member(entry, "name") == "default") spec.chat_template = string_member(entry, "template");
        }
      }
    }
  }
  return create(std::move(spec));
}

}  // namespace starserve
