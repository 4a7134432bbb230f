#include "engine/serving_engine.h"

#include <algorithm>
#include <numeric>

#include <spdlog/spdlog.h>

namespace starserve {

namespace {

using Clock = std::chrono::steady_clock;

enum class Cmd : int64_t { kStop = 1, kAdmit, kEncode, kDecode, kRelease };

double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

// Rank 0 sends a message as (length, int64 words); workers receive the same.
Status broadcast_message(Communicator& comm, std::vector<int64_t>& msg) {
  int64_t n = static_cast<int64_t>(msg.size());
  SS_RETURN_IF_ERROR(comm.broadcast(&n, sizeof(n), 0));
  msg.resize(n);
  if (n > 0) SS_RETURN_IF_ERROR(comm.broadcast(msg.data(), n * sizeof(int64_t), 0));
  return Status();
}

}  // namespace

// What every rank keeps per request, and how every rank executes a step.
class EngineState {
 public:
  explicit EngineState(const EngineContext& ctx)
      : ctx_(ctx),
        encoder_(*ctx.model, *ctx.cache, *ctx.comm),
        phase2_(ctx.model->backend(), *ctx.cache, ctx.model->hparams(), *ctx.comm, MergeAlgo::kAuto) {}

  struct Seq {
    AttentionMode mode = AttentionMode::kStar;
    StarLayout layout;
    std::vector<int32_t> context;
    bool registered = false;
  };

  // Executes one broadcast step, then every rank reports the KV pages it holds (one small
  // all-gather), for the per-rank metrics. On rank 0 a DECODE step returns one logits row per entry
  // in *logits, or, when `rows` is not empty, one token per entry picked on the device from the
  // rows' requests (Model::forward_sample) in `sampled`.
  Status execute(const std::vector<int64_t>& m, std::vector<float>* logits, std::span<const SampleRow> rows = {},
                 std::span<int32_t> sampled = {}) {
    SS_RETURN_IF_ERROR(execute_command(m, logits, rows, sampled));
    const int64_t used = ctx_.cache->pages_total() - ctx_.cache->pages_free();
    pages_used_.resize(ctx_.comm->world_size());
    return ctx_.comm->all_gather(&used, pages_used_.data(), sizeof(int64_t));
  }
  const std::vector<int64_t>& pages_used() const { return pages_used_; }

