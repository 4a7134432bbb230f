// How a request's tokens are decided: the coordinator's DecodeController picks each token from the
// last position's logits (sampling, stop rules, cancellation). Only rank 0 decides; the engine
// broadcasts its steps, so every rank runs exactly the same forwards (ranks never sample on their
// own: rounding differences would make them diverge). On a backend that samples on the device,
// the last-position logits stay there and only the token comes back (prepare_device_sample);
// otherwise they are downloaded and choose() picks on the host.
#pragma once

#include <cstdint>
#include <span>

#include "backend/backend.h"
#include "common/check.h"

namespace starserve {

enum class FinishReason { kUnspecified = 0, kStop, kLength, kCancelled, kError };
const char* finish_reason_name(FinishReason r);

// Lives on the coordinator only.
class DecodeController {
 public:
  virtual ~DecodeController() = default;
  // Picks the next token from the last position's logits (n_vocab, may be modified).
  virtual int32_t choose(std::span<float> logits) = 0;
  // Device sampling, on backends with Backend::can_sample_rows: whether this step's token may be
  // picked on the device from the same logits (false when choose() needs them on the host, e.g.
  // for logprobs). When it returns true, the loop calls prepare_device_sample instead of choose().
  virtual bool can_sample_on_device() const { return false; }
  // Describes what choose() would do for this step (parameters, the step's random draw, penalty
  // entries), consuming the random draw exactly as choose() does. row's spans point into the
  // controller and stay valid until its next call.
  virtual void prepare_device_sample(SampleRow* row) {
    SS_CHECK(false, "this controller does not sample on the device ({} columns)", row->n_vocab);
  }
  // Records the chosen token; returns kUnspecified to continue, or why generation ends (the token
  // is part of the output unless the controller drops it, e.g. EOS or a stop string).
  virtual FinishReason accept(int32_t token) = 0;
  // Checked before every forward step: cancellation and deadlines end generation here.
  virtual FinishReason poll() { return FinishReason::kUnspecified; }
};

}  // namespace starserve
