// Attention health (src/server/attention_health.h): hand-made entropy maps at the edges of both thresholds (the
// values the responses carry are floats, compared in double with the thresholds), heads that cannot be judged
// (head_max 0, head_max equal to the collapse threshold, no rows), the per-layer ratio the metrics observe, the
// thresholds' checks and messages, the overrides through the request conversion, the proto fields, and the
// Prometheus series a request adds.
//
// The code lives in starserve_server, which unit_tests links only in builds with gRPC (the generated protobuf header
// comes with it); otherwise the one test here says SKIPPED.
#include <gtest/gtest.h>

#if __has_include("starserve/v1/completion.pb.h")

#include <cmath>
#include <limits>
#include <set>
#include <string>
#include <vector>

#include "common/check.h"
#include "model/chat_template.h"
#include "model/tokenizer.h"
#include "server/attention_health.h"
#include "server/convert.h"
#include "server/metrics.h"

#ifndef STARSERVE_GOLDEN_DIR
#error "STARSERVE_GOLDEN_DIR must name tests/golden"
#endif

namespace starserve {
namespace {

// A map with one row per head: H[l][h] and head_max[l][h] as given (sum = H, max_sum = head_max, count = 1).
EntropyStats map_of(const std::vector<std::vector<double>>& h, const std::vector<std::vector<double>>& max) {
  EntropyStats s;
  s.reset(static_cast<int>(h.size()), static_cast<int>(h[0].size()));
  for (int l = 0; l < s.n_layers; ++l) {
    for (int k = 0; k < s.n_heads; ++k) {
      const size_t i = static_cast<size_t>(l) * s.n_heads + k;
      s.sum[i] = h[l][k];
      s.max_sum[i] = max[l][k];
      s.count[i] = 1;
    }
  }
  return s;
}

double next_up(float v) { return std::nextafter(v, std::numeric_limits<float>::infinity()); }
double next_down(float v) { return std::nextafter(v, -std::numeric_limits<float>::infinity()); }

TEST(AttentionHealth, OverloadIsStrictlyAboveTheRatioOfTheFloatMaximum) {
  // Ratio 0.75 of head_max 2: the edge 1.5 is exact in float; the float just above it is overloaded.
  const EntropyStats s = map_of({{1.5, next_up(1.5f), 1.0, 2.0}}, {{2.0, 2.0, 2.0, 2.0}});
  const AttentionHealth a = attention_health(s, {0.75, 0.1});
  EXPECT_EQ(a.n_judged, 4);
  EXPECT_EQ(a.overloaded, (std::vector<HeadRef>{{0, 1}, {0, 3}}));
  EXPECT_TRUE(a.collapsed.empty());
  EXPECT_DOUBLE_EQ(a.overload_fraction(), 0.5);
  EXPECT_DOUBLE_EQ(a.collapse_fraction(), 0.0);
}

TEST(AttentionHealth, DefaultThresholdsOnTheFloatsTheResponseCarries) {
  // 0.9 x head_max 1: float(0.9) = 0.89999998 is below 0.9 (double), the next float above it is not; float(0.1) =
  // 0.10000000149 is not below 0.1, the float under it is.
  const HealthThresholds t;
  EXPECT_EQ(t.overload_ratio, 0.9);
  EXPECT_EQ(t.collapse_nats, 0.1);
  const EntropyStats s = map_of({{0.9, next_up(0.9f), 0.1, next_down(0.1f)}}, {{1.0, 1.0, 1.0, 1.0}});
  const AttentionHealth a = attention_health(s, t);
  EXPECT_EQ(a.overloaded, (std::vector<HeadRef>{{0, 1}}));
  EXPECT_EQ(a.collapsed, (std::vector<HeadRef>{{0, 3}}));
  EXPECT_DOUBLE_EQ(a.overload_fraction(), 0.25);
  EXPECT_DOUBLE_EQ(a.collapse_fraction(), 0.25);
}

TEST(AttentionHealth, CollapseIsStrictlyBelowTheThreshold) {
  const EntropyStats s = map_of({{0.5, next_down(0.5f), 0.0}, {3.0, 0.25, 0.75}}, {{4.0, 4.0, 4.0}, {4.0, 4.0, 4.0}});
  const AttentionHealth a = attention_health(s, {0.9, 0.5});
  EXPECT_EQ(a.n_judged, 6);
  EXPECT_EQ(a.collapsed, (std::vector<HeadRef>{{0, 1}, {0, 2}, {1, 1}}));
  EXPECT_TRUE(a.overloaded.empty());
  EXPECT_DOUBLE_EQ(a.collapse_fraction(), 0.5);
}

TEST(AttentionHealth, HeadsWithoutRoomForEntropyAreNotJudged) {
  // Layer 0: head 0 saw one key per row (head_max 0, H 0), head 1 has head_max equal to the collapse threshold (every
  // distribution over its keys would count as collapsed), head 2 just above it. Layer 1: no rows at all.
  EntropyStats s = map_of({{0.0, 0.25, 0.25}, {0.0, 0.0, 0.0}}, {{0.0, 0.5, next_up(0.5f)}, {0.0, 0.0, 0.0}});
  for (int h = 0; h < 3; ++h) s.count[3 + h] = 0;
  const AttentionHealth a = attention_health(s, {0.9, 0.5});
  EXPECT_EQ(a.n_judged, 1);
  EXPECT_EQ(a.collapsed, (std::vector<HeadRef>{{0, 2}}));
  EXPECT_TRUE(a.overloaded.empty());
  EXPECT_DOUBLE_EQ(a.collapse_fraction(), 1.0);
  ASSERT_EQ(a.layer_ratio.size(), 2u);
  ASSERT_TRUE(a.layer_ratio[0].has_value());
  EXPECT_FALSE(a.layer_ratio[1].has_value());

  // Nothing judged: both fractions are 0, not NaN.
  const AttentionHealth none = attention_health(map_of({{0.0, 0.0}}, {{0.0, 0.0}}), HealthThresholds{});
  EXPECT_EQ(none.n_judged, 0);
  EXPECT_EQ(none.overload_fraction(), 0.0);
  EXPECT_EQ(none.collapse_fraction(), 0.0);
  EXPECT_FALSE(none.layer_ratio[0].has_value());
}

TEST(AttentionHealth, RowsThatSawOneKeyGiveHeadMaxZero) {
  // Through EntropyStats::add as the handlers call it: two rows that each saw one key (ln 1 = 0).
  EntropyStats s;
  s.reset(1, 2);
  const float entropy[] = {0.f, 0.f, 0.f, 0.f};
  const int64_t visible[] = {1, 1};
  s.add(0, entropy, 2, visible);
  EXPECT_EQ(s.mean_max(0, 0), 0.0);
  const AttentionHealth a = attention_health(s, HealthThresholds{});
  EXPECT_EQ(a.n_judged, 0);
  EXPECT_TRUE(a.collapsed.empty());
}

TEST(AttentionHealth, AHeadMayBeBothWhenTheThresholdsOverlap) {
  // ratio x head_max = 0.01 < collapse 0.1: H = 0.05 is above the one and below the other.
  const AttentionHealth a = attention_health(map_of({{0.05}}, {{1.0}}), {0.01, 0.1});
  EXPECT_EQ(a.overloaded, (std::vector<HeadRef>{{0, 0}}));
  EXPECT_EQ(a.collapsed, (std::vector<HeadRef>{{0, 0}}));
}

TEST(AttentionHealth, LayerRatioIsMeanEntropyOverMeanMaximum) {
  const AttentionHealth a = attention_health(map_of({{1.0, 3.0}, {0.5, 0.5}}, {{4.0, 4.0}, {2.0, 0.0}}), {});
  ASSERT_EQ(a.layer_ratio.size(), 2u);
  EXPECT_DOUBLE_EQ(*a.layer_ratio[0], 0.5);
  EXPECT_DOUBLE_EQ(*a.layer_ratio[1], 0.5);
}

// The rank-entropy ratio: the mean over layers and heads of the per-head rank entropy (as floats) over ln n_ranks;
// absent on one rank; in the proto and the metrics' label-free histogram.
TEST(AttentionHealth, RankRatioIsTheMeanRankEntropyOverLnRanks) {
  EntropyStats s = map_of({{1.0, 1.0}, {1.0, 1.0}}, {{2.0, 2.0}, {2.0, 2.0}});
  EXPECT_FALSE(attention_health(s, {}).rank_ratio);
  const float rows[2][2] = {{0.2f, 0.6f}, {1.0f, 0.0f}};  // one row per layer: (heads)
  s.add_rank_entropy(0, rows[0], 1, 4);
  s.add_rank_entropy(1, rows[1], 1, 4);
  const AttentionHealth h = attention_health(s, {});
  ASSERT_TRUE(h.rank_ratio);
  const double want = (double{0.2f} + double{0.6f} + 1.0 + 0.0) / 4 / std::log(4.0);
  EXPECT_NEAR(*h.rank_ratio, want, 1e-12);
  v1::AttentionEntropy proto;
  fill_entropy(s, &h, &proto);
  EXPECT_EQ(proto.n_ranks(), 4);
  EXPECT_DOUBLE_EQ(proto.health().rank_entropy_ratio(), *h.rank_ratio);
  ASSERT_EQ(proto.layers(0).head_rank_mean_size(), 2);
  EXPECT_FLOAT_EQ(proto.layers(0).head_rank_mean(1), 0.6f);
  EXPECT_FLOAT_EQ(proto.layers(1).rank_mean(), 0.5f);
}

TEST(AttentionHealth, ThresholdChecksNameTheValueAndTheRange) {
  EXPECT_TRUE(check_overload_ratio(1.0).ok());
  EXPECT_TRUE(check_overload_ratio(1e-9).ok());
  for (double bad : {0.0, -0.5, 1.5, std::nextafter(1.0, 2.0), std::nan(""), std::numeric_limits<double>::infinity()}) {
    const Status s = check_overload_ratio(bad);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(s.message().find("entropy_overload_ratio = "), std::string::npos) << s.message();
    EXPECT_NE(s.message().find("(0, 1]"), std::string::npos) << s.message();
  }
  EXPECT_EQ(check_overload_ratio(1.5).message(), "entropy_overload_ratio = 1.5 must be in (0, 1]");
  EXPECT_TRUE(check_collapse_nats(0.0).ok());
  EXPECT_TRUE(check_collapse_nats(20.0).ok());
  for (double bad : {-0.1, std::nan(""), std::numeric_limits<double>::infinity()}) {
    const Status s = check_collapse_nats(bad);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(s.message().find("entropy_collapse_nats = "), std::string::npos) << s.message();
    EXPECT_NE(s.message().find(">= 0"), std::string::npos) << s.message();
  }
  EXPECT_NE(check_collapse_nats(-1, "--entropy-collapse-nats").message().find("--entropy-collapse-nats = -1"),
            std::string::npos);
}

// ---- the request conversion ----

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
  l.max_stop_strings = 4;
  l.max_stop_string_bytes = 8;
  l.n_vocab = tiny().n_vocab();
  l.health = {0.8, 0.25};  // the server's settings
  return l;
}

v1::CompleteRequest request() {
  v1::CompleteRequest r;
  r.mutable_prompt_token_ids()->add_ids(5);
  r.mutable_prompt_token_ids()->add_ids(6);
  r.mutable_params()->set_return_attention_entropy(true);
  return r;
}

TEST(AttentionHealth, RequestsTakeTheServersThresholdsUnlessTheyOverrideThem) {
  auto p = prepare_request(request(), tiny(), nullptr, limits());
  ASSERT_TRUE(p.ok()) << p.status().to_string();
  EXPECT_EQ(p->health.overload_ratio, 0.8);
  EXPECT_EQ(p->health.collapse_nats, 0.25);
  EXPECT_TRUE(p->engine.return_entropy);

  v1::CompleteRequest r = request();
  r.mutable_params()->set_entropy_overload_ratio(0.5);
  r.mutable_params()->set_entropy_collapse_nats(0.0);
  p = prepare_request(r, tiny(), nullptr, limits());
  ASSERT_TRUE(p.ok()) << p.status().to_string();
  EXPECT_EQ(p->health.overload_ratio, 0.5);
  EXPECT_EQ(p->health.collapse_nats, 0.0);
}

TEST(AttentionHealth, BadOverridesAreRefusedEvenWithoutEntropy) {
  v1::CompleteRequest r = request();
  r.mutable_params()->set_entropy_overload_ratio(0.0);
  auto p = prepare_request(r, tiny(), nullptr, limits());
  EXPECT_EQ(p.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(p.status().message(), "entropy_overload_ratio = 0 must be in (0, 1]");

  r = request();
  r.mutable_params()->set_return_attention_entropy(false);
  r.mutable_params()->set_entropy_collapse_nats(-2.5);
  p = prepare_request(r, tiny(), nullptr, limits());
  EXPECT_EQ(p.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(p.status().message().find("entropy_collapse_nats = -2.5"), std::string::npos) << p.status().message();
  EXPECT_EQ(to_grpc_status(p.status()).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

TEST(AttentionHealth, ServerThresholdsComeFromServerConfig) {
  ServerConfig c;
  EXPECT_EQ(c.entropy_overload_ratio, 0.9);
  EXPECT_EQ(c.entropy_collapse_nats, 0.1);
  c.entropy_overload_ratio = 0.7;
  c.entropy_collapse_nats = 0.3;
  EngineInfo info;
  info.model_name = "tiny";
  const RequestLimits l = make_request_limits(c, info, tiny(), 4);
  EXPECT_EQ(l.health.overload_ratio, 0.7);
  EXPECT_EQ(l.health.collapse_nats, 0.3);
}

// ---- proto and metrics ----

TEST(AttentionHealth, ProtoCarriesTheThresholdsFractionsAndFlaggedHeads) {
  const EntropyStats s = map_of({{2.0, 0.05, 1.0}, {0.0, 1.9, 0.01}}, {{2.0, 2.0, 2.0}, {0.0, 2.0, 2.0}});
  const AttentionHealth a = attention_health(s, {0.9, 0.1});
  v1::AttentionEntropy e;
  fill_entropy(s, &a, &e);
  ASSERT_EQ(e.layers_size(), 2);
  EXPECT_EQ(e.layers(1).head_max(0), 0.f);
  const v1::AttentionHealth& h = e.health();
  EXPECT_EQ(h.overload_ratio(), 0.9);
  EXPECT_EQ(h.collapse_nats(), 0.1);
  EXPECT_EQ(h.n_heads_judged(), 5);
  ASSERT_EQ(h.overloaded_size(), 2);
  EXPECT_EQ(h.overloaded(0).layer(), 0);
  EXPECT_EQ(h.overloaded(0).head(), 0);
  EXPECT_EQ(h.overloaded(1).layer(), 1);
  EXPECT_EQ(h.overloaded(1).head(), 1);
  ASSERT_EQ(h.collapsed_size(), 2);
  EXPECT_EQ(h.collapsed(0).head(), 1);
  EXPECT_EQ(h.collapsed(1).layer(), 1);
  EXPECT_EQ(h.collapsed(1).head(), 2);
  EXPECT_DOUBLE_EQ(h.overload_fraction(), 0.4);
  EXPECT_DOUBLE_EQ(h.collapse_fraction(), 0.4);

  v1::AttentionEntropy without;
  fill_entropy(s, nullptr, &without);
  EXPECT_FALSE(without.has_health());
}

// The value of the line `series value` in a rendered exposition, or NaN.
double series(const std::string& text, const std::string& name) {
  const std::string key = name + " ";
  for (size_t at = text.find(key); at != std::string::npos; at = text.find(key, at + 1)) {
    if (at == 0 || text[at - 1] == '\n') return std::stod(text.substr(at + key.size()));
  }
  return std::nan("");
}

TEST(AttentionHealth, MetricsHoldOneHistogramPerLayerAndTheHeadCounters) {
  ServerMetrics m;
  // Layer 0: ratio (0.5 + 1.875) / 4 = 0.59375; layer 1: (0.0625 + 0.5375) / 4 ~ 0.15; layer 2 saw no keys (not
  // observed).
  const EntropyStats s = map_of({{0.5, 1.875}, {0.0625, 0.5375}, {0.0, 0.0}}, {{2.0, 2.0}, {2.0, 2.0}, {0.0, 0.0}});
  const AttentionHealth a = attention_health(s, {0.9, 0.1});
  ASSERT_EQ(a.overloaded.size(), 1u);
  ASSERT_EQ(a.collapsed.size(), 1u);
  m.observe_attention_health(a);
  m.observe_attention_health(a);
  const std::string text = m.registry().render();
  EXPECT_NE(text.find("# TYPE starserve_attention_entropy_ratio histogram\n"), std::string::npos);
  EXPECT_NE(text.find("# TYPE starserve_attention_overloaded_heads_total counter\n"), std::string::npos);
  EXPECT_EQ(series(text, "starserve_attention_health_requests_total"), 2);
  EXPECT_EQ(series(text, "starserve_attention_judged_heads_total"), 8);
  EXPECT_EQ(series(text, "starserve_attention_overloaded_heads_total"), 2);
  EXPECT_EQ(series(text, "starserve_attention_collapsed_heads_total"), 2);
  // Layer 0 = 0.59375 falls in le="0.6", layer 1 = 0.15 in le="0.2".
  EXPECT_EQ(series(text, "starserve_attention_entropy_ratio_bucket{layer=\"0\",le=\"0.5\"}"), 0);
  EXPECT_EQ(series(text, "starserve_attention_entropy_ratio_bucket{layer=\"0\",le=\"0.6\"}"), 2);
  EXPECT_EQ(series(text, "starserve_attention_entropy_ratio_bucket{layer=\"1\",le=\"0.1\"}"), 0);
  EXPECT_EQ(series(text, "starserve_attention_entropy_ratio_bucket{layer=\"1\",le=\"0.2\"}"), 2);
  EXPECT_EQ(series(text, "starserve_attention_entropy_ratio_bucket{layer=\"1\",le=\"+Inf\"}"), 2);
  EXPECT_EQ(series(text, "starserve_attention_entropy_ratio_count{layer=\"1\"}"), 2);
  EXPECT_DOUBLE_EQ(series(text, "starserve_attention_entropy_ratio_sum{layer=\"0\"}"), 1.1875);
  // Cardinality: only layers that were observed, each with its buckets, +Inf, _sum and _count.
  std::set<std::string> layers;
  size_t lines = 0;
  for (size_t at = text.find("\nstarserve_attention_entropy_ratio"); at != std::string::npos;
       at = text.find("\nstarserve_attention_entropy_ratio", at + 1)) {
    ++lines;
    const size_t l = text.find("layer=\"", at);
    layers.insert(text.substr(l + 7, text.find('"', l + 7) - l - 7));
  }
  EXPECT_EQ(layers, (std::set<std::string>{"0", "1"}));
  EXPECT_EQ(lines, 2 * (kEntropyRatioBuckets.size() + 3));
}

}  // namespace
}  // namespace starserve

#else

TEST(AttentionHealth, NeedsTheServerLibrary) {
  GTEST_SKIP() << "unit_tests is built without starserve_server (no gRPC, or tests/CMakeLists.txt does not link it)";
}

#endif
