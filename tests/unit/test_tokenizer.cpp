// Byte-level BPE tokenizer against Hugging Face `tokenizers` ids (tests/golden/tokenizer, made by
// scripts/make_tokenizer_golden.py) on the real SmolLM2 vocabulary read from the GGUF file, plus the tokenizer.json
// path, streaming detokenization and spec validation.
#include <cstdio>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "model/chat_template.h"
#include "model/gguf.h"
#include "model/tokenizer.h"
#include "model/tokenizer_gguf.h"

#ifndef STARSERVE_GOLDEN_DIR
#error "STARSERVE_GOLDEN_DIR must name tests/golden"
#endif
#ifndef STARSERVE_DEFAULT_MODEL
#error "STARSERVE_DEFAULT_MODEL must name the SmolLM2 GGUF file"
#endif

namespace starserve {
namespace {

using nlohmann::json;

std::string golden_path(const std::string& rel) { return std::string(STARSERVE_GOLDEN_DIR) + "/" + rel; }

json load_golden(const std::string& rel) {
  std::ifstream in(golden_path(rel));
  EXPECT_TRUE(in.good()) << "missing golden file " << golden_path(rel) << "; run scripts/make_tokenizer_golden.py";
  std::stringstream buffer;
  buffer << in.rdbuf();
  json doc = json::parse(buffer.str(), nullptr, false);
  EXPECT_FALSE(doc.is_discarded()) << golden_path(rel);
  return doc;
}

// The SmolLM2 tokenizer spec from the GGUF file, read once. Empty Result message when the file is missing.
const Result<TokenizerSpec>& smollm2_spec() {
  static const Result<TokenizerSpec> spec = []() -> Result<TokenizerSpec> {
    SS_ASSIGN_OR_RETURN(auto file, gguf::GgufFile::open(STARSERVE_DEFAULT_MODEL));
    return tokenizer_spec_from_gguf(*file);
  }();
  return spec;
}

// Fails the test (with how to get the model) when the GGUF file cannot be read.
#define REQUIRE_SMOLLM2_SPEC()                                                                                    \
  do {                                                                                                            \
    ASSERT_TRUE(smollm2_spec().ok()) << "cannot read the tokenizer of " STARSERVE_DEFAULT_MODEL ": "             \
                                     << smollm2_spec().status().to_string()                                      \
                                     << "\nRun scripts/test.sh, which fetches the model, before the unit tests."; \
  } while (0)

const Tokenizer& smollm2() {
  static const Tokenizer tok = [] {
    auto t = Tokenizer::create(smollm2_spec().value());
    EXPECT_TRUE(t.ok()) << t.status().to_string();
    return std::move(t).value();
  }();
  return tok;
}

std::vector<int32_t> ids_of(const json& array) { return array.get<std::vector<int32_t>>(); }

std::string printable(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      case '\r': out += "\\r"; break;
      default: out.push_back(c);
    }
  }
  return out;
}

// encode(text) matches the golden ids with and without special-token parsing, and decodes back to the text.
// `with_bos`: the golden ids were made with add_special_tokens=True (BOS first).
void expect_golden(const Tokenizer& tok, const json& golden, bool with_bos) {
  ASSERT_GE(golden["cases"].size(), 30u);
  for (const json& c : golden["cases"]) {
    const std::string text = c["text"].get<std::string>();
    const std::vector<int32_t> ids = ids_of(c["ids"]);
    EXPECT_EQ(tok.encode(text, with_bos, /*parse_special=*/true), ids) << "text: '" << printable(text) << "'";
    EXPECT_EQ(tok.encode(text, with_bos, /*parse_special=*/false), ids_of(c["ids_plain"]))
        << "parse_special=false, text: '" << printable(text) << "'";
    const std::span<const int32_t> body = with_bos ? std::span(ids).subspan(1) : std::span(ids);
    if (!c.value("lossy", false)) {
      EXPECT_EQ(tok.decode(body), text);
    }
  }
}

