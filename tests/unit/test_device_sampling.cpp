// The engine's device-sampling path (DecodeController::prepare_device_sample ->
// Model::forward_sample -> Backend::sample_rows) on the CPU, with the default model. The backend
// here forwards every op to the CPU backend and stands in for a device that samples: its
// sample_rows runs the host code on the row (apply_penalty_entries, Sampler::choose at the row's
// u). The plumbing (parameters, the step's random draw, the penalty entries built from the right
// history, the tokenizer's share of the row, the host fallback for logprobs, one row per request
// in a batched step) is then checked against the host path itself: the same seed must give the
// same tokens. The CUDA kernel's parity with the host Sampler is tests/gpu/test_gpu_sampling.cpp.
#include <gtest/gtest.h>

#include <filesystem>

#include "backend/backend.h"
#include "comm/communicator.h"
#include "engine/serving_engine.h"
#include "engine/text_controller.h"
#include "model/loader.h"
#include "tests/unit/forwarding_backend.h"
#include "tests/unit/serve_requests.h"

namespace starserve {
namespace {

class HostSamplingBackend final : public testing_backend::ForwardingBackend {
 public:
  using ForwardingBackend::ForwardingBackend;

  bool device_sampling = true;  // false: behave like the CPU backend (the host path)
  int64_t calls = 0;            // sample_rows calls
  int64_t rows_sampled = 0;

