// Chat templates: turn a conversation into the prompt text a chat model was trained on.
//
// We do not run Jinja. A weights file's template is recognised by the markers of its family and rendered by native
// code that reproduces Hugging Face's apply_chat_template output for that family exactly (tests/golden/chat, made by
// scripts/make_tokenizer_golden.py). A template of no known family is an error, never a silent fallback: the caller
// can pick a built-in by name instead.
//
// Families (what apply() writes; {c} is a message's content):
//   chatml / qwen  [<|im_start|>system\n{default system}<|im_end|>\n when the first message is not a system one and the
//                  template carries such a default] then <|im_start|>{role}\n{c}<|im_end|>\n per message;
//                  generation prompt <|im_start|>assistant\n
//   llama3         <|begin_of_text|> then <|start_header_id|>{role}<|end_header_id|>\n\n{c trimmed}<|eot_id|>;
//                  generation prompt <|start_header_id|>assistant<|end_header_id|>\n\n
//   llama2         system folded into the first user turn as <<SYS>>\n{s}\n<</SYS>>\n\n; user turns
//                  <s>[INST] {c stripped} [/INST], assistant turns " {c stripped} </s>"; no generation prompt
//   mistral        <s>, user turns [INST] {c} [/INST] (a system message goes before the first user content, then
//                  "\n\n"), assistant turns {c}</s>; no generation prompt
//   gemma          <bos>, <start_of_turn>{user|model}\n{c trimmed}<end_of_turn>\n (a system message goes before the
//                  first turn's content, then "\n\n"); generation prompt <start_of_turn>model\n
// Prompts include the BOS text where the family's template does, so encode them with add_special=false and
// parse_special=true.
#pragma once

#include <span>
#include <string>
#include <string_view>

#include "common/status.h"

namespace starserve {

struct ChatMessage {
  std::string role;  // "system", "user", "assistant" (chatml passes any role through)
  std::string content;
};

class ChatTemplate {
 public:
  enum class Family { kChatml, kLlama3, kLlama2, kMistral, kGemma };

  // Recognises the family of a Jinja chat template (GGUF tokenizer.chat_template or tokenizer_config.json). An empty
  // or unrecognised template is kUnimplemented listing the built-in names.
  static Result<ChatTemplate> detect(const std::string& jinja_text);
  // chatml, llama3, llama2, mistral, gemma, qwen (chatml with Qwen 2.5's default system message).
  static Result<ChatTemplate> builtin(std::string_view name);
  static std::span<const std::string_view> builtin_names();

  std::string apply(std::span<const ChatMessage> messages, bool add_generation_prompt) const;
  std::string_view name() const { return name_; }
  Family family() const { return family_; }
  // System text inserted when the conversation does not start with a system message; empty for none.
  const std::string& default_system() const { return default_system_; }

 private:
  ChatTemplate(Family family, std::string name, std::string default_system)
      : family_(family), name_(std::move(name)), default_system_(std::move(default_system)) {}

  Family family_;
  std::string name_;
  std::string default_system_;
};

}  // namespace starserve