TEST(Tokenizer, SpecFromGguf) {
  REQUIRE_SMOLLM2_SPEC();
  const TokenizerSpec& spec = smollm2_spec().value();
  EXPECT_EQ(smollm2().kind(), "byte-level BPE");
  EXPECT_EQ(spec.model, "gpt2");
  EXPECT_EQ(spec.pre, "smollm");
  EXPECT_EQ(spec.tokens.size(), 49152u);
  EXPECT_EQ(spec.token_types.size(), spec.tokens.size());
  EXPECT_EQ(spec.merges.size(), 48900u);
  EXPECT_EQ(spec.bos_id, 1);
  EXPECT_EQ(spec.eos_id, 2);
  EXPECT_FALSE(spec.add_bos);
  EXPECT_FALSE(spec.ignore_merges);
  EXPECT_NE(spec.chat_template.find("<|im_start|>"), std::string::npos);
}

TEST(Tokenizer, SmolLM2MatchesHuggingFace) {
  REQUIRE_SMOLLM2_SPEC();
  expect_golden(smollm2(), load_golden("tokenizer/smollm2.json"), /*with_bos=*/false);
}

// The same vocabulary behind other pre-tokenizers, so their regexes are checked on a real vocabulary.
TEST(Tokenizer, Llama3RegexMatchesHuggingFace) {
  REQUIRE_SMOLLM2_SPEC();
  const json golden = load_golden("tokenizer/llama3_style.json");
  TokenizerSpec spec = smollm2_spec().value();
  spec.pre = "llama3";
  spec.ignore_merges = golden["ignore_merges"].get<bool>();
  auto tok = Tokenizer::create(std::move(spec));
  ASSERT_TRUE(tok.ok()) << tok.status().to_string();
  expect_golden(*tok, golden, false);
}

TEST(Tokenizer, Qwen2RegexMatchesHuggingFace) {
  REQUIRE_SMOLLM2_SPEC();
  const json golden = load_golden("tokenizer/qwen2_style.json");
  TokenizerSpec spec = smollm2_spec().value();
  spec.pre = "qwen2";
  spec.ignore_merges = golden["ignore_merges"].get<bool>();
  auto tok = Tokenizer::create(std::move(spec));
  ASSERT_TRUE(tok.ok()) << tok.status().to_string();
  expect_golden(*tok, golden, false);
}

TEST(Tokenizer, HfJsonMatchesHuggingFace) {
  auto tok = Tokenizer::from_hf_json(golden_path("tokenizer/tiny.tokenizer.json"),
                                     golden_path("tokenizer/tiny_tokenizer_config.json"));
  ASSERT_TRUE(tok.ok()) << tok.status().to_string();
  EXPECT_TRUE(tok->add_bos());
  EXPECT_EQ(tok->bos_id(), tok->token_id("<|begin_of_text|>"));
  EXPECT_EQ(tok->eos_id(), tok->token_id("<|eot_id|>"));
  EXPECT_EQ(tok->token_type(*tok->token_id("<tool>")), TokenType::kUserDefined);
  EXPECT_TRUE(tok->is_end_of_generation(*tok->token_id("<|end_of_text|>")));
  auto tmpl = ChatTemplate::detect(tok->chat_template());
  ASSERT_TRUE(tmpl.ok()) << tmpl.status().to_string();
  EXPECT_EQ(tmpl->name(), "llama3");
  expect_golden(*tok, load_golden("tokenizer/tiny.json"), /*with_bos=*/true);
}

