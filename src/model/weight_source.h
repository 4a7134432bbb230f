// WeightSource: where an architecture file gets its tensors, whatever the file format.
// Tensor names are canonical (the GGUF names: "token_embd.weight", "blk.3.attn_q.weight", ...);
// a source for another format maps its own names onto these.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"
#include "model/hparams.h"

namespace starserve {

// A dequantized tensor in host memory. shape is row-major, outermost first: a linear layer's weight
// is (out_features, in_features), the token embedding is (n_vocab, hidden).
struct HostTensor {
  std::vector<int64_t> shape;
  std::vector<float> data;
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

class WeightSource {
 public:
  virtual ~WeightSource() = default;
  virtual const ModelHParams& hparams() const = 0;
  virtual bool has(const std::string& name) const = 0;
  // Dequantizes to fp32. Errors name the tensor and what is wrong with it.
  virtual Result<HostTensor> load(const std::string& name) const = 0;
  // Short description for logs: "gguf v3, 272 tensors, Q4_1".
  virtual std::string describe() const = 0;
};

}  // namespace starserve
