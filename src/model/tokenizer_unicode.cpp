#include "model/tokenizer_unicode.h"

#include <cstdlib>
#include <memory>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

namespace starserve::tokenizer_unicode {

CodePoint next_code_point(std::string_view s, size_t i) {
  utf8proc_int32_t cp = -1;
  const utf8proc_ssize_t n = utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(s.data() + i),
                                              static_cast<utf8proc_ssize_t>(s.size() - i), &cp);
  if (n <= 0 || cp < 0) return {0xFFFFFFFFu, 1};
  return {static_cast<uint32_t>(cp), static_cast<size_t>(n)};
}

void append_utf8(uint32_t cp, std::string& out) {
  utf8proc_uint8_t buf[4];
  const utf8proc_ssize_t n = utf8proc_encode_char(static_cast<utf8proc_int32_t>(cp), buf);
  out.append(reinterpret_cast<const char*>(buf), static_cast<size_t>(n));
}

bool is_whitespace(uint32_t cp) {
  if ((cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85) return true;
  if (cp > 0x10FFFF) return false;
  const utf8proc_category_t c = utf8proc_category(static_cast<utf8proc_int32_t>(cp));
  return c == UTF8PROC_CATEGORY_ZS || c == UTF8PROC_CATEGORY_ZL || c == UTF8PROC_CATEGORY_ZP;
}

bool is_word_char(uint32_t cp) {
  if (cp == '_') return true;
  if (cp > 0x10FFFF) return false;
  switch (utf8proc_category(static_cast<utf8proc_int32_t>(cp))) {
    case UTF8PROC_CATEGORY_LU: case UTF8PROC_CATEGORY_LL: case UTF8PROC_CATEGORY_LT: case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_LO: case UTF8PROC_CATEGORY_MN: case UTF8PROC_CATEGORY_MC: case UTF8PROC_CATEGORY_ME:
    case UTF8PROC_CATEGORY_ND: case UTF8PROC_CATEGORY_NL: case UTF8PROC_CATEGORY_NO:
      return true;
    default:
      return false;
  }
}

std::string_view normalizer_name(NormalizerStep::Kind kind) {
  switch (kind) {
    case NormalizerStep::Kind::kNfc: return "NFC";
    case NormalizerStep::Kind::kNfd: return "NFD";
    case NormalizerStep::Kind::kNfkc: return "NFKC";
    case NormalizerStep::Kind::kNfkd: return "NFKD";
    case NormalizerStep::Kind::kLowercase: return "Lowercase";
    case NormalizerStep::Kind::kPrepend: return "Prepend";
    case NormalizerStep::Kind::kReplace: return "Replace";
    case NormalizerStep::Kind::kStrip: return "Strip";
  }
  return "?";
}

namespace {

// Calls fn(run, valid) for the maximal valid UTF-8 runs and the ill-formed bytes between them, in order.
template <typename Fn>
void for_each_run(std::string_view text, Fn&& fn) {
  size_t run = 0, i = 0;
  while (i < text.size()) {
    const CodePoint c = next_code_point(text, i);
    if (c.cp == 0xFFFFFFFFu) {
      if (i > run) fn(text.substr(run, i - run), true);
      fn(text.substr(i, 1), false);
      run = i = i + 1;
    } else {
      i += c.len;
    }
  }
  if (i > run) fn(text.substr(run, i - run), true);
}

// A Unicode normalization form of valid UTF-8 (Unicode Standard Annex #15), by utf8proc.
void append_normalized(std::string_view valid, int options, std::string& out) {
  utf8proc_uint8_t* mapped = nullptr;
  const utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(valid.data()),
                                          static_cast<utf8proc_ssize_t>(valid.size()), &mapped,
                                          static_cast<utf8proc_option_t>(UTF8PROC_STABLE | options));
  if (n < 0) {
    out.append(valid);  // not reachable for valid input; keep the text rather than lose it
  } else {
    out.append(reinterpret_cast<const char*>(mapped), static_cast<size_t>(n));
  }
  std::free(mapped);
}

// Full lowercase mapping per character, as Rust's char::to_lowercase: the simple mapping except U+0130, the one
// character whose unconditional lowercase (SpecialCasing.txt) is two code points.
void append_lowercase(std::string_view valid, std::string& out) {
  for (size_t i = 0; i < valid.size();) {
    const CodePoint c = next_code_point(valid, i);
    if (c.cp == 0x130) {
      out.append("i\xCC\x87");
    } else {
      append_utf8(static_cast<uint32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(c.cp))), out);
    }
    i += c.len;
  }
}