TEST(Tokenizer, UserDefinedTokensAreAlwaysRecognised) {
  auto tok = Tokenizer::from_hf_json(golden_path("tokenizer/tiny.tokenizer.json"), "");
  ASSERT_TRUE(tok.ok()) << tok.status().to_string();
  const int32_t tool = *tok->token_id("<tool>");
  const int32_t eot = *tok->token_id("<|eot_id|>");
  const auto parsed = tok->encode("a<tool>b<|eot_id|>", false, true);
  const auto plain = tok->encode("a<tool>b<|eot_id|>", false, false);
  EXPECT_NE(std::find(parsed.begin(), parsed.end(), tool), parsed.end());
  EXPECT_NE(std::find(plain.begin(), plain.end(), tool), plain.end());
  EXPECT_NE(std::find(parsed.begin(), parsed.end(), eot), parsed.end());
  EXPECT_EQ(std::find(plain.begin(), plain.end(), eot), plain.end());
}

TEST(Tokenizer, SpecialTokenParsingOnAndOff) {
  REQUIRE_SMOLLM2_SPEC();
  const Tokenizer& tok = smollm2();
  const std::string text = "<|im_start|>user\nhi<|im_end|>";
  const auto parsed = tok.encode(text, false, true);
  const auto plain = tok.encode(text, false, false);
  ASSERT_GE(parsed.size(), 3u);
  EXPECT_EQ(parsed.front(), 1);  // <|im_start|>
  EXPECT_EQ(parsed.back(), 2);   // <|im_end|>
  for (int32_t id : plain) EXPECT_NE(tok.token_type(id), TokenType::kControl) << id;
  EXPECT_GT(plain.size(), parsed.size());
  EXPECT_EQ(tok.decode(parsed), text);
  EXPECT_EQ(tok.decode(plain), text);
  // skip_special drops control tokens only.
  EXPECT_EQ(tok.decode(parsed, /*skip_special=*/true), "user\nhi");
  EXPECT_EQ(tok.decode(plain, /*skip_special=*/true), text);
}

TEST(Tokenizer, EndOfGeneration) {
  REQUIRE_SMOLLM2_SPEC();
  const Tokenizer& tok = smollm2();
  EXPECT_TRUE(tok.is_end_of_generation(2));   // <|im_end|>, eos
  EXPECT_TRUE(tok.is_end_of_generation(0));   // <|endoftext|>
  EXPECT_FALSE(tok.is_end_of_generation(1));  // <|im_start|>
  EXPECT_FALSE(tok.is_end_of_generation(tok.encode("Hello", false, false)[0]));
  EXPECT_FALSE(tok.is_end_of_generation(-1));
  EXPECT_FALSE(tok.is_end_of_generation(tok.n_vocab()));
  EXPECT_EQ(tok.eot_id(), 2);
}

// Prompts rendered by the chat template tokenize like Hugging Face's apply_chat_template(tokenize=True).
TEST(Tokenizer, ChatPromptIdsMatchHuggingFace) {
  REQUIRE_SMOLLM2_SPEC();
  const Tokenizer& tok = smollm2();
  auto tmpl = ChatTemplate::detect(tok.chat_template());
  ASSERT_TRUE(tmpl.ok()) << tmpl.status().to_string();
  const json golden = load_golden("chat/smollm2.json");
  for (const json& c : golden["cases"]) {
    std::vector<ChatMessage> msgs;
    for (const json& m : c["messages"]) msgs.push_back({m["role"], m["content"]});
    const std::string prompt = tmpl->apply(msgs, c["add_generation_prompt"].get<bool>());
    EXPECT_EQ(tok.encode(prompt, /*add_special=*/false, /*parse_special=*/true), ids_of(c["ids"])) << printable(prompt);
  }
}

TEST(Tokenizer, RoundTrip) {
  REQUIRE_SMOLLM2_SPEC();
  const Tokenizer& tok = smollm2();
  const std::vector<std::string> texts = {
      "", "a", "  ", "\t\t\n", "tab\tseparated\tvalues\n1\t2\t3", "🏳️‍🌈 rainbow flag, 👩🏾‍💻 coder",
      "混合 mixed テキスト 123 ١٢٣ ๑๒๓", "<|im_start|> not closed", "<<|im_end|>>", std::string(300, ' ') + "x",
      std::string(1000, '9'), "line\r\nline\rline\n"};
  for (const std::string& s : texts) {
    for (bool parse_special : {false, true}) {
      EXPECT_EQ(tok.decode(tok.encode(s, false, parse_special)), s) << printable(s);
    }
  }
}

