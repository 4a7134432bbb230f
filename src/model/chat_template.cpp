#include "model/chat_template.h"

#include <array>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <fmt/format.h>

#include "common/log.h"
#include "model/tokenizer.h"

namespace starserve {
namespace {

constexpr std::array<std::string_view, 6> kBuiltinNames = {"chatml", "llama3", "llama2", "mistral", "gemma", "qwen"};
constexpr std::string_view kQwenDefaultSystem = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";

// Length of the whitespace character (as Python's str.isspace, which Jinja's trim and str.strip use) at s[i], or 0.
size_t whitespace_len(std::string_view s, size_t i) {
  const auto b = [&](size_t k) { return i + k < s.size() ? static_cast<uint8_t>(s[i + k]) : 0; };
  const uint8_t c = b(0);
  if (c == ' ' || (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F)) return 1;
  if (c == 0xC2 && (b(1) == 0x85 || b(1) == 0xA0)) return 2;                       // U+0085, U+00A0
  if (c == 0xE1 && b(1) == 0x9A && b(2) == 0x80) return 3;                          // U+1680
  if (c == 0xE2 && b(1) == 0x80 && (b(2) <= 0x8A || b(2) == 0xA8 || b(2) == 0xA9 || b(2) == 0xAF)) {
    return 3;                                                                       // U+2000..200A, 2028, 2029, 202F
  }
  if (c == 0xE2 && b(1) == 0x81 && b(2) == 0x9F) return 3;                          // U+205F
  if (c == 0xE3 && b(1) == 0x80 && b(2) == 0x80) return 3;                          // U+3000
  return 0;
}

// Jinja's `trim` filter and Python's str.strip(): whitespace removed from both ends.
std::string_view trim(std::string_view s) {
  size_t begin = 0;
  while (begin < s.size()) {
    const size_t n = whitespace_len(s, begin);
    if (n == 0) break;
    begin += n;
  }
  size_t end = s.size();
  while (end > begin) {
    // Step back over one whitespace character: its first byte is one of the last 1..3 bytes.
    size_t found = 0;
    for (size_t n = 1; n <= 3 && n <= end - begin; ++n) {
      if (whitespace_len(s, end - n) == n) {
        found = n;
        break;
      }
    }
    if (found == 0) break;
    end -= found;
  }
  return s.substr(begin, end - begin);
}

// Contents of a Jinja string literal with its escapes (\n, \t, \', \", \\) resolved.
std::string unescape_jinja(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '\\' || i + 1 == s.size()) {
      out.push_back(s[i]);
      continue;
    }
    const char e = s[++i];
    switch (e) {
      case 'n': out.push_back('\n'); break;
      case 't': out.push_back('\t'); break;
      case 'r': out.push_back('\r'); break;
      default: out.push_back(e);  // quotes and backslash stand for themselves
    }
  }
  return out;
}

// A default system message written as one literal, '<|im_start|>system\n...<|im_end|>', inside the template (SmolLM2,
// Qwen 2.5). Occurrences where the text is built from variables (quotes or braces between the markers) are skipped.
std::string chatml_default_system(std::string_view text) {
  constexpr std::string_view kOpen = "<|im_start|>system";
  constexpr std::string_view kClose = "<|im_end|>";
  for (size_t pos = text.find(kOpen); pos != std::string_view::npos; pos = text.find(kOpen, pos + 1)) {
    std::string_view rest = text.substr(pos + kOpen.size());
    if (rest.starts_with("\n")) {
      rest.remove_prefix(1);
    } else if (rest.starts_with("\\n")) {
      rest.remove_prefix(2);
    } else {
      continue;
    }
    const size_t end = rest.find(kClose);
    if (end == std::string_view::npos || end == 0) continue;
    const std::string_view body = rest.substr(0, end);
    bool literal = true;
    for (size_t i = 0; i < body.size() && literal; ++i) {
      const char c = body[i];
      const bool escaped = i > 0 && body[i - 1] == '\\';
      if (c == '{' || c == '}' || ((c == '\'' || c == '"') && !escaped)) literal = false;
    }
    if (literal) return unescape_jinja(body);
  }
  return {};
}

Status unknown_template(std::string_view why) {
  return unimplemented("{}; built-in chat templates: {} (choose one by name)", why, fmt::join(kBuiltinNames, ", "));
}

}  // namespace

std::span<const std::string_view> ChatTemplate::builtin_names() { return kBuiltinNames; }

