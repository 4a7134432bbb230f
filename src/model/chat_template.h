// Chat templates: turn a conversation into the prompt text a chat model was trained on.
//
// Two kinds. A Jinja template (Family::kJinja) is the model's own template run by model/jinja.h, as Hugging Face's
// apply_chat_template runs it (tests/golden/chat_templates, made by scripts/golden/make_chat_template_goldens.py).
// The built-ins are native renderings of the common families that reproduce Hugging Face's output for that family
// exactly (tests/golden/chat, made by scripts/make_tokenizer_golden.py); detect() recognises a family from the
// markers of its template text, which is the fallback when a model's Jinja template does not parse.
// select_chat_template() is the one place the choice is made (see there).
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

#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "model/jinja.h"

namespace starserve {

struct ChatMessage {
  std::string role;  // "system", "user", "assistant" (chatml passes any role through)
  std::string content;
};

class ChatTemplate {
 public:
  enum class Family { kChatml, kLlama3, kLlama2, kMistral, kGemma, kJinja };

  // A Jinja template with the model's BOS / EOS token text (the bos_token / eos_token variables; empty when the
  // model has none). A syntax error is kInvalidArgument with the template line. `name` is shown in messages.
  static Result<ChatTemplate> from_jinja(std::string_view jinja_text, std::string bos_token, std::string eos_token,
                                         std::string name = "jinja");

  // Recognises the family of a Jinja chat template (GGUF tokenizer.chat_template or tokenizer_config.json). An empty
  // or unrecognised template is kUnimplemented listing the built-in names.
  static Result<ChatTemplate> detect(const std::string& jinja_text);
  // chatml, llama3, llama2, mistral, gemma, qwen (chatml with Qwen 2.5's default system message).
  static Result<ChatTemplate> builtin(std::string_view name);
  static std::span<const std::string_view> builtin_names();

  // The rendered prompt. The template's variables are messages (role, content), add_generation_prompt, bos_token,
  // eos_token, tools = none and documents = none. For kJinja each segment says where its bytes came from:
  // jinja::kLiteral for the template's own text, i for messages[i].content, jinja::kData for roles; a built-in
  // family gives one kLiteral segment (chat_prompt.cpp locates its contents itself). A Jinja runtime error
  // (raise_exception, an undefined value used in an operation) is kInvalidArgument with the template line.
  Result<std::vector<jinja::Segment>> render(std::span<const ChatMessage> messages, bool add_generation_prompt) const;
  // The rendered text; for kJinja, empty when render() fails.
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
  std::shared_ptr<const jinja::Template> jinja_;  // kJinja only
  std::string bos_token_, eos_token_;             // kJinja only
};

// The chat template of a model, chosen once at start-up:
//   1. template_file set (--chat-template-file): that Jinja file; a file that cannot be read or parsed is an error
//      (the user asked for it).
//   2. builtin_name set (--chat-template): that built-in.
//   3. the model's Jinja template: chat_template.jinja in a Hugging Face model directory (model_path), else the
//      tokenizer's (GGUF tokenizer.chat_template, tokenizer_config.json chat_template). One that does not parse
//      falls back, with a warning naming the syntax error, to the built-in of the family its markers show
//      (detect()), as llama.cpp falls back to its built-in templates; with no such family it is the parse error.
//   4. no template at all: kUnimplemented listing the built-in names (the chat RPCs stay off).
// BOS / EOS token texts come from the tokenizer.
class Tokenizer;
Result<ChatTemplate> select_chat_template(const std::string& template_file, const std::string& builtin_name,
                                          const std::string& model_path, const Tokenizer& tokenizer);

}  // namespace starserve
