// Token sampling: the GPU kernel (kernels/sampling.cu) against its peer in the same run, the host
// path it replaces in the engine: download the fp32 logits rows, then Sampler::sample per row.
// One JSON line per (mode, rows, n_vocab):
//   kernel_us       the kernel alone (CUDA events, mean over the iterations)
//   logits_gbs      the logits' bytes over kernel_us: one read of the rows (the kernel reads each row
//                   a few times, mostly from L2; a few rows are split over teams of blocks)
//   device_path_us  what a decode step pays for device sampling: penalty entries and draws on the
//                   host, their upload, the kernel, the tokens' download (wall clock)
//   host_path_us    logits download + Sampler::sample per row (wall clock)
//   speedup         host_path_us / device_path_us
// Logits: normal(0, 3) rounded to bf16, like a bf16 model's output (many exact ties). The bf16 ->
// fp32 conversion both paths share in the backend is left out. Usage: sampling_bench [--quick]
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <span>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "engine/sampling.h"
#include "common/cuda_call.h"
#include "kernels/sampling.h"

namespace starserve {
namespace {

using Clock = std::chrono::steady_clock;

struct Mode {
  const char* name;
  SamplingParams params;
};

std::vector<Mode> modes() {
  std::vector<Mode> m;
  SamplingParams p;
  p.temperature = 0.0f;
  m.push_back({"greedy", p});
  p = SamplingParams{};
  p.temperature = 0.8f;
  m.push_back({"temperature", p});
  p.top_k = 50;
  m.push_back({"top_k50", p});
  p = SamplingParams{};
  p.temperature = 0.8f;
  p.top_p = 0.9f;
  m.push_back({"top_p0.9", p});
  p = SamplingParams{};
  p.temperature = 0.8f;
  p.repetition_penalty = 1.1f;
  p.frequency_penalty = 0.2f;
  p.presence_penalty = 0.1f;
  m.push_back({"penalties", p});
  return m;
}

float bf16_round(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  b = (b + 0x7fffu + ((b >> 16) & 1u)) & 0xffff0000u;
  std::memcpy(&f, &b, 4);
  return f;
}

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

void run(const Mode& mode, int rows, int n_vocab, bool quick, const std::string& device) {
  std::mt19937_64 rng(7);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<float> logits(static_cast<size_t>(rows) * n_vocab);
  for (float& x : logits) x = bf16_round(normal(rng));
  // A history for the penalties: a 1000-token prompt and 256 generated tokens per row.
  std::uniform_int_distribution<int32_t> tok(0, n_vocab - 1);
  std::vector<int32_t> prompt(1000), generated(256);
  for (int32_t& t : prompt) t = tok(rng);
  for (int32_t& t : generated) t = tok(rng);

  std::vector<Sampler> samplers;
  for (int r = 0; r < rows; ++r) {
    SamplingParams p = mode.params;
    p.seed = 1 + r;
    samplers.emplace_back(p, n_vocab);
  }

  float* d_logits = nullptr;
  SampleRowParams* d_params = nullptr;
  int32_t *d_pen = nullptr, *d_out = nullptr;
  const size_t pen_cap = static_cast<size_t>(rows) * 2 * (prompt.size() + generated.size());
  SS_CHECK_CALL(cudaMalloc(&d_logits, logits.size() * sizeof(float)));
  SS_CHECK_CALL(cudaMalloc(&d_params, rows * sizeof(SampleRowParams)));
  SS_CHECK_CALL(cudaMalloc(&d_pen, pen_cap * sizeof(int32_t)));
  SS_CHECK_CALL(cudaMalloc(&d_out, rows * sizeof(int32_t)));
  SS_CHECK_CALL(cudaMemcpy(d_logits, logits.data(), logits.size() * sizeof(float), cudaMemcpyHostToDevice));
  // Pinned staging for what the device path uploads (params, then tokens, then counts) and the tokens.
  void* h_stage = nullptr;
  const size_t stage_bytes = rows * sizeof(SampleRowParams) + pen_cap * sizeof(int32_t);
  SS_CHECK_CALL(cudaMallocHost(&h_stage, stage_bytes));
  int32_t* h_out = nullptr;
  SS_CHECK_CALL(cudaMallocHost(&h_out, rows * sizeof(int32_t)));
  cudaStream_t stream;
  SS_CHECK_CALL(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

  // The device path, as the CUDA backend runs it; the kernel is launched on the same rows each time
  // (the penalties compound in place, which does not change the work).
  std::vector<int32_t> tokens, counts;
  const auto device_step = [&] {
    auto* params = static_cast<SampleRowParams*>(h_stage);
    std::vector<int32_t> all_tokens, all_counts;
    for (int r = 0; r < rows; ++r) {
      Sampler& s = samplers[r];
      s.penalty_entries(prompt, generated, &tokens, &counts);
      SampleRowParams& p = params[r];
      const SamplingParams& sp = s.params();
      p = SampleRowParams{};
      p.u = sp.temperature > 0.0f ? s.draw_uniform() : 0.0;
      p.temperature = sp.temperature;
      p.top_p = sp.top_p;
      p.min_p = sp.min_p;
      p.repetition_penalty = sp.repetition_penalty;
      p.frequency_penalty = sp.frequency_penalty;
      p.presence_penalty = sp.presence_penalty;
      p.top_k = sp.top_k;
      p.n_vocab = n_vocab;
      p.penalty_begin = static_cast<int32_t>(all_tokens.size());
      p.penalty_count = static_cast<int32_t>(tokens.size());
      all_tokens.insert(all_tokens.end(), tokens.begin(), tokens.end());
      all_counts.insert(all_counts.end(), counts.begin(), counts.end());
    }
    const size_t n_pen = all_tokens.size();
    auto* pen = reinterpret_cast<int32_t*>(params + rows);
    std::memcpy(pen, all_tokens.data(), n_pen * sizeof(int32_t));
    std::memcpy(pen + n_pen, all_counts.data(), n_pen * sizeof(int32_t));
    SS_CHECK_CALL(cudaMemcpyAsync(d_params, params, rows * sizeof(SampleRowParams), cudaMemcpyHostToDevice, stream));
    SS_CHECK_CALL(cudaMemcpyAsync(d_pen, pen, 2 * n_pen * sizeof(int32_t), cudaMemcpyHostToDevice, stream));
    SS_CHECK_CALL(launch_sample_rows(d_out, d_logits, d_params, d_pen, d_pen + n_pen, rows, n_vocab, stream));
    SS_CHECK_CALL(cudaMemcpyAsync(h_out, d_out, rows * sizeof(int32_t), cudaMemcpyDeviceToHost, stream));
    SS_CHECK_CALL(cudaStreamSynchronize(stream));
  };
  std::vector<float> host_rows(logits.size());
  const auto host_step = [&] {
    SS_CHECK_CALL(cudaMemcpyAsync(host_rows.data(), d_logits, host_rows.size() * sizeof(float),
                                  cudaMemcpyDeviceToHost, stream));
    SS_CHECK_CALL(cudaStreamSynchronize(stream));
    for (int r = 0; r < rows; ++r) {
      std::span<float> row(host_rows.data() + static_cast<size_t>(r) * n_vocab, n_vocab);
      h_out[r] = samplers[r].sample(row, prompt, generated, nullptr);
    }
  };

  const double budget_s = quick ? 0.05 : 0.3;
  const auto timed = [&](const auto& step) {
    step();  // warm-up
    int iters = 0;
    const auto t0 = Clock::now();
    while (iters < 2 || (seconds_since(t0) < budget_s && iters < 1000)) {
      step();
      ++iters;
    }
    return seconds_since(t0) * 1e6 / iters;
  };
  const double device_us = timed(device_step);
  const double host_us = timed(host_step);

  // The kernel alone: the parameters of the last device step stay on the device.
  device_step();
  cudaEvent_t e0, e1;
  SS_CHECK_CALL(cudaEventCreate(&e0));
  SS_CHECK_CALL(cudaEventCreate(&e1));
  const int kernel_iters = quick ? 5 : 50;
  const int32_t n_pen = static_cast<const SampleRowParams*>(h_stage)[rows - 1].penalty_begin +
                        static_cast<const SampleRowParams*>(h_stage)[rows - 1].penalty_count;
  SS_CHECK_CALL(cudaEventRecord(e0, stream));
  for (int i = 0; i < kernel_iters; ++i) {
    SS_CHECK_CALL(launch_sample_rows(d_out, d_logits, d_params, d_pen, d_pen + n_pen, rows, n_vocab, stream));
  }
  SS_CHECK_CALL(cudaEventRecord(e1, stream));
  SS_CHECK_CALL(cudaEventSynchronize(e1));
  float ms = 0.0f;
  SS_CHECK_CALL(cudaEventElapsedTime(&ms, e0, e1));
  const double kernel_us = 1e3 * ms / kernel_iters;
  const double logits_bytes = static_cast<double>(logits.size()) * sizeof(float);

  std::printf(
      "{\"bench\": \"sampling\", \"device\": \"%s\", \"mode\": \"%s\", \"rows\": %d, \"n_vocab\": %d, "
      "\"kernel_us\": %.2f, \"logits_gbs\": %.1f, \"device_path_us\": %.2f, \"host_path_us\": %.2f, "
      "\"speedup\": %.2f}\n",
      device.c_str(), mode.name, rows, n_vocab, kernel_us, logits_bytes / (kernel_us * 1e3), device_us, host_us,
      host_us / device_us);
  std::fflush(stdout);

  SS_CHECK_CALL(cudaEventDestroy(e0));
  SS_CHECK_CALL(cudaEventDestroy(e1));
  SS_CHECK_CALL(cudaStreamDestroy(stream));
  SS_CHECK_CALL(cudaFreeHost(h_out));
  SS_CHECK_CALL(cudaFreeHost(h_stage));
  SS_CHECK_CALL(cudaFree(d_out));
  SS_CHECK_CALL(cudaFree(d_pen));
  SS_CHECK_CALL(cudaFree(d_params));
  SS_CHECK_CALL(cudaFree(d_logits));
}

}  // namespace
}  // namespace starserve

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  int n_dev = 0;
  if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
    std::printf("{\"bench\": \"sampling\", \"skipped\": \"no CUDA device\"}\n");
    return 0;
  }
  cudaDeviceProp prop{};
  SS_CHECK_CALL(cudaGetDeviceProperties(&prop, 0));
  for (const auto& mode : starserve::modes()) {
    for (int n_vocab : {49152, 128256}) {
      for (int rows : {1, 8, 64}) starserve::run(mode, rows, n_vocab, quick, prop.name);
    }
  }
  return 0;
}