Result<ChatTemplate> ChatTemplate::builtin(std::string_view name) {
  if (name == "chatml") return ChatTemplate(Family::kChatml, "chatml", "");
  if (name == "qwen") return ChatTemplate(Family::kChatml, "qwen", std::string(kQwenDefaultSystem));
  if (name == "llama3") return ChatTemplate(Family::kLlama3, "llama3", "");
  if (name == "llama2") return ChatTemplate(Family::kLlama2, "llama2", "");
  if (name == "mistral") return ChatTemplate(Family::kMistral, "mistral", "");
  if (name == "gemma") return ChatTemplate(Family::kGemma, "gemma", "");
  return unknown_template(fmt::format("no built-in chat template named '{}'", name));
}

Result<ChatTemplate> ChatTemplate::detect(const std::string& jinja_text) {
  const std::string_view t = jinja_text;
  const auto has = [&](std::string_view marker) { return t.find(marker) != std::string_view::npos; };
  if (trim(t).empty()) return unknown_template("the model has no chat template");
  if (has("<|im_start|>")) {
    std::string system = chatml_default_system(t);
    const bool qwen = system.find("Qwen") != std::string::npos;
    return ChatTemplate(Family::kChatml, qwen ? "qwen" : "chatml", std::move(system));
  }
  if (has("<|start_header_id|>")) {
    // Llama 3.1+ always writes a system header with knowledge cut-off and date lines; we render plain Llama 3 only.
    if (has("Cutting Knowledge Date")) {
      return unknown_template("Llama 3.1-style template (date header in the system turn) is not reproduced");
    }
    return ChatTemplate(Family::kLlama3, "llama3", "");
  }
  if (has("<start_of_turn>")) return ChatTemplate(Family::kGemma, "gemma", "");
  if (has("[INST]")) {
    if (has("<<SYS>>")) return ChatTemplate(Family::kLlama2, "llama2", "");
    // Mistral v0.3+ templates (tool calls, "[/INST]" without a leading space, system before the last user turn)
    // render differently from the v0.1/v0.2 format we reproduce.
    if (has("[AVAILABLE_TOOLS]") || !has(" [/INST]")) {
      return unknown_template("Mistral v0.3-style template ([AVAILABLE_TOOLS] or '[/INST]' without a space) is not "
                              "reproduced");
    }
    return ChatTemplate(Family::kMistral, "mistral", "");
  }
  return unknown_template("chat template not recognised (no <|im_start|>, <|start_header_id|>, <start_of_turn> or "
                          "[INST] marker)");
}

Result<ChatTemplate> ChatTemplate::from_jinja(std::string_view jinja_text, std::string bos_token,
                                              std::string eos_token, std::string name) {
  SS_ASSIGN_OR_RETURN(jinja::Template parsed, jinja::Template::parse(jinja_text));
  ChatTemplate t(Family::kJinja, std::move(name), "");
  t.jinja_ = std::make_shared<const jinja::Template>(std::move(parsed));
  t.bos_token_ = std::move(bos_token);
  t.eos_token_ = std::move(eos_token);
  return t;
}

Result<std::vector<jinja::Segment>> ChatTemplate::render(std::span<const ChatMessage> messages,
                                                         bool add_generation_prompt) const {
  if (family_ != Family::kJinja) return std::vector<jinja::Segment>{{apply(messages, add_generation_prompt)}};
  jinja::Value list = jinja::Value::list();
  for (size_t i = 0; i < messages.size(); ++i) {
    jinja::Value m = jinja::Value::dict();
    m.set("role", jinja::Value::string(messages[i].role, jinja::kData));
    m.set("content", jinja::Value::string(messages[i].content, static_cast<int32_t>(i)));
    list.push_back(std::move(m));
  }
  jinja::Value context = jinja::Value::dict();
  context.set("messages", std::move(list));
  context.set("add_generation_prompt", jinja::Value::boolean(add_generation_prompt));
  // The model's own special tokens: template text, so their control tokens are parsed.
  context.set("bos_token", jinja::Value::string(bos_token_, jinja::kLiteral));
  context.set("eos_token", jinja::Value::string(eos_token_, jinja::kLiteral));
  context.set("tools", jinja::Value::none());
  context.set("documents", jinja::Value::none());
  return jinja_->render(context);
}

