#include "engine/text_controller.h"

#include <algorithm>

namespace starserve {

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::kUnspecified: return "unspecified";
    case FinishReason::kStop: return "stop";
    case FinishReason::kLength: return "length";
    case FinishReason::kCancelled: return "cancelled";
    case FinishReason::kError: return "error";
  }
  return "unknown";
}

TextController::TextController(const Tokenizer& tokenizer, const SamplingParams& params,
                               std::vector<int32_t> prompt_tokens, EventFn on_event, PollFn poll)
    : tokenizer_(tokenizer),
      params_(params),
      sampler_(params, tokenizer.n_vocab()),
      stop_(params.stop),
      decoder_(tokenizer, /*skip_special=*/true),
      prompt_(std::move(prompt_tokens)),
      on_event_(std::move(on_event)),
      poll_(std::move(poll)) {}

int32_t TextController::choose(std::span<float> logits) {
  // The model's vocabulary can be larger than the tokenizer's (padded embedding tables): never
  // sample an id the tokenizer cannot decode.
  const auto usable = logits.subspan(0, std::min<size_t>(logits.size(), tokenizer_.n_vocab()));
  TokenLogprobs lp;
  const int32_t token = sampler_.sample(usable, prompt_, generated_, params_.logprobs ? &lp : nullptr);
  if (params_.logprobs) pending_logprobs_ = std::move(lp);
  return token;
}

void TextController::prepare_device_sample(SampleRow* row) {
  // The same steps as choose() -> Sampler::sample, split at the device boundary: the entries and
  // the draw here, the rest on the device over the tokenizer's part of the row.
  sampler_.penalty_entries(prompt_, generated_, &penalty_tokens_, &penalty_counts_);
  row->n_vocab = tokenizer_.n_vocab();
  row->temperature = params_.temperature;
  row->top_k = params_.top_k;
  row->top_p = params_.top_p;
  row->min_p = params_.min_p;
  row->repetition_penalty = params_.repetition_penalty;
  row->frequency_penalty = params_.frequency_penalty;
  row->presence_penalty = params_.presence_penalty;
  row->u = params_.temperature > 0.0f ? sampler_.draw_uniform() : 0.0;
  row->penalty_tokens = penalty_tokens_;
  row->penalty_counts = penalty_counts_;
}

void TextController::emit(int32_t token, std::string text) {
  text_ += text;
  TokenEvent ev;
  ev.token = token;
  ev.text = std::move(text);
  ev.logprobs = std::move(pending_logprobs_);
  pending_logprobs_.reset();
  if (on_event_) on_event_(ev);
}

FinishReason TextController::accept(int32_t token) {
  generated_.push_back(token);
  const bool stop_token = std::find(params_.stop_token_ids.begin(), params_.stop_token_ids.end(), token) !=
                          params_.stop_token_ids.end();
  if (stop_token || (!params_.ignore_eos && tokenizer_.is_end_of_generation(token))) {
    // The end token itself is not part of the text (OpenAI semantics).
    emit(token, "");
    return FinishReason::kStop;
  }
  output_.push_back(token);
  const StopFeedResult r = stop_.feed(decoder_.push(token));
  emit(token, r.emit);
  if (r.stopped) {
    stopped_by_string_ = true;
    return FinishReason::kStop;
  }
  if (static_cast<int>(generated_.size()) >= params_.max_tokens) return FinishReason::kLength;
  return FinishReason::kUnspecified;
}

void TextController::finish(FinishReason) {
  if (stopped_by_string_) return;
  // Held-back bytes: an unfinished UTF-8 character, then text that looked like a stop string start.
  const StopFeedResult r = stop_.feed(decoder_.flush());
  std::string rest = r.emit;
  if (!r.stopped) rest += stop_.flush();
  if (!rest.empty()) {
    text_ += rest;
    TokenEvent ev;
    ev.token = -1;
    ev.text = std::move(rest);
    if (on_event_) on_event_(ev);
  }
}

}  // namespace starserve
