// Chat templates against Hugging Face apply_chat_template renderings (tests/golden/chat, made by
// scripts/make_tokenizer_golden.py).
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "model/chat_template.h"

#ifndef STARSERVE_GOLDEN_DIR
#error "STARSERVE_GOLDEN_DIR must name tests/golden"
#endif

namespace starserve {
namespace {

using nlohmann::json;

json load_chat_golden(const std::string& name) {
  const std::string path = std::string(STARSERVE_GOLDEN_DIR) + "/chat/" + name + ".json";
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << "missing golden file " << path << "; run scripts/make_tokenizer_golden.py";
  std::stringstream buffer;
  buffer << in.rdbuf();
  return json::parse(buffer.str(), nullptr, false);
}

std::vector<ChatMessage> messages_of(const json& c) {
  std::vector<ChatMessage> out;
  for (const json& m : c["messages"]) out.push_back({m["role"].get<std::string>(), m["content"].get<std::string>()});
  return out;
}

// Every case of a golden file rendered by `tmpl` matches byte for byte.
void expect_matches_golden(const ChatTemplate& tmpl, const json& golden) {
  ASSERT_TRUE(golden.contains("cases"));
  ASSERT_GE(golden["cases"].size(), 4u);
  for (const json& c : golden["cases"]) {
    const auto msgs = messages_of(c);
    const bool gen = c["add_generation_prompt"].get<bool>();
    EXPECT_EQ(tmpl.apply(msgs, gen), c["text"].get<std::string>())
        << tmpl.name() << " add_generation_prompt=" << gen << " messages=" << c["messages"].dump();
  }
}

class ChatGolden : public ::testing::TestWithParam<const char*> {};

// The template text of each golden file is detected as its family and renders like Hugging Face.
TEST_P(ChatGolden, DetectedTemplateMatchesHuggingFace) {
  const json golden = load_chat_golden(GetParam());
  ASSERT_FALSE(golden.is_discarded());
  auto tmpl = ChatTemplate::detect(golden["template"].get<std::string>());
  ASSERT_TRUE(tmpl.ok()) << tmpl.status().to_string();
  EXPECT_EQ(tmpl->name(), golden["family"].get<std::string>());
  expect_matches_golden(*tmpl, golden);
}

// The same template text run by the Jinja engine (what a model carrying it gets) renders like Hugging Face too.
TEST_P(ChatGolden, JinjaEngineMatchesHuggingFace) {
  const json golden = load_chat_golden(GetParam());
  ASSERT_FALSE(golden.is_discarded());
  const json tokens = golden.value("special_tokens", json::object());
  auto tmpl = ChatTemplate::from_jinja(golden["template"].get<std::string>(), tokens.value("bos_token", ""),
                                       tokens.value("eos_token", ""));
  ASSERT_TRUE(tmpl.ok()) << tmpl.status().to_string();
  EXPECT_EQ(tmpl->family(), ChatTemplate::Family::kJinja);
  expect_matches_golden(*tmpl, golden);
}

INSTANTIATE_TEST_SUITE_P(Families, ChatGolden,
                         ::testing::Values("smollm2", "chatml", "qwen", "llama3", "llama2", "mistral", "gemma"),
                         [](const ::testing::TestParamInfo<const char*>& info) { return std::string(info.param); });

// Built-ins by name render the hand-written family templates of the golden script.
TEST(ChatTemplate, BuiltinsMatchHuggingFace) {
  for (std::string_view name : ChatTemplate::builtin_names()) {
    auto tmpl = ChatTemplate::builtin(name);
    ASSERT_TRUE(tmpl.ok()) << tmpl.status().to_string();
    EXPECT_EQ(tmpl->name(), name);
    expect_matches_golden(*tmpl, load_chat_golden(std::string(name)));
  }
}

TEST(ChatTemplate, SmolLM2DefaultSystemIsExtractedFromTheTemplate) {
  const json golden = load_chat_golden("smollm2");
  auto tmpl = ChatTemplate::detect(golden["template"].get<std::string>());
  ASSERT_TRUE(tmpl.ok()) << tmpl.status().to_string();
  EXPECT_EQ(tmpl->default_system(), "You are a helpful AI assistant named SmolLM, trained by Hugging Face");
  // With an explicit system message the default is not inserted.
  const std::vector<ChatMessage> msgs = {{"system", "S"}, {"user", "U"}};
  EXPECT_EQ(tmpl->apply(msgs, false), "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n");
}

TEST(ChatTemplate, DefaultSystemWrittenWithJinjaEscapes) {
  // Template text as it appears in tokenizer_config.json after JSON decoding: the newline is the escape \n.
  const std::string text =
      "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nBe brief, it\\'s late.<|im_end|>\\n' }}"
      "{% endif %}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
      "'<|im_end|>' + '\\n'}}{% endfor %}";
  auto tmpl = ChatTemplate::detect(text);
  ASSERT_TRUE(tmpl.ok()) << tmpl.status().to_string();
  EXPECT_EQ(tmpl->default_system(), "Be brief, it's late.");
}

TEST(ChatTemplate, SystemBuiltFromVariablesIsNotADefault) {
  const std::string text =
      "{% for message in messages %}{{'<|im_start|>system\\n' + message['content'] + '<|im_end|>'}}{% endfor %}";
  auto tmpl = ChatTemplate::detect(text);
  ASSERT_TRUE(tmpl.ok());
  EXPECT_EQ(tmpl->name(), "chatml");
  EXPECT_EQ(tmpl->default_system(), "");
}

TEST(ChatTemplate, UnknownTemplatesAreErrorsListingBuiltins) {
  for (const std::string& text : {std::string(""), std::string("{{ messages }}"),
                                 std::string("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}"
                                             "{% endfor %}")}) {
    auto tmpl = ChatTemplate::detect(text);
    ASSERT_FALSE(tmpl.ok()) << "'" << text << "' should not be recognised";
    EXPECT_EQ(tmpl.status().code(), StatusCode::kUnimplemented);
    for (std::string_view name : ChatTemplate::builtin_names()) {
      EXPECT_NE(tmpl.status().message().find(name), std::string::npos) << tmpl.status().message();
    }
  }
  auto missing = ChatTemplate::builtin("vicuna");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), StatusCode::kUnimplemented);
  EXPECT_NE(missing.status().message().find("vicuna"), std::string::npos);
}

