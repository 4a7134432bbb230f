// Chat prompts whose control tokens come only from the template.
//
// A message's content is user text: "<|im_end|>\n<|im_start|>system\n..." written in it must stay text, or any
// client could forge a system turn. A rendered conversation is one string, so tokenizing that string with
// parse_special (as the template's own markers need) would parse the content's markers too. Here the contents are
// located in the rendered text first, and control tokens are parsed only outside them.
//
// Jinja templates (the model's own): the renderer keeps the origin of every byte (model/jinja.h), so the contents
// are the bytes that came from them, whatever the template did to them (trim, slicing, concatenation), and control
// tokens are parsed only in the bytes the template wrote itself (its literals, bos_token, eos_token). A marker put
// together from template text and content bytes is not parsed either.
//
// Built-in families, locating the contents: the template is rendered once with every non-empty content replaced by a placeholder (a
// string no content holds and that no template trims), which gives the template's own text between the contents.
// Then twice more, each time with the real content of every other message and placeholders for the rest: a real
// content lies between its neighbours' placeholders, with known template text on either side, so whatever the
// template did to it (trimming, for llama3 / gemma / llama2) is read off exactly. The pieces put together must give
// the real rendering byte for byte; a template that changes text across a content boundary is refused.
//
// For content without control-token text, the ids are exactly tokenizer.encode(text, false, true): the text between
// two of the template's control tokens is tokenized as one piece either way (tests/unit/test_convert.cpp checks it
// on SmolLM2's chatml template).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "common/status.h"
#include "model/chat_template.h"
#include "model/tokenizer.h"

namespace starserve {

struct ChatPrompt {
  static constexpr size_t kNotWritten = static_cast<size_t>(-1);
  struct Special {
    size_t begin = 0, end = 0;  // bytes of text
    int32_t id = -1;
  };

  std::string text;  // ChatTemplate::apply(messages, add_generation_prompt=true), unchanged
  // Per message: [begin, end) of its content in text as the template wrote it (trimmed or not); {kNotWritten,
  // kNotWritten} for an empty content or one the template drops.
  std::vector<std::pair<size_t, size_t>> contents;
  std::vector<Special> specials;  // the template's own control tokens in text, in order

  // Token ids of text[begin, end) (no BOS/EOS added: the template writes them): the template's control tokens where
  // it wrote them, everything else as text (user-defined added tokens are still recognised, as in any text).
  // [begin, end) must not cut a control token.
  std::vector<int32_t> encode(const Tokenizer& tokenizer, size_t begin, size_t end) const;
  std::vector<int32_t> encode(const Tokenizer& tokenizer) const { return encode(tokenizer, 0, text.size()); }
};

// kInvalidArgument naming the message when the template changes text across the edge of a content (so the content
// cannot be kept apart from the template's markers): llama2 with a whitespace-only user turn after a system message.
Result<ChatPrompt> render_chat_prompt(const ChatTemplate& chat_template, std::span<const ChatMessage> messages,
                                      const Tokenizer& tokenizer);

}  // namespace starserve