std::string ChatTemplate::apply(std::span<const ChatMessage> messages, bool add_generation_prompt) const {
  std::string out;
  if (family_ == Family::kJinja) {
    auto segments = render(messages, add_generation_prompt);
    return segments.ok() ? jinja::join_segments(*segments) : std::string();
  }
  const bool leading_system = !messages.empty() && messages[0].role == "system";
  // Families that fold the system message into the first turn iterate over the rest.
  const std::span<const ChatMessage> rest = leading_system ? messages.subspan(1) : messages;
  switch (family_) {
    case Family::kChatml:
      if (!default_system_.empty() && !messages.empty() && !leading_system) {
        out += "<|im_start|>system\n" + default_system_ + "<|im_end|>\n";
      }
      for (const ChatMessage& m : messages) out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
      if (add_generation_prompt) out += "<|im_start|>assistant\n";
      break;

    case Family::kLlama3:
      out += "<|begin_of_text|>";
      for (const ChatMessage& m : messages) {
        out += "<|start_header_id|>" + m.role + "<|end_header_id|>\n\n";
        out += trim(m.content);
        out += "<|eot_id|>";
      }
      if (add_generation_prompt) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
      break;

    case Family::kLlama2:
      for (size_t i = 0; i < rest.size(); ++i) {
        std::string content = rest[i].content;
        if (i == 0 && leading_system) content = "<<SYS>>\n" + messages[0].content + "\n<</SYS>>\n\n" + content;
        if (rest[i].role == "user") {
          out += "<s>[INST] ";
          out += trim(content);
          out += " [/INST]";
        } else if (rest[i].role == "assistant") {
          out += " ";
          out += trim(content);
          out += " </s>";
        }
      }
      break;

    case Family::kMistral:
      out += "<s>";
      for (size_t i = 0; i < rest.size(); ++i) {
        if (rest[i].role == "user") {
          out += "[INST] ";
          if (i == 0 && leading_system && !messages[0].content.empty()) out += messages[0].content + "\n\n";
          out += rest[i].content + " [/INST]";
        } else if (rest[i].role == "assistant") {
          out += rest[i].content + "</s>";
        }
      }
      break;

    case Family::kGemma:
      out += "<bos>";
      for (size_t i = 0; i < rest.size(); ++i) {
        out += "<start_of_turn>";
        out += rest[i].role == "assistant" ? std::string("model") : rest[i].role;
        out += "\n";
        if (i == 0 && leading_system) out += messages[0].content + "\n\n";
        out += trim(rest[i].content);
        out += "<end_of_turn>\n";
      }
      if (add_generation_prompt) out += "<start_of_turn>model\n";
      break;

    case Family::kJinja: break;  // handled above
  }
  return out;
}

namespace {

Result<std::string> read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return not_found("cannot open chat template file {}", path);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

std::string token_text(const Tokenizer& tok, std::optional<int32_t> id) {
  return id ? tok.token_to_bytes(*id) : std::string();
}

}  // namespace

Result<ChatTemplate> select_chat_template(const std::string& template_file, const std::string& builtin_name,
                                          const std::string& model_path, const Tokenizer& tokenizer) {
  const std::string bos = token_text(tokenizer, tokenizer.bos_id());
  const std::string eos = token_text(tokenizer, tokenizer.eos_id());
  if (!template_file.empty()) {
    SS_ASSIGN_OR_RETURN(std::string text, read_text_file(template_file));
    const std::string name = "jinja:" + std::filesystem::path(template_file).filename().string();
    auto t = ChatTemplate::from_jinja(text, bos, eos, name);
    if (!t.ok()) return invalid_argument("--chat-template-file {}: {}", template_file, t.status().message());
    return t;
  }
  if (!builtin_name.empty()) return ChatTemplate::builtin(builtin_name);

  std::string text = tokenizer.chat_template();
  std::error_code ec;
  const std::filesystem::path dir_file = std::filesystem::path(model_path) / "chat_template.jinja";
  if (!model_path.empty() && std::filesystem::is_directory(model_path, ec) &&
      std::filesystem::is_regular_file(dir_file, ec)) {
    SS_ASSIGN_OR_RETURN(text, read_text_file(dir_file.string()));
  }
  if (trim(text).empty()) return ChatTemplate::detect(text);  // kUnimplemented: no template
  auto t = ChatTemplate::from_jinja(text, bos, eos);
  if (t.ok()) return t;
  auto fallback = ChatTemplate::detect(text);
  if (!fallback.ok()) return t.status();
  log_warn("the model's chat template does not parse ({}); using the built-in {} template instead",
           t.status().message(), fallback->name());
  return fallback;
}

}  // namespace starserve