TEST(ChatTemplate, VariantsWeDoNotReproduceAreRejected) {
  auto llama31 = ChatTemplate::detect(
      "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}{{- 'Cutting Knowledge Date: December 2023\\n' }}");
  ASSERT_FALSE(llama31.ok());
  EXPECT_EQ(llama31.status().code(), StatusCode::kUnimplemented);
  auto mistral_v3 = ChatTemplate::detect("{{- '[AVAILABLE_TOOLS] [' }}{{- '[INST] ' + content + '[/INST]' }}");
  ASSERT_FALSE(mistral_v3.ok());
  EXPECT_EQ(mistral_v3.status().code(), StatusCode::kUnimplemented);
}

TEST(ChatTemplate, TrimRemovesUnicodeWhitespaceLikePython) {
  auto tmpl = ChatTemplate::builtin("llama3");
  ASSERT_TRUE(tmpl.ok());
  // U+3000 ideographic space and U+00A0 no-break space are whitespace for str.strip(); U+200B is not.
  const std::vector<ChatMessage> msgs = {{"user", "\xE3\x80\x80\xC2\xA0 hi \t\n"}, {"user", "\xE2\x80\x8Bx"}};
  const std::string expected =
      "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
      "<|start_header_id|>user<|end_header_id|>\n\n\xE2\x80\x8Bx<|eot_id|>";
  EXPECT_EQ(tmpl->apply(msgs, false), expected);
  // The Jinja engine's trim filter agrees.
  const json golden = load_chat_golden("llama3");
  auto jinja = ChatTemplate::from_jinja(golden["template"].get<std::string>(), "<|begin_of_text|>", "<|eot_id|>");
  ASSERT_TRUE(jinja.ok()) << jinja.status().to_string();
  EXPECT_EQ(jinja->apply(msgs, false), expected);
}

}  // namespace
}  // namespace starserve
