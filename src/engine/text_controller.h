// The coordinator's DecodeController for text requests: samples with the request's parameters,
// ends on EOS / stop token ids / stop strings / max_tokens / cancellation, and streams the text
// deltas (complete UTF-8 only, stop strings never leaked) to a callback.
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "engine/decode_controller.h"
#include "engine/sampling.h"
#include "engine/stop.h"
#include "model/tokenizer.h"

namespace starserve {

struct TokenEvent {
  int32_t token = 0;
  std::string text;                        // new text released by this token (may be empty)
  std::optional<TokenLogprobs> logprobs;   // when the request asked for logprobs
};

class TextController final : public DecodeController {
 public:
  using EventFn = std::function<void(const TokenEvent&)>;
  using PollFn = std::function<FinishReason()>;

  TextController(const Tokenizer& tokenizer, const SamplingParams& params, std::vector<int32_t> prompt_tokens,
                 EventFn on_event, PollFn poll = {});

  int32_t choose(std::span<float> logits) override;
  // Device sampling unless logprobs were requested (they need the host logits).
  bool can_sample_on_device() const override { return !params_.logprobs; }
  void prepare_device_sample(SampleRow* row) override;
  FinishReason accept(int32_t token) override;
  FinishReason poll() override { return poll_ ? poll_() : FinishReason::kUnspecified; }

  // After the loop: releases held-back text (a partial stop-string prefix, an unfinished UTF-8
  // character) as a final event when generation did not end on a stop string.
  void finish(FinishReason reason);

  const std::string& text() const { return text_; }
  const std::vector<int32_t>& output_tokens() const { return output_; }

 private:
  void emit(int32_t token, std::string text);

  const Tokenizer& tokenizer_;
  SamplingParams params_;
  Sampler sampler_;
  StopMatcher stop_;
  Tokenizer::StreamDecoder decoder_;
  std::vector<int32_t> prompt_, generated_, output_;
  std::vector<int32_t> penalty_tokens_, penalty_counts_;  // prepare_device_sample's entries
  EventFn on_event_;
  PollFn poll_;
  std::string text_;
  std::optional<TokenLogprobs> pending_logprobs_;
  bool stopped_by_string_ = false;
};

}  // namespace starserve
