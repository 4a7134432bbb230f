// Unicode pieces of the tokenizer, over utf8proc: normalization forms, case mapping, character classes. Internal
// to src/model/tokenizer*.cpp.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "common/status.h"
#include "model/tokenizer.h"

namespace starserve::tokenizer_unicode {

// The code point of the valid UTF-8 sequence at s[i] and its length; {0xFFFFFFFF, 1} for an invalid byte.
struct CodePoint {
  uint32_t cp;
  size_t len;
};
CodePoint next_code_point(std::string_view s, size_t i);
void append_utf8(uint32_t cp, std::string& out);

// Unicode White_Space (Rust's char::is_whitespace, which Hugging Face's Strip and lstrip/rstrip use).
bool is_whitespace(uint32_t cp);
// Letters, marks, numbers and '_' (a word character for added tokens' single_word).
bool is_word_char(uint32_t cp);

// A compiled normalizer step list. Text that is not valid UTF-8 is normalized run by run: the ill-formed bytes pass
// through unchanged.
class Normalizer {
 public:
  static Result<Normalizer> create(const std::vector<NormalizerStep>& steps);
  bool empty() const { return steps_.empty(); }
  std::string apply(std::string_view text) const;

 private:
  struct Compiled;
  std::vector<NormalizerStep> steps_;
  std::vector<std::shared_ptr<const Compiled>> compiled_;  // per step: the regex of a regex kReplace, else null
};

// Names for messages.
std::string_view normalizer_name(NormalizerStep::Kind kind);

}  // namespace starserve::tokenizer_unicode
