// GenerationParams.exact_layout reaches EngineRequest (src/server/convert.cpp): unset leaves the server's default
// (kAuto, which the engine replaces by --exact-layout), the two named layouts pass through, an unknown enum value is
// INVALID_ARGUMENT naming the field. Needs the generated protobuf types (unit_tests links starserve_server where it
// exists); otherwise the one test here says SKIPPED.
#include <gtest/gtest.h>

#if __has_include("starserve/v1/completion.pb.h")

#include <string>

#include "common/check.h"
#include "model/tokenizer.h"
#include "server/convert.h"

#ifndef STARSERVE_GOLDEN_DIR
#error "STARSERVE_GOLDEN_DIR must name tests/golden"
#endif

namespace starserve {
namespace {

const Tokenizer& tiny() {
  static const Tokenizer tok = [] {
    const std::string dir = std::string(STARSERVE_GOLDEN_DIR) + "/tokenizer/";
    auto t = Tokenizer::from_hf_json(dir + "tiny.tokenizer.json", dir + "tiny_tokenizer_config.json");
    SS_CHECK(t.ok(), "tiny tokenizer: {}", t.status().to_string());
    return std::move(t).value();
  }();
  return tok;
}

RequestLimits limits() {
  RequestLimits l;
  l.model_name = "tiny";
  l.max_context = 256;
  l.max_prompt_tokens = 200;
  l.max_tokens_limit = 64;
  l.n_vocab = tiny().n_vocab();
  l.default_mode = AttentionMode::kExact;
  return l;
}

Result<PreparedRequest> prepare(int layout) {
  v1::CompleteRequest r;
  r.set_prompt("hello there");
  r.mutable_params()->set_attention_mode(v1::ATTENTION_MODE_EXACT);
  r.mutable_params()->set_exact_layout(static_cast<v1::ExactLayout>(layout));
  return prepare_request(r, tiny(), nullptr, limits());
}

TEST(ExactLayoutApi, ReachesTheEngineRequest) {
  auto unset = prepare(v1::EXACT_LAYOUT_UNSPECIFIED);
  ASSERT_TRUE(unset.ok()) << unset.status().to_string();
  EXPECT_EQ(unset->engine.exact_layout, ExactLayout::kAuto);
  auto zigzag = prepare(v1::EXACT_LAYOUT_ZIGZAG);
  ASSERT_TRUE(zigzag.ok()) << zigzag.status().to_string();
  EXPECT_EQ(zigzag->engine.exact_layout, ExactLayout::kZigzag);
  auto contiguous = prepare(v1::EXACT_LAYOUT_CONTIGUOUS);
  ASSERT_TRUE(contiguous.ok()) << contiguous.status().to_string();
  EXPECT_EQ(contiguous->engine.exact_layout, ExactLayout::kContiguous);
  auto bad = prepare(7);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("exact_layout = 7"), std::string::npos) << bad.status().to_string();
}

}  // namespace
}  // namespace starserve

#else

TEST(ExactLayoutApi, ReachesTheEngineRequest) { GTEST_SKIP() << "built without gRPC: no protobuf types"; }

#endif
