#include "engine/decode_loop.h"

#include <chrono>
#include <numeric>

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

namespace {
// What the coordinator broadcasts after each step.
struct StepDecision {
  int32_t token = -1;    // -1: no token this step (stopped before sampling)
  int32_t finish = 0;    // FinishReason; 0 = continue
};
}  // namespace

Result<DecodeOutcome> run_decode_loop(Model& model, AttentionHandler& attention, SeqId seq,
                                      std::span<const int32_t> first_tokens, int64_t first_position,
                                      Communicator& comm, DecodeController* controller) {
  using Clock = std::chrono::steady_clock;
  SS_CHECK((controller != nullptr) == comm.layout().is_coordinator(), "controller must exist exactly on rank 0");
  DecodeOutcome outcome;
  std::vector<int32_t> step_tokens(first_tokens.begin(), first_tokens.end());
  std::vector<int32_t> positions;
  std::vector<float> logits;
  const bool device_backend = model.backend().can_sample_rows();
  SampleRow row;
  int32_t device_token = -1;
  int64_t position = first_position;
  const auto t0 = Clock::now();
  auto t_first = t0;
  for (int step = 0;; ++step) {
    StepDecision d;
    if (controller) d.finish = static_cast<int32_t>(controller->poll());
    SS_RETURN_IF_ERROR(comm.broadcast(&d, sizeof(d), 0));
    if (d.finish != 0) {
      outcome.finish = static_cast<FinishReason>(d.finish);
      break;
    }
    positions.resize(step_tokens.size());
    std::iota(positions.begin(), positions.end(), static_cast<int32_t>(position));
    BatchSeq bs{seq, step_tokens, positions, false};
    if (controller && device_backend && controller->can_sample_on_device()) {
      controller->prepare_device_sample(&row);
      SS_RETURN_IF_ERROR(model.forward_sample({&bs, 1}, attention, {&row, 1}, {&device_token, 1}));
      d.token = device_token;
    } else {
      SS_RETURN_IF_ERROR(model.forward({&bs, 1}, attention, controller ? &logits : nullptr));
      if (controller) d.token = controller->choose(logits);
    }
    position += static_cast<int64_t>(step_tokens.size());
    if (controller) d.finish = static_cast<int32_t>(controller->accept(d.token));
    SS_RETURN_IF_ERROR(comm.broadcast(&d, sizeof(d), 0));
    if (step == 0) t_first = Clock::now();
    outcome.tokens.push_back(d.token);
    if (d.finish != 0) {
      outcome.finish = static_cast<FinishReason>(d.finish);
      break;
    }
    step_tokens.assign(1, d.token);
  }
  const auto t1 = Clock::now();
  outcome.first_step_s = std::chrono::duration<double>(t_first - t0).count();
  outcome.decode_s = std::chrono::duration<double>(t1 - t_first).count();
  return outcome;
}

}  // namespace starserve
