// WeightSource over a GGUF file: hyper-parameters from its metadata, tensors dequantized to fp32
// on load. Tensor names are already the canonical ones ("blk.3.attn_q.weight").
#pragma once

#include <memory>
#include <string>

#include "common/status.h"
#include "model/gguf.h"
#include "model/hparams.h"
#include "model/weight_source.h"

namespace starserve {

// Reads ModelHParams from the metadata of a GGUF file (keys "<arch>.block_count", ...; see
// gguf_source.cpp for each key and its default). general.architecture llama, qwen2, qwen3, gemma2,
// gemma3 and phi3 are supported (what llama.cpp hard-codes for them, such as Gemma's layer pattern,
// is filled in here); others give kUnimplemented naming the architecture. Missing required keys give kNotFound,
// inconsistent values (hidden != n_heads * head_dim, n_heads % n_kv_heads != 0, ...) kDataLoss.
// Llama3-style RoPE scaling is not in the metadata: llama.cpp stores it as the tensor
// "rope_freqs.weight" (per-pair divisors), which the caller loads when has() says it is there.
Result<ModelHParams> read_gguf_hparams(const gguf::GgufFile& file);

class GgufWeightSource : public WeightSource {
 public:
  static Result<std::unique_ptr<GgufWeightSource>> open(const std::string& path);
  // Wraps an already parsed file (tests build them in memory).
  static Result<std::unique_ptr<GgufWeightSource>> from_file(std::unique_ptr<gguf::GgufFile> file);

  const ModelHParams& hparams() const override { return hparams_; }
  bool has(const std::string& name) const override;
  // Shape is the ggml dims reversed (ggml [576, 192] -> {192, 576}, outermost first). kNotFound
  // when the tensor is absent, kUnimplemented when its type cannot be dequantized.
  Result<HostTensor> load(const std::string& name) const override;
  // "gguf v3, 272 tensors, Q4_1, llama 'Smollm2 135M ...'"
  std::string describe() const override;

  // The tokenizer and chat template read their metadata from here.
  const gguf::GgufFile& file() const { return *file_; }

 private:
  GgufWeightSource(std::unique_ptr<gguf::GgufFile> file, ModelHParams hparams)
      : file_(std::move(file)), hparams_(std::move(hparams)) {}

  std::unique_ptr<gguf::GgufFile> file_;
  ModelHParams hparams_;
};

}  // namespace starserve
