#include "model/chat_prompt.h"

#include <algorithm>
#include <string_view>

#include <fmt/format.h>

namespace starserve {
namespace {

// A placeholder of one message's content: "\x01" + a tag no content holds + the message index + "\x01". No
// whitespace at either end (U+0001 is none, where U+001C..U+001F are to Python's isspace and so to the templates'
// trim), and no character a template writes.
class Placeholders {
 public:
  explicit Placeholders(std::span<const ChatMessage> messages) {
    for (int k = 0;; ++k) {
      tag_ = fmt::format("\x01starserve-content-{}:", k);
      const bool clash = std::any_of(messages.begin(), messages.end(), [&](const ChatMessage& m) {
        return m.content.find(tag_) != std::string::npos;
      });
      if (!clash) break;
    }
  }
  std::string of(size_t message) const { return fmt::format("{}{}\x01", tag_, message); }

 private:
  std::string tag_;
};

// A content the placeholder rendering wrote: the message and where its placeholder is in that rendering.
struct Slot {
  size_t message = 0;
  size_t at = 0;   // in the placeholder rendering
  size_t len = 0;  // of the placeholder
};

// The template's control tokens in text[from, to) (template text only), appended to p.specials.
Status find_specials(ChatPrompt& p, size_t from, size_t to, const Tokenizer& tokenizer, std::string_view name) {
  const std::string_view part = std::string_view(p.text).substr(from, to - from);
  size_t pos = 0;
  for (int32_t id : tokenizer.encode(part, false, true)) {
    if (tokenizer.token_type(id) != TokenType::kControl) continue;
    const std::string marker = tokenizer.token_to_bytes(id);
    const size_t at = part.find(marker, pos);
    if (marker.empty() || at == std::string_view::npos) {
      return internal_error("control token {} of the {} template's text is not found in it", id, name);
    }
    pos = at + marker.size();
    p.specials.push_back({from + at, from + pos, id});
  }
  return Status();
}

// A Jinja template keeps the origin of every byte (model/jinja.h): contents are the segments of origin i, and
// control tokens are parsed in the kLiteral segments only. Data next to template text is never joined with it into
// one marker: each literal segment is parsed on its own.
Result<ChatPrompt> render_jinja_prompt(const ChatTemplate& tmpl, std::span<const ChatMessage> messages,
                                       const Tokenizer& tokenizer) {
  SS_ASSIGN_OR_RETURN(const std::vector<jinja::Segment> segments,
                      tmpl.render(messages, /*add_generation_prompt=*/true));
  ChatPrompt p;
  p.contents.assign(messages.size(), {ChatPrompt::kNotWritten, ChatPrompt::kNotWritten});
  for (const jinja::Segment& s : segments) {
    const size_t begin = p.text.size();
    p.text += s.text;
    if (s.origin == jinja::kLiteral) {
      SS_RETURN_IF_ERROR(find_specials(p, begin, p.text.size(), tokenizer, tmpl.name()));
    } else if (s.origin >= 0 && static_cast<size_t>(s.origin) < messages.size()) {
      // The first stretch of the content as written (a template may write a content more than once).
      auto& span = p.contents[static_cast<size_t>(s.origin)];
      if (span.first == ChatPrompt::kNotWritten) span = {begin, p.text.size()};
      else if (span.second == begin) span.second = p.text.size();
    }
  }
  return p;
}

}  // namespace

std::vector<int32_t> ChatPrompt::encode(const Tokenizer& tokenizer, size_t begin, size_t end) const {
  std::vector<int32_t> out;
  const std::string_view all(text);
  size_t pos = begin;
  for (const Special& s : specials) {
    if (s.begin < begin || s.end > end) continue;
    const std::vector<int32_t> piece = tokenizer.encode(all.substr(pos, s.begin - pos), false, false);
    out.insert(out.end(), piece.begin(), piece.end());
    out.push_back(s.id);
    pos = s.end;
  }
  const std::vector<int32_t> rest = tokenizer.encode(all.substr(pos, end - pos), false, false);
  out.insert(out.end(), rest.begin(), rest.end());
  return out;
}

Result<ChatPrompt> render_chat_prompt(const ChatTemplate& tmpl, std::span<const ChatMessage> messages,
                                      const Tokenizer& tokenizer) {
  if (tmpl.family() == ChatTemplate::Family::kJinja) return render_jinja_prompt(tmpl, messages, tokenizer);
  ChatPrompt p;
  p.text = tmpl.apply(messages, /*add_generation_prompt=*/true);
  p.contents.assign(messages.size(), {ChatPrompt::kNotWritten, ChatPrompt::kNotWritten});

  // 1. Every non-empty content as a placeholder: the template's own text and where each content goes.
  const Placeholders placeholders(messages);
  std::vector<ChatMessage> masked(messages.begin(), messages.end());
  for (size_t i = 0; i < masked.size(); ++i) {
    if (!masked[i].content.empty()) masked[i].content = placeholders.of(i);
  }
  const std::string skeleton = tmpl.apply(masked, true);
  std::vector<Slot> slots;
  for (size_t i = 0; i < masked.size(); ++i) {
    if (messages[i].content.empty()) continue;
    const size_t at = skeleton.find(masked[i].content);
    if (at == std::string::npos) continue;  // the template drops this message
    if (skeleton.find(masked[i].content, at + 1) != std::string::npos) {
      return invalid_argument("the {} chat template writes messages[{}].content twice", tmpl.name(), i);
    }
    slots.push_back({i, at, masked[i].content.size()});
  }
  std::sort(slots.begin(), slots.end(), [](const Slot& a, const Slot& b) { return a.at < b.at; });
  const size_t n = slots.size();
  // Template text before slot k (k = n: after the last one).
  const auto template_before = [&](size_t k) {
    const size_t from = k == 0 ? 0 : slots[k - 1].at + slots[k - 1].len;
    const size_t to = k == n ? skeleton.size() : slots[k].at;
    return std::string_view(skeleton).substr(from, to - from);
  };
  const auto cannot_place = [&](size_t message) {
    return invalid_argument("the {} chat template changes the text around messages[{}].content, so it cannot be "
                            "kept apart from the template's markers",
                            tmpl.name(), message);
  };

  // 2. Real contents of every other slot between their neighbours' placeholders.
  std::vector<std::string> written(n);
  for (size_t parity = 0; parity < 2 && parity < n; ++parity) {
    std::vector<ChatMessage> half = masked;
    for (size_t k = parity; k < n; k += 2) half[slots[k].message].content = messages[slots[k].message].content;
    const std::string rendered = tmpl.apply(half, true);
    size_t cursor = 0;  // end of the previous placeholder in `rendered`
    for (size_t k = 0; k < n; ++k) {
      const std::string& mine = half[slots[k].message].content;
      if (k % 2 != parity) {
        const size_t at = rendered.find(mine, cursor);  // no content holds the placeholder tag
        if (at == std::string::npos) return cannot_place(slots[k].message);
        cursor = at + mine.size();
        continue;
      }
      size_t right = rendered.size();
      if (k + 1 < n) {
        right = rendered.find(half[slots[k + 1].message].content, cursor);
        if (right == std::string::npos) return cannot_place(slots[k].message);
      }
      const std::string_view before = template_before(k), after = template_before(k + 1);
      if (right < cursor + before.size() + after.size() ||
          std::string_view(rendered).substr(cursor, before.size()) != before ||
          std::string_view(rendered).substr(right - after.size(), after.size()) != after) {
        return cannot_place(slots[k].message);
      }
      written[k] = rendered.substr(cursor + before.size(), right - after.size() - cursor - before.size());
      cursor = right - after.size();
    }
  }

  // 3. Template text and contents put together must be the real rendering; spans of the contents in it.
  std::string joined;
  joined.reserve(p.text.size());
  for (size_t k = 0; k < n; ++k) {
    joined += template_before(k);
    p.contents[slots[k].message] = {joined.size(), joined.size() + written[k].size()};
    joined += written[k];
  }
  joined += template_before(n);
  if (joined != p.text) return cannot_place(n > 0 ? slots[0].message : 0);

  // 4. The template's control tokens, from its own text only: each stretch between two contents.
  size_t from = 0;
  for (size_t k = 0; k <= n; ++k) {
    const size_t to = k == n ? p.text.size() : p.contents[slots[k].message].first;
    SS_RETURN_IF_ERROR(find_specials(p, from, to, tokenizer, tmpl.name()));
    if (k < n) from = p.contents[slots[k].message].second;
  }
  return p;
}

}  // namespace starserve