  bool can_sample_rows() const override { return device_sampling; }
  void sample_rows(std::span<int32_t> tokens, Tensor logits, std::span<const SampleRow> rows) override {
    EXPECT_TRUE(device_sampling);
    ASSERT_EQ(static_cast<int64_t>(rows.size()), logits.rows());
    ++calls;
    rows_sampled += static_cast<int64_t>(rows.size());
    for (size_t r = 0; r < rows.size(); ++r) {
      ASSERT_LE(rows[r].n_vocab, logits.cols());
      std::span<float> l(logits.f32() + static_cast<int64_t>(r) * logits.cols(), static_cast<size_t>(rows[r].n_vocab));
      tokens[r] = testing_backend::host_sample_row(rows[r], l);
    }
  }
};

struct World {
  HostSamplingBackend backend{make_cpu_backend(1)};
  ModelFiles files;
  std::unique_ptr<Model> model;
  std::unique_ptr<Communicator> comm = make_local_communicator();
};

World* world() {
  static World* w = [] {
    auto* w = new World;
    if (!std::filesystem::exists(STARSERVE_DEFAULT_MODEL)) return w;
    auto files = open_model_files(STARSERVE_DEFAULT_MODEL);
    if (!files.ok()) return w;
    w->files = std::move(files).value();
    auto m = create_model(*w->files.weights, w->backend);
    if (m.ok()) w->model = std::move(m).value();
    return w;
  }();
  return w;
}

#define REQUIRE_MODEL()                                                                        \
  ASSERT_TRUE(world()->model) << "default model missing or unreadable: " STARSERVE_DEFAULT_MODEL \
                                 " (scripts/test.sh fetches it)"

// Sampling settings that exercise every part of a row request.
std::vector<SamplingParams> settings() {
  std::vector<SamplingParams> out;
  SamplingParams p;
  p.temperature = 0.0f;
  p.repetition_penalty = 1.3f;
  out.push_back(p);  // greedy with a penalty
  p = SamplingParams{};
  p.temperature = 0.8f;
  p.top_k = 40;
  p.top_p = 0.9f;
  p.repetition_penalty = 1.2f;
  p.frequency_penalty = 0.5f;
  p.presence_penalty = 0.2f;
  p.seed = 7;
  out.push_back(p);
  p = SamplingParams{};
  p.temperature = 1.3f;
  p.min_p = 0.02f;
  p.seed = 9;
  out.push_back(p);
  for (SamplingParams& s : out) {
    s.max_tokens = 10;
    s.ignore_eos = true;
  }
  return out;
}

std::vector<int32_t> prompt_ids(int i) {
  const char* prompts[] = {"The capital of France is", "Once upon a time, in a small village by the sea,",
                           "A good way to learn a new language is", "To make a cup of tea, first"};
  return world()->files.tokenizer->encode(prompts[i % 4], false, false);
}

std::vector<std::vector<int32_t>> serve(const std::vector<EngineRequest>& requests);

// One request through the serving engine on its own (the `starserve generate` path).
std::vector<int32_t> generate(const SamplingParams& params, const std::vector<int32_t>& prompt) {
  const auto out = serve({testing_engine::global_request(prompt, params)});
  return out.empty() ? std::vector<int32_t>{} : out[0];
}

TEST(DeviceSampling, GenerateRequestPicksTheHostPathsTokens) {
  REQUIRE_MODEL();
  World& w = *world();
  int i = 0;
  for (const SamplingParams& params : settings()) {
    SCOPED_TRACE("setting " + std::to_string(i));
    const std::vector<int32_t> prompt = prompt_ids(i++);
    w.backend.device_sampling = false;
    w.backend.calls = 0;
    const std::vector<int32_t> host = generate(params, prompt);
    EXPECT_EQ(w.backend.calls, 0);
    w.backend.device_sampling = true;
    const std::vector<int32_t> device = generate(params, prompt);
    EXPECT_EQ(device, host);
    EXPECT_EQ(w.backend.calls, params.max_tokens) << "every step sampled on the device";
    // Logprobs need the host logits: the device path is not taken, the tokens are the same.
    SamplingParams with_logprobs = params;
    with_logprobs.logprobs = 3;
    w.backend.calls = 0;
    EXPECT_EQ(generate(with_logprobs, prompt), host);
    EXPECT_EQ(w.backend.calls, 0);
  }
}

// Requests submitted together, so they decode in the same steps (one row each); returns each
// request's tokens.
std::vector<std::vector<int32_t>> serve(const std::vector<EngineRequest>& requests) {
  World& w = *world();
  const ModelHParams& hp = w.model->hparams();
  KvCache cache(w.backend, {hp.n_layers, hp.n_kv_heads, hp.head_dim, 64, 64});
  EngineContext ctx;
  ctx.model = w.model.get();
  ctx.cache = &cache;
  ctx.comm = w.comm.get();
  ctx.tokenizer = w.files.tokenizer.get();
  ctx.max_context = 1024;
  ctx.scheduler.max_running = 16;
  ServingEngine engine(ctx);
  std::vector<testing_engine::ServedRequest> served;
  const Status st = testing_engine::serve_requests(engine, requests, &served);
  EXPECT_TRUE(st.ok()) << st.to_string();
  std::vector<std::vector<int32_t>> tokens;
  for (const auto& r : served) {
    EXPECT_TRUE(r.error.ok()) << r.error.to_string();
    tokens.push_back(r.tokens);
  }
  return tokens;
}

TEST(DeviceSampling, ServingEngineBatchPicksTheHostPathsTokens) {
  REQUIRE_MODEL();
  World& w = *world();
  std::vector<EngineRequest> requests;
  int i = 0;
  for (const SamplingParams& params : settings()) requests.push_back(testing_engine::global_request(prompt_ids(i++), params));
  w.backend.device_sampling = false;
  w.backend.calls = 0;
  const auto host = serve(requests);
  EXPECT_EQ(w.backend.calls, 0);
  w.backend.device_sampling = true;
  w.backend.rows_sampled = 0;
  EXPECT_EQ(serve(requests), host);
  int64_t total = 0;
  for (const auto& t : host) total += static_cast<int64_t>(t.size());
  EXPECT_EQ(w.backend.rows_sampled, total) << "every token of every request sampled on the device";

  // A shorter request with logprobs in the batch: the steps it decodes in take the host path for
  // every row, the later ones the device path; the tokens do not change.
  requests[1].sampling.logprobs = 2;
  requests[1].sampling.max_tokens = 4;
  w.backend.rows_sampled = 0;
  const auto mixed = serve(requests);
  ASSERT_EQ(mixed.size(), host.size());
  EXPECT_EQ(mixed[0], host[0]);
  EXPECT_EQ(mixed[1], std::vector<int32_t>(host[1].begin(), host[1].begin() + 4));
  EXPECT_EQ(mixed[2], host[2]);
  EXPECT_GT(w.backend.rows_sampled, 0);
  EXPECT_LT(w.backend.rows_sampled, total - 4);
}

}  // namespace
}  // namespace starserve