// Bytes that are not UTF-8 still tokenize (as byte tokens) and decode with U+FFFD replacements; a byte the vocabulary
// has no token for is dropped (SmolLM2's unknown token is the control token <|endoftext|>, which is not used).
TEST(Tokenizer, InvalidUtf8Input) {
  REQUIRE_SMOLLM2_SPEC();
  const Tokenizer& tok = smollm2();
  const std::string bad = "ok \x80\xBF then \xE6\x97 cut and \xED\xA0\x80 surrogate \xFF!";
  const auto ids = tok.encode(bad, false, true);
  std::string bytes;
  for (int32_t id : ids) bytes += tok.token_to_bytes(id);
  EXPECT_EQ(bytes, "ok \x80\xBF then \xE6\x97 cut and \xED\xA0\x80 surrogate !");
  EXPECT_EQ(tok.decode(ids), "ok \xEF\xBF\xBD\xEF\xBF\xBD then \xEF\xBF\xBD cut and "
                             "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD surrogate !");
  for (int32_t id : ids) EXPECT_NE(id, 0);
}

std::string stream_all(const Tokenizer& tok, std::span<const int32_t> ids, bool skip_special, bool check_chunks) {
  Tokenizer::StreamDecoder decoder(tok, skip_special);
  std::string out;
  for (int32_t id : ids) {
    const std::string chunk = decoder.push(id);
    if (check_chunks) {
      EXPECT_TRUE(is_valid_utf8(chunk)) << "chunk after id " << id;
    }
    out += chunk;
  }
  const std::string rest = decoder.flush();
  if (check_chunks) {
    EXPECT_TRUE(is_valid_utf8(rest));
  }
  return out + rest;
}

TEST(Tokenizer, StreamDecoderMatchesDecode) {
  REQUIRE_SMOLLM2_SPEC();
  const Tokenizer& tok = smollm2();
  const std::vector<std::string> texts = {
      "emoji 😀🎉 and ZWJ 👨‍👩‍👧‍👦 family, flag 🇯🇵, skin tone 👍🏽", "日本語のテキストです。中文也可以。",
      "한국어 텍스트를 토큰화합니다", "<|im_start|>assistant\nΓειά σου 🌍<|im_end|>", "plain ascii"};
  size_t held_back = 0;  // pushes that returned less than the token's bytes: the partial-character path ran
  for (const std::string& s : texts) {
    const auto ids = tok.encode(s, false, true);
    for (bool skip : {false, true}) {
      EXPECT_EQ(stream_all(tok, ids, skip, true), tok.decode(ids, skip)) << s;
    }
    Tokenizer::StreamDecoder decoder(tok);
    for (int32_t id : ids) held_back += decoder.push(id).size() < tok.token_to_bytes(id).size();
  }
  EXPECT_GT(held_back, 0u) << "no token split a UTF-8 character; the test strings no longer exercise hold-back";
}

// Random ids include tokens holding parts of characters in every order: streaming still equals decode and never emits
// an invalid chunk, including the U+FFFD cases.
TEST(Tokenizer, StreamDecoderOnRandomIds) {
  REQUIRE_SMOLLM2_SPEC();
  const Tokenizer& tok = smollm2();
  std::mt19937 rng(1234);
  // The first 256+ ids after the control tokens are the single-byte tokens, where partial sequences live.
  std::uniform_int_distribution<int32_t> byte_ids(0, 400), any_id(0, tok.n_vocab() - 1);
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<int32_t> ids(1 + trial % 17);
    for (auto& id : ids) id = trial % 2 ? byte_ids(rng) : any_id(rng);
    EXPECT_EQ(stream_all(tok, ids, false, true), tok.decode(ids)) << "trial " << trial;
  }
}