  Status execute_command(const std::vector<int64_t>& m, std::vector<float>* logits, std::span<const SampleRow> rows,
                         std::span<int32_t> sampled) {
    size_t i = 0;
    const Cmd cmd = static_cast<Cmd>(m[i++]);
    const int64_t n = m.size() > 1 ? m[i++] : 0;
    switch (cmd) {
      case Cmd::kStop: return Status();
      case Cmd::kAdmit:
        for (int64_t r = 0; r < n; ++r) {
          const SeqId id = m[i++];
          SS_CHECK(!ctx_.cache->has(id) && seqs_.count(id) == 0, "sequence {} admitted twice", id);
          Seq s;
          s.mode = static_cast<AttentionMode>(m[i++]);
          const ContextPlan plan{s.mode, static_cast<int>(m[i++]), static_cast<int>(m[i++]), 0};
          const int64_t n_ctx = m[i++];
          s.context.assign(m.begin() + i, m.begin() + i + n_ctx);
          i += n_ctx;
          SS_ASSIGN_OR_RETURN(s.layout, encoder_.layout_for(n_ctx, plan));
          seqs_[id] = std::move(s);
        }
        return Status();
      case Cmd::kEncode:
        for (int64_t r = 0; r < n; ++r) {
          const SeqId id = m[i++];
          const int k = static_cast<int>(m[i++]);
          Seq& s = seqs_.at(id);
          if (s.mode == AttentionMode::kExact) {
            SS_RETURN_IF_ERROR(encoder_.encode_exact(id, s.context, s.layout));
          } else if (k < static_cast<int>(s.layout.blocks_of(ctx_.comm->rank()).size())) {
            SS_RETURN_IF_ERROR(encoder_.encode_block(id, s.context, s.layout, k));
          } else {
            SS_RETURN_IF_ERROR(encoder_.join_block(s.layout, k));
          }
        }
        return Status();
      case Cmd::kDecode: {
        std::vector<std::vector<int32_t>> tokens(n), positions(n);
        std::vector<BatchSeq> batch(n);
        for (int64_t r = 0; r < n; ++r) {
          const SeqId id = m[i++];
          const int64_t start = m[i++], count = m[i++];
          tokens[r].assign(m.begin() + i, m.begin() + i + count);
          i += count;
          positions[r].resize(count);
          std::iota(positions[r].begin(), positions[r].end(), static_cast<int32_t>(start));
          Seq& s = seqs_.at(id);
          if (!s.registered) {
            encoder_.finish(id);  // phase 1 over: drop the anchor's scratch KV
            phase2_.register_sequence(id, ctx_.comm->rank() == s.layout.query_host, s.layout.n_context);
            s.registered = true;
            s.context.clear();
            s.context.shrink_to_fit();
          }
          batch[r] = BatchSeq{id, tokens[r], positions[r], false};
        }
        if (ctx_.comm->rank() == 0 && !rows.empty()) return ctx_.model->forward_sample(batch, phase2_, rows, sampled);
        return ctx_.model->forward(batch, phase2_, ctx_.comm->rank() == 0 ? logits : nullptr);
      }
      case Cmd::kRelease:
        for (int64_t r = 0; r < n; ++r) {
          const SeqId id = m[i++];
          phase2_.forget_sequence(id);
          encoder_.finish(id);
          ctx_.cache->free_sequence(id);
          seqs_.erase(id);
        }
        return Status();
    }
    return internal_error("unknown control command {}", static_cast<int64_t>(cmd));
  }

  Phase2Attention& phase2() { return phase2_; }

