// Device sampling inside real generations of the default model on the CUDA backend. A backend that
// forwards to the CUDA one checks every sample_rows call against the host Sampler on the same
// logits (downloaded before the kernel penalises them in place): the same token, except where the
// oracle (tests/unit/sampling_oracle.h) finds the draw or the top-p edge within double rounding.
// Covers the CUDA backend's side (bf16 -> fp32 rows, parameters and penalty entries of several
// rows packed into one upload) with the entries and draws the TextController builds, through
// the serving engine: one request on its own (one row per step, the `starserve generate` path) and
// requests together (one row per request per step).
// SKIPPED without a CUDA device.
#include <gtest/gtest.h>

#include <filesystem>

#include "comm/communicator.h"
#include "star/local_attention.h"
#include "engine/serving_engine.h"
#include "engine/text_controller.h"
#include "model/loader.h"
#include "tests/unit/forwarding_backend.h"
#include "tests/unit/sampling_oracle.h"
#include "tests/unit/serve_requests.h"

namespace starserve {
namespace {

class CheckingBackend final : public testing_backend::ForwardingBackend {
 public:
  using ForwardingBackend::ForwardingBackend;
  int64_t rows_checked = 0;
  int64_t ambiguous = 0;

  void sample_rows(std::span<int32_t> tokens, Tensor logits, std::span<const SampleRow> rows) override {
    std::vector<float> host(static_cast<size_t>(logits.numel()));
    inner().download_f32(host.data(), logits);
    inner().sample_rows(tokens, logits, rows);
    for (size_t r = 0; r < rows.size(); ++r) {
      std::span<float> l(host.data() + static_cast<int64_t>(r) * logits.cols(), static_cast<size_t>(rows[r].n_vocab));
      const int32_t want = testing_backend::host_sample_row(rows[r], l);  // l is penalised from here on
      const auto oracle = sampling_test::sampling_oracle(l, testing_backend::sampling_params_of(rows[r]), rows[r].u);
      ++rows_checked;
      if (oracle.ambiguous) {
        ++ambiguous;
        continue;
      }
      EXPECT_EQ(tokens[r], want) << "row " << r << " of " << rows.size() << ", T " << rows[r].temperature
                                 << " top_k " << rows[r].top_k << " top_p " << rows[r].top_p << " u " << rows[r].u;
    }
  }
};

struct World {
  std::unique_ptr<CheckingBackend> backend;
  ModelFiles files;
  std::unique_ptr<Model> model;
  std::unique_ptr<Communicator> comm = make_local_communicator();
  std::string skip;  // why the tests cannot run
};

World& world() {
  static World* w = [] {
    auto* w = new World;
    if (cuda_device_count() == 0) {
      w->skip = "no CUDA device";
      return w;
    }
    if (!std::filesystem::exists(STARSERVE_DEFAULT_MODEL)) {
      w->skip = "no model at " STARSERVE_DEFAULT_MODEL;
      return w;
    }
    auto cuda = make_cuda_backend(0);
    SS_CHECK(cuda.ok(), "{}", cuda.status().to_string());
    w->backend = std::make_unique<CheckingBackend>(std::move(cuda).value());
    auto files = open_model_files(STARSERVE_DEFAULT_MODEL);
    SS_CHECK(files.ok(), "{}", files.status().to_string());
    w->files = std::move(files).value();
    auto m = create_model(*w->files.weights, *w->backend);
    SS_CHECK(m.ok(), "{}", m.status().to_string());
    w->model = std::move(m).value();
    return w;
  }();
  return *w;
}

#define REQUIRE_GPU_MODEL() \
  if (!world().skip.empty()) GTEST_SKIP() << world().skip

std::vector<SamplingParams> settings() {
  std::vector<SamplingParams> out;
  SamplingParams p;
  p.temperature = 0.0f;
  p.repetition_penalty = 1.3f;
  out.push_back(p);
  p = SamplingParams{};
  p.temperature = 0.8f;
  p.top_k = 40;
  p.top_p = 0.9f;
  p.repetition_penalty = 1.2f;
  p.frequency_penalty = 0.5f;
  p.presence_penalty = 0.2f;
  out.push_back(p);
  p = SamplingParams{};
  p.temperature = 1.3f;
  p.min_p = 0.02f;
  out.push_back(p);
  p = SamplingParams{};
  p.temperature = 0.7f;
  p.top_p = 0.5f;
  p.frequency_penalty = -0.5f;
  out.push_back(p);
  for (size_t i = 0; i < out.size(); ++i) {
    out[i].seed = 11 + i;
    out[i].max_tokens = 24;
    out[i].ignore_eos = true;
  }
  return out;
}

std::vector<int32_t> prompt_ids(size_t i) {
  const char* prompts[] = {"The capital of France is", "Once upon a time, in a small village by the sea,",
                           "A good way to learn a new language is", "To make a cup of tea, first"};
  return world().files.tokenizer->encode(prompts[i % 4], false, false);
}

TEST(DeviceSamplingGpu, EveryStepOfAGenerationMatchesTheHostSampler) {
  REQUIRE_GPU_MODEL();
  World& w = world();
  const ModelHParams& hp = w.model->hparams();
  w.backend->rows_checked = w.backend->ambiguous = 0;
  int64_t steps = 0;
  const std::vector<SamplingParams> all = settings();
  for (size_t i = 0; i < all.size(); ++i) {
    SCOPED_TRACE("setting " + std::to_string(i));
    const std::vector<int32_t> prompt = prompt_ids(i);
    // One request on its own through the serving engine (the `starserve generate` path).
    KvCache cache(*w.backend, {hp.n_layers, hp.n_kv_heads, hp.head_dim, 64, 8});
    EngineContext ctx;
    ctx.model = w.model.get();
    ctx.cache = &cache;
    ctx.comm = w.comm.get();
    ctx.tokenizer = w.files.tokenizer.get();
    ctx.max_context = 1024;
    ServingEngine engine(ctx);
    std::vector<testing_engine::ServedRequest> served;
    const Status st = testing_engine::serve_requests(engine, {testing_engine::global_request(prompt, all[i])}, &served);
    ASSERT_TRUE(st.ok()) << st.to_string();
    ASSERT_TRUE(served[0].error.ok()) << served[0].error.to_string();
    EXPECT_EQ(served[0].tokens.size(), static_cast<size_t>(all[i].max_tokens));
    steps += static_cast<int64_t>(served[0].tokens.size());
  }
  EXPECT_EQ(w.backend->rows_checked, steps) << "every step sampled on the device";
  EXPECT_LE(w.backend->ambiguous, 1);
}

TEST(DeviceSamplingGpu, EveryRowOfBatchedStepsMatchesTheHostSampler) {
  REQUIRE_GPU_MODEL();
  World& w = world();
  const ModelHParams& hp = w.model->hparams();
  KvCache cache(*w.backend, {hp.n_layers, hp.n_kv_heads, hp.head_dim, 64, 64});
  EngineContext ctx;
  ctx.model = w.model.get();
  ctx.cache = &cache;
  ctx.comm = w.comm.get();
  ctx.tokenizer = w.files.tokenizer.get();
  ctx.max_context = 1024;
  ServingEngine engine(ctx);
  std::vector<EngineRequest> requests;
  size_t i = 0;
  for (const SamplingParams& params : settings()) requests.push_back(testing_engine::global_request(prompt_ids(i++), params));
  w.backend->rows_checked = w.backend->ambiguous = 0;
  std::vector<testing_engine::ServedRequest> served;
  const Status st = testing_engine::serve_requests(engine, requests, &served);
  ASSERT_TRUE(st.ok()) << st.to_string();
  int64_t tokens = 0;
  for (const auto& r : served) {
    EXPECT_TRUE(r.error.ok()) << r.error.to_string();
    tokens += static_cast<int64_t>(r.tokens.size());
  }
  EXPECT_EQ(w.backend->rows_checked, tokens) << "every token of every request sampled on the device";
  EXPECT_LE(w.backend->ambiguous, 1);
}

}  // namespace
}  // namespace starserve