TEST(Tokenizer, LongDocument) {
  REQUIRE_SMOLLM2_SPEC();
  const Tokenizer& tok = smollm2();
  const json golden = load_golden("tokenizer/smollm2.json");
  std::string doc;
  while (doc.size() < 48000) {
    for (const json& c : golden["cases"]) {
      if (!c.value("lossy", false)) doc += c["text"].get<std::string>() + "\n";
    }
  }
  const auto ids = tok.encode(doc, false, true);
  EXPECT_GT(ids.size(), 8000u);
  EXPECT_EQ(tok.decode(ids), doc);
  // One long word: BPE cost grows as n log n in the piece length.
  const std::string word(20000, 'a');
  EXPECT_EQ(tok.decode(tok.encode(word, false, false)), word);
}

// A minimal valid spec: the 256 byte tokens plus what a test adds.
TokenizerSpec byte_spec() {
  TokenizerSpec spec;
  spec.model = "gpt2";
  spec.pre = "gpt2";
  // GPT-2's byte alphabet: the printable bytes stand for themselves, the other 68 take U+0100.. in byte order.
  int next_extra = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    const int cp = printable ? b : next_extra++;
    std::string s;
    if (cp < 0x80) {
      s.push_back(static_cast<char>(cp));
    } else {
      s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
      s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
    spec.tokens.push_back(s);
  }
  return spec;
}

TEST(Tokenizer, MergesApplyByRankThenLeftmost) {
  TokenizerSpec spec = byte_spec();
  spec.tokens.insert(spec.tokens.end(), {"ab", "bc", "abc", "aa"});
  spec.merges = {"b c", "a b", "a bc", "a a"};  // "bc" outranks "ab"
  auto tok = Tokenizer::create(spec);
  ASSERT_TRUE(tok.ok()) << tok.status().to_string();
  const int32_t ab = 256, bc = 257, abc = 258, aa = 259;
  EXPECT_EQ(tok->encode("abc", false, false), std::vector<int32_t>({abc}));     // b+c first, then a+bc
  EXPECT_EQ(tok->encode("ab", false, false), std::vector<int32_t>({ab}));
  EXPECT_EQ(tok->encode("aaa", false, false), std::vector<int32_t>({aa, 'a'}));  // leftmost pair on a tie
  (void)bc;
}