 private:
  const EngineContext& ctx_;
  ContextEncoder encoder_;
  Phase2Attention phase2_;
  std::map<SeqId, Seq> seqs_;
  std::vector<int64_t> pages_used_;
};

// ---------------------------------------------------------------- rank 0

struct ServingEngine::Active {
  RequestId id = 0;
  EngineRequest req;
  EngineEventFn on_event;
  StarLayout layout;
  int64_t pages = 0;             // reserved in the mirror
  int encode_steps = 0;          // phase-1 steps needed (max blocks on any rank; exact: 1)
  int encode_done = 0;
  bool admitted = false;         // ADMIT broadcast
  bool prefilled = false;        // query went through
  int64_t position = 0;          // next RoPE position
  std::vector<int32_t> next_tokens;
  std::unique_ptr<TextController> controller;
  std::optional<EntropyStats> entropy;
  bool cancel = false;
  Clock::time_point submitted, phase1_start, phase1_end, first_token;
  int64_t n_generated = 0;
  bool done = false;
};

ServingEngine::ServingEngine(const EngineContext& ctx) : ctx_(ctx), state_(std::make_unique<EngineState>(ctx)) {
  pages_free_ = ctx.cache->pages_total();
  pages_free_snapshot_ = pages_free_;
}

ServingEngine::~ServingEngine() = default;

Result<RequestId> ServingEngine::submit(EngineRequest request, EngineEventFn on_event) {
  if (stopping_) return unavailable("the server is shutting down");
  const ModelHParams& hp = ctx_.model->hparams();
  SS_RETURN_IF_ERROR(request.sampling.validate(hp.n_vocab));
  if (request.query.empty()) return invalid_argument("the query is empty (at least one token is needed)");
  for (const auto* part : {&request.context, &request.query}) {
    for (int32_t t : *part) {
      if (t < 0 || t >= hp.n_vocab) return invalid_argument("token id {} out of range [0, {})", t, hp.n_vocab);
    }
  }
  const int64_t total = static_cast<int64_t>(request.context.size() + request.query.size()) +
                        request.sampling.max_tokens;
  if (total > ctx_.max_context) {
    return invalid_argument("prompt of {} tokens + max_tokens {} = {} exceeds the maximum context of {} tokens",
                            request.context.size() + request.query.size(), request.sampling.max_tokens, total,
                            ctx_.max_context);
  }
  auto a = std::make_unique<Active>();
  a->req = std::move(request);
  if (a->req.block_size == 0) a->req.block_size = ctx_.star.block_size;
  if (a->req.anchor_size == -1) a->req.anchor_size = ctx_.star.anchor_size;
  const ContextPlan plan{a->req.mode, a->req.block_size, a->req.anchor_size, 0};
  // Layout and KV demand per rank: context share (+ the anchor's scratch on ranks without c1)
  // (+ query and generated tokens on the query host). The largest share decides.
  ContextEncoder probe_free_layout(*ctx_.model, *ctx_.cache, *ctx_.comm);
  SS_ASSIGN_OR_RETURN(a->layout, probe_free_layout.layout_for(static_cast<int64_t>(a->req.context.size()), plan));
  int64_t worst = 0;
  int max_blocks = 0;
  for (int r = 0; r < ctx_.comm->world_size(); ++r) {
    const auto mine = a->layout.blocks_of(r);
    int64_t pages = ctx_.cache->pages_for(a->layout.tokens_of(r) +
                                          (r == a->layout.query_host ? static_cast<int64_t>(a->req.query.size()) +
                                                                           a->req.sampling.max_tokens
                                                                     : 0));
    if (!mine.empty() && mine.front().index != 0 && a->layout.anchor_size > 0 && plan.mode == AttentionMode::kStar) {
      pages += ctx_.cache->pages_for(a->layout.anchor_size);
    }
    worst = std::max(worst, pages);
    max_blocks = std::max(max_blocks, static_cast<int>(mine.size()));
  }
  if (worst > ctx_.cache->pages_total()) {
    return resource_exhausted("request needs {} KV pages on one rank, each rank has {} in total", worst,
                              ctx_.cache->pages_total());
  }
  a->pages = worst;
  a->encode_steps = a->req.mode == AttentionMode::kExact ? (a->req.context.empty() ? 0 : 1) : max_blocks;
  a->on_event = std::move(on_event);
  a->submitted = Clock::now();
  std::lock_guard<std::mutex> lock(mu_);
  if (static_cast<int>(incoming_.size()) >= ctx_.scheduler.max_queue) {
    return resource_exhausted("request queue is full ({} waiting, limit {})", incoming_.size(),
                              ctx_.scheduler.max_queue);
  }
  a->id = next_id_++;
  const RequestId id = a->id;
  incoming_.push_back(std::move(a));
  queue_depth_ = static_cast<int>(incoming_.size());
  cv_.notify_one();
  return id;
}

void ServingEngine::cancel(RequestId id) {
  std::lock_guard<std::mutex> lock(mu_);
  cancel_requests_.push_back(id);
  cv_.notify_one();
}

void ServingEngine::stop() {
  stopping_ = true;
  std::lock_guard<std::mutex> lock(mu_);
  cv_.notify_one();
}

EngineInfo ServingEngine::info() const {
  const ModelHParams& hp = ctx_.model->hparams();
  EngineInfo i;
  i.model_name = hp.name;
  i.model_path = ctx_.model_path;
  i.architecture = hp.arch_name;
  i.n_layers = hp.n_layers;
  i.n_heads = hp.n_heads;
  i.n_kv_heads = hp.n_kv_heads;
  i.hidden = hp.hidden;
  i.n_vocab = hp.n_vocab;
  i.max_context = ctx_.max_context;
  i.world_size = ctx_.comm->world_size();
  i.devices = ctx_.devices;
  i.star_defaults = ctx_.star;
  i.kv_pages_total = ctx_.cache->pages_total();
  i.kv_pages_free = pages_free_snapshot_.load();
  {
    std::lock_guard<std::mutex> lock(stats_mu_);
    i.kv_pages_used = pages_used_snapshot_;
    i.merge_seconds_total = merge_seconds_snapshot_;
    i.merges_total = merges_snapshot_;
  }
  i.queue_depth = queue_depth_.load();
  i.running = running_.load();
  return i;
}

void ServingEngine::finish(Active& a, FinishReason reason, Status error) {
  if (a.done) return;
  a.done = true;
  if (a.controller && reason != FinishReason::kError) a.controller->finish(reason);
  EngineEvent ev;
  ev.kind = EngineEvent::Kind::kFinished;
  ev.finish = reason;
  ev.error = std::move(error);
  ev.usage.context_tokens = static_cast<int64_t>(a.req.context.size());
  ev.usage.query_tokens = static_cast<int64_t>(a.req.query.size());
  ev.usage.completion_tokens = a.n_generated;
  const auto now = Clock::now();
  if (a.phase1_start != Clock::time_point{}) {
    ev.timing.queue_ms = ms_between(a.submitted, a.phase1_start);
    if (a.phase1_end != Clock::time_point{}) ev.timing.phase1_ms = ms_between(a.phase1_start, a.phase1_end);
  }
  if (a.first_token != Clock::time_point{}) {
    ev.timing.time_to_first_token_ms = ms_between(a.submitted, a.first_token);
    const double decode_s = std::chrono::duration<double>(now - a.first_token).count();
    if (a.n_generated > 1 && decode_s > 0) ev.timing.tokens_per_second = (a.n_generated - 1) / decode_s;
  }
  ev.entropy = a.entropy;
  if (a.on_event) a.on_event(ev);
}

// Moves queued requests into the active set while their KV fits (FIFO: no overtaking, so a large
// request is not starved by small ones).
bool ServingEngine::admit_waiting() {
  std::vector<std::unique_ptr<Active>> admitted;
  {
    std::lock_guard<std::mutex> lock(mu_);
    while (!incoming_.empty() && static_cast<int>(active_.size() + admitted.size()) < ctx_.scheduler.max_running &&
           incoming_.front()->pages <= pages_free_) {
      pages_free_ -= incoming_.front()->pages;
      admitted.push_back(std::move(incoming_.front()));
      incoming_.pop_front();
    }
    queue_depth_ = static_cast<int>(incoming_.size());
  }
  if (admitted.empty()) return false;
  for (auto& a : admitted) {
    a->position = static_cast<int64_t>(a->req.context.size());
    a->next_tokens = a->req.query;
    std::vector<int32_t> prompt = a->req.context;
    prompt.insert(prompt.end(), a->req.query.begin(), a->req.query.end());
    Active* raw = a.get();
    a->controller = std::make_unique<TextController>(
        *ctx_.tokenizer, a->req.sampling, std::move(prompt), [raw](const TokenEvent& t) {
          EngineEvent ev;
          ev.kind = EngineEvent::Kind::kToken;
          ev.token = t;
          if (raw->on_event) raw->on_event(ev);
        });
    if (a->req.return_entropy) {
      a->entropy.emplace();
      a->entropy->reset(ctx_.model->hparams().n_layers, ctx_.model->hparams().n_heads);
    }
    active_[a->id] = std::move(a);
  }
  return true;
}

Status ServingEngine::step() {
  // 1. Cancellations and deadlines.
  std::vector<RequestId> cancels;
  {
    std::lock_guard<std::mutex> lock(mu_);
    cancels.swap(cancel_requests_);
    // A request still queued is simply dropped.
    for (RequestId id : cancels) {
      auto it = std::find_if(incoming_.begin(), incoming_.end(), [&](const auto& a) { return a->id == id; });
      if (it != incoming_.end()) {
        finish(**it, FinishReason::kCancelled);
        incoming_.erase(it);
      }
    }
    queue_depth_ = static_cast<int>(incoming_.size());
  }
  const auto now = Clock::now();
  for (RequestId id : cancels) {
    auto it = active_.find(id);
    if (it != active_.end()) finish(*it->second, FinishReason::kCancelled);
  }
  for (auto& [id, a] : active_) {
    if (!a->done && a->req.deadline && now > *a->req.deadline) {
      finish(*a, FinishReason::kError, deadline_exceeded("the request's deadline passed"));
    }
  }

  // 2. Release what finished (every rank frees the KV).
  std::vector<int64_t> msg = {static_cast<int64_t>(Cmd::kRelease), 0};
  for (auto it = active_.begin(); it != active_.end();) {
    if (it->second->done) {
      if (it->second->admitted) msg.push_back(static_cast<int64_t>(it->first));
      pages_free_ += it->second->pages;
      it = active_.erase(it);
    } else {
      ++it;
    }
  }
  if (msg.size() > 2) {
    msg[1] = static_cast<int64_t>(msg.size() - 2);
    SS_RETURN_IF_ERROR(broadcast_message(*ctx_.comm, msg));
    SS_RETURN_IF_ERROR(state_->execute(msg, nullptr));
  }

  // 3. New requests.
  admit_waiting();
  msg = {static_cast<int64_t>(Cmd::kAdmit), 0};
  for (auto& [id, a] : active_) {
    if (a->admitted) continue;
    a->admitted = true;
    a->phase1_start = Clock::now();
    msg.insert(msg.end(), {static_cast<int64_t>(id), static_cast<int64_t>(a->req.mode), a->req.block_size,
                           a->req.anchor_size, static_cast<int64_t>(a->req.context.size())});
    msg.insert(msg.end(), a->req.context.begin(), a->req.context.end());
    msg[1] += 1;
  }
  if (msg[1] > 0) {
    SS_RETURN_IF_ERROR(broadcast_message(*ctx_.comm, msg));
    SS_RETURN_IF_ERROR(state_->execute(msg, nullptr));
  }
  running_ = static_cast<int>(active_.size());
  pages_free_snapshot_ = pages_free_;
  publish_stats();

  // 4. One phase-1 block for every request still encoding (interleaved with decode below).
  msg = {static_cast<int64_t>(Cmd::kEncode), 0};
  std::vector<Active*> encoding;
  for (auto& [id, a] : active_) {
    if (a->encode_done < a->encode_steps) {
      msg.insert(msg.end(), {static_cast<int64_t>(id), a->encode_done});
      msg[1] += 1;
      encoding.push_back(a.get());
    }
  }
  if (msg[1] > 0) {
    SS_RETURN_IF_ERROR(broadcast_message(*ctx_.comm, msg));
    SS_RETURN_IF_ERROR(state_->execute(msg, nullptr));
    for (Active* a : encoding) {
      if (++a->encode_done == a->encode_steps) a->phase1_end = Clock::now();
    }
  }

  // 5. One decode step over every request whose context is encoded: its query (first time) or its
  //    last sampled token.
  msg = {static_cast<int64_t>(Cmd::kDecode), 0};
  std::vector<Active*> decoding;
  for (auto& [id, a] : active_) {
    if (a->done || a->encode_done < a->encode_steps) continue;
    if (a->phase1_end == Clock::time_point{}) a->phase1_end = Clock::now();
    msg.insert(msg.end(), {static_cast<int64_t>(id), a->position, static_cast<int64_t>(a->next_tokens.size())});
    msg.insert(msg.end(), a->next_tokens.begin(), a->next_tokens.end());
    msg[1] += 1;
    decoding.push_back(a.get());
  }
  if (decoding.empty()) return Status();
  SS_RETURN_IF_ERROR(broadcast_message(*ctx_.comm, msg));
  // On a backend that samples on the device, only the tokens come back, unless a request of this
  // step needs its logits on the host (logprobs): then the whole step takes the host path.
  const bool on_device =
      ctx_.model->backend().can_sample_rows() &&
      std::all_of(decoding.begin(), decoding.end(), [](const Active* a) { return a->controller->can_sample_on_device(); });
  std::vector<SampleRow> rows;
  std::vector<int32_t> tokens;
  if (on_device) {
    rows.resize(decoding.size());
    tokens.resize(decoding.size());
    for (size_t r = 0; r < decoding.size(); ++r) decoding[r]->controller->prepare_device_sample(&rows[r]);
  }
  // Entropy is tracked on rank 0 only (the merged values are identical on every rank), from the
  // request's first phase-2 forward: its query rows count too.
  for (Active* a : decoding) {
    if (!a->prefilled && a->entropy) state_->phase2().track_entropy(static_cast<SeqId>(a->id), &*a->entropy);
  }
  std::vector<float> logits;
  Status st = state_->execute(msg, on_device ? nullptr : &logits, rows, tokens);
  if (!st.ok()) {
    // A forward failure is a bug or a broken rank: fail the requests of this step, keep serving.
    for (Active* a : decoding) finish(*a, FinishReason::kError, st);
    return Status();
  }
  const int n_vocab = ctx_.model->hparams().n_vocab;
  for (size_t r = 0; r < decoding.size(); ++r) {
    Active& a = *decoding[r];
    a.prefilled = true;
    a.position += static_cast<int64_t>(a.next_tokens.size());
    const int32_t token =
        on_device ? tokens[r] : a.controller->choose(std::span<float>(logits.data() + r * n_vocab, n_vocab));
    if (a.first_token == Clock::time_point{}) a.first_token = Clock::now();
    ++a.n_generated;
    const FinishReason fr = a.controller->accept(token);
    a.next_tokens.assign(1, token);
    if (fr != FinishReason::kUnspecified) finish(a, fr);
  }
  publish_stats();
  return Status();
}

void ServingEngine::publish_stats() {
  std::lock_guard<std::mutex> lock(stats_mu_);
  if (!state_->pages_used().empty()) pages_used_snapshot_ = state_->pages_used();
  merge_seconds_snapshot_ = state_->phase2().merge_seconds();
  merges_snapshot_ = state_->phase2().merges();
}

Status ServingEngine::run() {
  ready_ = true;
  while (true) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait_for(lock, std::chrono::milliseconds(50), [&] {
        return stopping_ || !incoming_.empty() || !cancel_requests_.empty() || !active_.empty();
      });
    }
    if (stopping_) break;
    Status st = step();
    if (!st.ok()) return st;
  }
  // Fail what is left, then tell the workers.
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& a : incoming_) finish(*a, FinishReason::kError, unavailable("the server is shutting down"));
    incoming_.clear();
  }
  std::vector<int64_t> msg = {static_cast<int64_t>(Cmd::kRelease), 0};
  for (auto& [id, a] : active_) {
    finish(*a, FinishReason::kError, unavailable("the server is shutting down"));
    if (a->admitted) msg.push_back(static_cast<int64_t>(id));
    pages_free_ += a->pages;
  }
  active_.clear();
  if (msg.size() > 2) {
    msg[1] = static_cast<int64_t>(msg.size() - 2);
    SS_RETURN_IF_ERROR(broadcast_message(*ctx_.comm, msg));
    SS_RETURN_IF_ERROR(state_->execute(msg, nullptr));
  }
  msg = {static_cast<int64_t>(Cmd::kStop)};
  return broadcast_message(*ctx_.comm, msg);
}

Status run_worker(const EngineContext& ctx) {
  EngineState state(ctx);
  std::vector<int64_t> msg;
  while (true) {
    SS_RETURN_IF_ERROR(broadcast_message(*ctx.comm, msg));
    if (msg.empty()) return internal_error("empty control message from rank 0");
    if (static_cast<Cmd>(msg[0]) == Cmd::kStop) return Status();
    Status st = state.execute(msg, nullptr);
    // Rank 0 fails the affected requests; a worker that cannot execute a step cannot stay in step.
    if (!st.ok()) return st;
  }
}

}  // namespace starserve
