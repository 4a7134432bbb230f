// A Backend that forwards every op to another one, for tests that watch or replace one call (the
// device-sampling tests override can_sample_rows / sample_rows). Buffers are the inner backend's.
#pragma once

#include <memory>
#include <string>

#include "backend/backend.h"
#include "engine/sampling.h"

namespace starserve::testing_backend {

class ForwardingBackend : public Backend {
 public:
  explicit ForwardingBackend(std::unique_ptr<Backend> inner) : inner_(std::move(inner)) {}
  Backend& inner() { return *inner_; }

  DeviceKind kind() const override { return inner_->kind(); }
  std::string name() const override { return inner_->name(); }
  DType compute_dtype() const override { return inner_->compute_dtype(); }
  DeviceBuffer alloc(size_t bytes) override { return inner_->alloc(bytes); }
  void free_raw(void* ptr) override { inner_->free_raw(ptr); }
  void upload_f32(Tensor dst, const float* src) override { inner_->upload_f32(dst, src); }
  void download_f32(float* dst, Tensor src) override { inner_->download_f32(dst, src); }
  void copy(Tensor dst, Tensor src) override { inner_->copy(dst, src); }
  void convert(Tensor dst, Tensor src) override { inner_->convert(dst, src); }
  void upload_bytes(void* dst, const void* src, size_t bytes) override { inner_->upload_bytes(dst, src, bytes); }
  void download_bytes(void* dst, const void* src, size_t bytes) override { inner_->download_bytes(dst, src, bytes); }
  void synchronize() override { inner_->synchronize(); }
  void* stream() override { return inner_->stream(); }
  void embedding(Tensor out, Tensor table, std::span<const int32_t> ids) override { inner_->embedding(out, table, ids); }
  void rms_norm(Tensor out, Tensor in, Tensor weight, float eps) override { inner_->rms_norm(out, in, weight, eps); }
  void matmul(Tensor out, Tensor in, Tensor weight) override { inner_->matmul(out, in, weight); }
  void rope(Tensor x, std::span<const int32_t> positions, Tensor inv_freq, int rope_dim, RopeStyle style) override {
    inner_->rope(x, positions, inv_freq, rope_dim, style);
  }
  void swiglu(Tensor out, Tensor gate, Tensor up) override { inner_->swiglu(out, gate, up); }
  void add(Tensor out, Tensor a, Tensor b) override { inner_->add(out, a, b); }
  void split_qkv_rope(Tensor q, Tensor k, Tensor v, Tensor qkv, std::span<const int32_t> positions, Tensor inv_freq,
                      int rope_dim, RopeStyle style) override {
    inner_->split_qkv_rope(q, k, v, qkv, positions, inv_freq, rope_dim, style);
  }
  void swiglu_fused(Tensor out, Tensor gate_up) override { inner_->swiglu_fused(out, gate_up); }
  void add_rms_norm(Tensor out, Tensor x, Tensor h, Tensor weight, float eps) override {
    inner_->add_rms_norm(out, x, h, weight, eps);
  }
  void partial_attention(const AttentionCall& c) override { inner_->partial_attention(c); }
  void merge_partials(float* out, float* lse, float* entropy, std::span<const AttentionPartial> parts, int64_t n_rows,
                      int head_dim) override {
    inner_->merge_partials(out, lse, entropy, parts, n_rows, head_dim);
  }
  void merge_sum_terms(float* terms, const float* out, const float* lse, const float* entropy, const float* max_lse,
                       int64_t n_rows, int head_dim) override {
    inner_->merge_sum_terms(terms, out, lse, entropy, max_lse, n_rows, head_dim);
  }
  void merge_sum_finish(float* out, float* lse, float* entropy, const float* terms, const float* max_lse,
                        int64_t n_rows, int head_dim) override {
    inner_->merge_sum_finish(out, lse, entropy, terms, max_lse, n_rows, head_dim);
  }
  void begin_graph_step() override { inner_->begin_graph_step(); }
  void end_graph_step() override { inner_->end_graph_step(); }
  GraphStats graph_stats() const override { return inner_->graph_stats(); }
  double wait_seconds() const override { return inner_->wait_seconds(); }
  bool can_sample_rows() const override { return inner_->can_sample_rows(); }
  void sample_rows(std::span<int32_t> tokens, Tensor logits, std::span<const SampleRow> rows) override {
    inner_->sample_rows(tokens, logits, rows);
  }

 private:
  std::unique_ptr<Backend> inner_;
};

inline SamplingParams sampling_params_of(const SampleRow& row) {
  SamplingParams p;
  p.temperature = row.temperature;
  p.top_k = row.top_k;
  p.top_p = row.top_p;
  p.min_p = row.min_p;
  p.repetition_penalty = row.repetition_penalty;
  p.frequency_penalty = row.frequency_penalty;
  p.presence_penalty = row.presence_penalty;
  return p;
}

// What the host Sampler picks for a SampleRow: the row's penalty entries applied to logits (its
// n_vocab columns, penalised in place), then Sampler::choose at the row's u.
inline int32_t host_sample_row(const SampleRow& row, std::span<float> logits) {
  const SamplingParams p = sampling_params_of(row);
  apply_penalty_entries(p, logits, row.penalty_tokens, row.penalty_counts);
  Sampler sampler(p, static_cast<int>(row.n_vocab));
  return sampler.choose(logits, row.u);
}

}  // namespace starserve::testing_backend