std::string strip(std::string_view text, bool left, bool right) {
  size_t begin = 0, end = text.size();
  if (left) {
    while (begin < end) {
      const CodePoint c = next_code_point(text, begin);
      if (c.cp == 0xFFFFFFFFu || !is_whitespace(c.cp)) break;
      begin += c.len;
    }
  }
  if (right) {
    while (end > begin) {
      size_t start = end - 1;  // back to the first byte of the last character
      while (start > begin && (static_cast<uint8_t>(text[start]) & 0xC0) == 0x80) --start;
      const CodePoint c = next_code_point(text, start);
      if (c.cp == 0xFFFFFFFFu || start + c.len != end || !is_whitespace(c.cp)) break;
      end = start;
    }
  }
  return std::string(text.substr(begin, end - begin));
}

std::string replace_literal(std::string_view text, std::string_view pattern, std::string_view content) {
  if (pattern.empty()) return std::string(text);
  std::string out;
  size_t from = 0;
  for (size_t at = text.find(pattern); at != std::string_view::npos; at = text.find(pattern, from)) {
    out.append(text.substr(from, at - from)).append(content);
    from = at + pattern.size();
  }
  out.append(text.substr(from));
  return out;
}

}  // namespace

struct Normalizer::Compiled {
  pcre2_code* code = nullptr;
  ~Compiled() { pcre2_code_free(code); }
};

Result<Normalizer> Normalizer::create(const std::vector<NormalizerStep>& steps) {
  Normalizer n;
  n.steps_ = steps;
  for (const NormalizerStep& step : steps) {
    std::shared_ptr<Compiled> compiled;
    if (step.kind == NormalizerStep::Kind::kReplace && step.pattern_is_regex) {
      int error = 0;
      PCRE2_SIZE offset = 0;
      compiled = std::make_shared<Compiled>();
      compiled->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(step.pattern.data()), step.pattern.size(),
                                     PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &error, &offset, nullptr);
      if (compiled->code == nullptr) {
        PCRE2_UCHAR message[256];
        pcre2_get_error_message(error, message, sizeof(message));
        return data_loss("normalizer Replace regex '{}' does not compile at offset {}: {}", step.pattern, offset,
                         reinterpret_cast<const char*>(message));
      }
    }
    n.compiled_.push_back(std::move(compiled));
  }
  return n;
}

std::string Normalizer::apply(std::string_view input) const {
  std::string text(input);
  for (size_t k = 0; k < steps_.size(); ++k) {
    const NormalizerStep& step = steps_[k];
    std::string out;
    out.reserve(text.size() + 8);
    switch (step.kind) {
      case NormalizerStep::Kind::kNfc:
      case NormalizerStep::Kind::kNfd:
      case NormalizerStep::Kind::kNfkc:
      case NormalizerStep::Kind::kNfkd: {
        int options = 0;
        if (step.kind == NormalizerStep::Kind::kNfc) options = UTF8PROC_COMPOSE;
        if (step.kind == NormalizerStep::Kind::kNfd) options = UTF8PROC_DECOMPOSE;
        if (step.kind == NormalizerStep::Kind::kNfkc) options = UTF8PROC_COMPOSE | UTF8PROC_COMPAT;
        if (step.kind == NormalizerStep::Kind::kNfkd) options = UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT;
        for_each_run(text, [&](std::string_view run, bool valid) {
          if (valid) {
            append_normalized(run, options, out);
          } else {
            out.append(run);
          }
        });
        break;
      }
      case NormalizerStep::Kind::kLowercase:
        for_each_run(text, [&](std::string_view run, bool valid) {
          if (valid) {
            append_lowercase(run, out);
          } else {
            out.append(run);
          }
        });
        break;
      case NormalizerStep::Kind::kPrepend:
        if (!text.empty()) out.append(step.content);
        out.append(text);
        break;
      case NormalizerStep::Kind::kStrip:
        out = strip(text, step.strip_left, step.strip_right);
        break;
      case NormalizerStep::Kind::kReplace:
        if (!step.pattern_is_regex) {
          out = replace_literal(text, step.pattern, step.content);
          break;
        }
        {
          pcre2_code* code = compiled_[k]->code;
          pcre2_match_data* match = pcre2_match_data_create_from_pattern(code, nullptr);
          const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(match);
          size_t from = 0, start = 0;
          while (start <= text.size()) {
            const int rc = pcre2_match(code, reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(), start, 0, match,
                                       nullptr);
            if (rc < 0) break;
            if (ov[1] == ov[0]) {  // an empty match replaces nothing; step over one character
              if (ov[0] >= text.size()) break;
              start = ov[0] + std::max<size_t>(1, next_code_point(text, ov[0]).len);
              continue;
            }
            out.append(text, from, ov[0] - from).append(step.content);
            from = start = ov[1];
          }
          out.append(text, from, std::string::npos);
          pcre2_match_data_free(match);
        }
        break;
    }
    text = std::move(out);
  }
  return text;
}

}  // namespace starserve::tokenizer_unicode