TEST(Tokenizer, InvalidSpecsAreErrors) {
  {
    TokenizerSpec spec = byte_spec();
    spec.merges = {"a zz"};
    auto tok = Tokenizer::create(spec);
    ASSERT_FALSE(tok.ok());
    EXPECT_EQ(tok.status().code(), StatusCode::kDataLoss);
    EXPECT_NE(tok.status().message().find("zz"), std::string::npos) << tok.status().message();
  }
  {
    TokenizerSpec spec = byte_spec();
    spec.merges = {"a b"};  // "ab" is not a token
    auto tok = Tokenizer::create(spec);
    ASSERT_FALSE(tok.ok());
    EXPECT_EQ(tok.status().code(), StatusCode::kDataLoss);
  }
  {
    TokenizerSpec spec = byte_spec();
    spec.merges = {"ab"};
    EXPECT_EQ(Tokenizer::create(spec).status().code(), StatusCode::kDataLoss);
  }
  {
    TokenizerSpec spec = byte_spec();
    spec.eos_id = 256;
    auto tok = Tokenizer::create(spec);
    ASSERT_FALSE(tok.ok());
    EXPECT_EQ(tok.status().code(), StatusCode::kDataLoss);
    EXPECT_NE(tok.status().message().find("eos_id = 256"), std::string::npos) << tok.status().message();
  }
  {
    TokenizerSpec spec = byte_spec();
    spec.bos_id = -1;
    EXPECT_EQ(Tokenizer::create(spec).status().code(), StatusCode::kDataLoss);
  }
  {
    TokenizerSpec spec = byte_spec();
    spec.token_types = {1, 1, 1};
    EXPECT_EQ(Tokenizer::create(spec).status().code(), StatusCode::kDataLoss);
  }
  {
    TokenizerSpec spec = byte_spec();
    spec.add_bos = true;  // without bos_id
    EXPECT_EQ(Tokenizer::create(spec).status().code(), StatusCode::kDataLoss);
  }
  {
    TokenizerSpec spec = byte_spec();
    spec.pre_regexes = {"(unclosed"};
    EXPECT_EQ(Tokenizer::create(spec).status().code(), StatusCode::kDataLoss);
  }
  {
    TokenizerSpec spec = byte_spec();
    spec.model = "t5";
    auto tok = Tokenizer::create(spec);
    ASSERT_FALSE(tok.ok());
    EXPECT_EQ(tok.status().code(), StatusCode::kUnimplemented);
    EXPECT_NE(tok.status().message().find("'t5'"), std::string::npos) << tok.status().message();
  }
  {
    TokenizerSpec spec = byte_spec();
    spec.model = "llama";  // neither merges nor scores
    EXPECT_EQ(Tokenizer::create(spec).status().code(), StatusCode::kDataLoss);
  }
  {
    TokenizerSpec spec = byte_spec();
    spec.pre = "falcon-9";
    auto tok = Tokenizer::create(spec);
    ASSERT_FALSE(tok.ok());
    EXPECT_EQ(tok.status().code(), StatusCode::kUnimplemented);
    EXPECT_NE(tok.status().message().find("falcon-9"), std::string::npos);
  }
  TokenizerSpec empty;
  empty.model = "gpt2";
  EXPECT_EQ(Tokenizer::create(empty).status().code(), StatusCode::kDataLoss);
}

// tokenizer.json features outside what is supported are named in a kUnimplemented error (more in
// test_tokenizer_families.cpp).
TEST(Tokenizer, HfJsonUnsupportedFeatures) {
  const std::string path = ::testing::TempDir() + "/starserve_test_tokenizer.json";
  auto write_and_load = [&](const json& doc) {
    std::ofstream(path) << doc.dump();
    return Tokenizer::from_hf_json(path, "");
  };
  json base = load_golden("tokenizer/tiny.tokenizer.json");
  {
    json doc = base;
    doc["pre_tokenizer"] = {{"type", "Whitespace"}};
    auto tok = write_and_load(doc);
    ASSERT_FALSE(tok.ok());
    EXPECT_EQ(tok.status().code(), StatusCode::kUnimplemented);
    EXPECT_NE(tok.status().message().find("Whitespace"), std::string::npos) << tok.status().message();
  }
  {
    json doc = base;
    doc["normalizer"] = {{"type", "BertNormalizer"}};
    auto tok = write_and_load(doc);
    ASSERT_FALSE(tok.ok());
    EXPECT_EQ(tok.status().code(), StatusCode::kUnimplemented);
    EXPECT_NE(tok.status().message().find("BertNormalizer"), std::string::npos) << tok.status().message();
  }
  {
    json doc = base;
    doc["model"]["type"] = "WordPiece";
    EXPECT_EQ(write_and_load(doc).status().code(), StatusCode::kUnimplemented);
  }
  {
    json doc = base;
    doc["model"]["merges"][0] = "<nope> <never>";
    EXPECT_EQ(write_and_load(doc).status().code(), StatusCode::kDataLoss);
  }
  std::remove(path.c_str());
  EXPECT_EQ(Tokenizer::from_hf_json(path + ".absent", "").status().code(), StatusCode::kNotFound);
}

}  // namespace
}  // namespace starserve
