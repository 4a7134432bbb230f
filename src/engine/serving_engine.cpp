#include "engine/serving_engine.h"

#include <algorithm>
#include <optional>
#include <thread>

#include "common/log.h"
#include "star/partition.h"

namespace starserve {

namespace {

using Clock = std::chrono::steady_clock;

// A worker whose step failed ends the job with this code (MPI_Abort) ...
constexpr int kStepFailedExitCode = 4;
// ... after this long for rank 0's watchdog to hear of it (beats come every second) and fail the requests first.
constexpr std::chrono::seconds kFailureReportWait{10};

double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

}  // namespace

// ---------------------------------------------------------------- rank 0

struct ServingEngine::Active {
  RequestId id = 0;
  EngineRequest req;
  std::shared_ptr<Sink> sink;
  bool admitted = false;         // ADMIT broadcast
  int layers_per_chunk = 0;      // chunked prefill (engine/scheduler.h); 0 = each block in one step
  int phase1_steps = 0;          // phase-1 steps run so far
  bool prefilled = false;        // query went through
  int64_t position = 0;          // next RoPE position
  std::vector<int32_t> next_tokens;
  std::unique_ptr<TextController> controller;
  std::optional<EntropyStats> entropy;
  std::vector<TokenLogprobs> prompt_logprobs;  // filled by the first decode step when requested
  Clock::time_point submitted, phase1_start, phase1_end, first_token;
  int64_t n_generated = 0;
  bool done = false;
  // Context reuse (engine/context_cache.h).
  StarLayout layout;
  bool cacheable = false;              // its context may be cached, or found cached
  std::vector<int64_t> cache_key;      // ContextCache::layout_key
  KvDemand miss_demand, hit_demand;    // encoding the context, or forking a cached one
  int64_t entry_pages = 0;             // what a cached copy of its context holds
  SeqId from_entry = -1;               // the cached context it forked (a hit), pinned while it runs
  std::string context_id;              // set once its context is cached (retained or found)
  // n > 1 (EngineRequest::n): the request's first choice runs phase 1 and the query; the others are forked
  // from it then (spawn_choices). group: the first choice's id, which cancel() takes, for all of them.
  int choice = 0;
  RequestId group = 0;
  bool spawned = false;                // the other choices exist
  KvDemand fork_demand;                // what each other choice holds once forked
  int64_t cached_context_tokens = 0;   // of its context, from a cached context
};

ServingEngine::ServingEngine(const EngineContext& ctx)
    : ctx_(ctx),
      scheduler_(ctx.scheduler, ctx.cache->pages_total()),
      executor_(std::make_unique<StepExecutor>(*ctx.model, *ctx.cache, *ctx.comm)) {
  pages_free_snapshot_ = scheduler_.pages_free();
}

ServingEngine::~ServingEngine() = default;

void ServingEngine::Sink::deliver(const EngineEvent& ev) {
  std::lock_guard<std::mutex> lock(mu);
  const size_t c = static_cast<size_t>(ev.choice);
  if (closed || c >= done.size() || done[c]) return;
  if (ev.kind == EngineEvent::Kind::kFinished) {
    done[c] = 1;
    closed = std::all_of(done.begin(), done.end(), [](char d) { return d != 0; });
  }
  if (fn) fn(ev);
}

void ServingEngine::Sink::finish_open(EngineEvent ev) {
  std::lock_guard<std::mutex> lock(mu);
  if (closed) return;
  closed = true;
  for (size_t c = 0; c < done.size(); ++c) {
    if (done[c]) continue;
    done[c] = 1;
    ev.choice = static_cast<int>(c);
    if (fn) fn(ev);
  }
}

Result<RequestId> ServingEngine::submit(EngineRequest request, EngineEventFn on_event) {
  if (failed_) {
    std::lock_guard<std::mutex> lock(mu_);
    return failure_;
  }
  if (stopping_ || draining_) return unavailable("the server is shutting down");
  const ModelHParams& hp = ctx_.model->hparams();
  SS_RETURN_IF_ERROR(request.sampling.validate(hp.n_vocab));
  if (request.prompt_logprobs && (*request.prompt_logprobs < 0 || *request.prompt_logprobs > kMaxLogprobs)) {
    return invalid_argument("prompt_logprobs = {} must be in [0, {}]", *request.prompt_logprobs, kMaxLogprobs);
  }
  if (request.query.empty()) return invalid_argument("the query is empty (at least one token is needed)");
  if (request.n < 1 || request.n > kMaxChoices) return invalid_argument("n = {} must be in [1, {}]", request.n, kMaxChoices);
  if (request.n > ctx_.scheduler.max_running) {
    return invalid_argument("n = {} exceeds the sequences decoded together (--max-running {})", request.n,
                            ctx_.scheduler.max_running);
  }
  if (!request.context_id.empty()) {
    if (!request.context.empty() || request.split_prompt) {
      return invalid_argument("context_id {} stands for the context: a request with it carries only the query",
                              request.context_id);
    }
    std::lock_guard<std::mutex> lock(mu_);
    const std::vector<int32_t>* tokens = context_cache_.tokens_of(request.context_id);
    if (tokens == nullptr) {
      return not_found("context_id {} is not cached here (evicted, or not from this server): send the context itself",
                       request.context_id);
    }
    request.context = *tokens;
  }
  if (request.split_prompt) {
    // A plain prompt: the last query_tail tokens are the query (phase 2), the rest the context.
    if (!request.context.empty()) return invalid_argument("a prompt to split must come without a separate context");
    const int64_t n_ctx = plain_prompt_context_tokens(static_cast<int64_t>(request.query.size()));
    request.context.assign(request.query.begin(), request.query.begin() + n_ctx);
    request.query.erase(request.query.begin(), request.query.begin() + n_ctx);
    request.split_prompt = false;
  }
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
  if (a->req.exact_layout == ExactLayout::kAuto) a->req.exact_layout = ctx_.star.exact_layout;
  const ContextPlan plan{a->req.mode, a->req.block_size, a->req.anchor_size, a->req.n_blocks, a->req.exact_layout};
  // The model's layout limits too (a KV-shifting or Attamba model's halo): a layout the ranks
  // would refuse mid-step is refused here, as the request's error.
  SS_ASSIGN_OR_RETURN(const StarLayout layout,
                      executor_->layout_for(static_cast<int64_t>(a->req.context.size()), plan));
  // Chunked prefill: the longest forward of phase 1 (a block; exact: a rank's span) is split by
  // layers so that each step does about prefill_chunk_tokens tokens' work.
  int64_t longest = 0;
  for (int r = 0; r < layout.world_size; ++r) {
    if (plan.mode == AttentionMode::kExact) longest = std::max(longest, layout.tokens_of(r));
  }
  for (const StarBlock& b : layout.blocks) {
    if (plan.mode != AttentionMode::kExact) longest = std::max(longest, b.size());
  }
  a->layers_per_chunk = prefill_layers_per_chunk(hp.n_layers, ctx_.scheduler.prefill_chunk_tokens, longest);
  KvDemand demand = kv_demand(layout, plan.mode,
                                    static_cast<int64_t>(a->req.query.size()) + a->req.sampling.max_tokens,
                                    ctx_.cache->shape().page_size, executor_->chunks_per_block(a->layers_per_chunk),
                                    ctx_.cache->shape().compressed_chunk);
  demand.step_tokens = prefill_step_tokens(hp.n_layers, a->layers_per_chunk, longest);
  // n > 1: the other choices' pages and decode slots are reserved with the first's.
  const int n_more = a->req.n - 1;
  if (n_more > 0) {
    a->fork_demand = kv_demand_fork(layout, static_cast<int64_t>(a->req.query.size()), a->req.sampling.max_tokens,
                                    ctx_.cache->shape().page_size, ctx_.cache->shape().compressed_chunk);
    demand.pages += n_more * a->fork_demand.pages;
    demand.slots += n_more;
  }
  a->miss_demand = demand;
  a->layout = layout;
  const int64_t cache_limit = ctx_.scheduler.context_cache_pages;
  if (cache_limit != 0 && !a->req.context.empty() && !a->req.prompt_logprobs) {
    const int64_t page = ctx_.cache->shape().page_size;
    const int compressed = ctx_.cache->shape().compressed_chunk;
    a->entry_pages = context_entry_pages(layout, page, compressed);
    a->cacheable = cache_limit < 0 || a->entry_pages <= cache_limit;
    a->cache_key = ContextCache::layout_key(layout, plan.mode);
    a->hit_demand = kv_demand_cached(layout, static_cast<int64_t>(a->req.query.size()) + a->req.sampling.max_tokens,
                                     page, compressed);
    a->hit_demand.pages += n_more * a->fork_demand.pages;
    a->hit_demand.slots += n_more;
  }
  a->sink = std::make_shared<Sink>();
  a->sink->fn = std::move(on_event);
  a->sink->done.assign(static_cast<size_t>(a->req.n), 0);
  a->submitted = Clock::now();
  std::lock_guard<std::mutex> lock(mu_);
  if (failed_) return failure_;
  const RequestId id = next_id_;
  SS_RETURN_IF_ERROR(scheduler_.enqueue(id, demand));
  ++next_id_;
  a->id = id;
  a->group = id;
  sinks_[id] = a->sink;
  waiting_[id] = std::move(a);
  queue_depth_ = scheduler_.waiting_count();
  cv_.notify_one();
  return id;
}

int64_t ServingEngine::plain_prompt_context_tokens(int64_t n_prompt) const {
  return split_plain_prompt(n_prompt, ctx_.star.query_tail);
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

void ServingEngine::drain(std::chrono::milliseconds grace) {
  std::lock_guard<std::mutex> lock(mu_);
  if (draining_) return;
  drain_deadline_ = Clock::now() + grace;
  draining_ = true;
  cv_.notify_one();
}

void ServingEngine::fail_all(const Status& error) {
  std::vector<std::shared_ptr<Sink>> sinks;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!failed_) failure_ = error;
    failed_ = true;
    for (auto& [id, sink] : sinks_) sinks.push_back(sink);
    sinks_.clear();
    cv_.notify_one();
  }
  EngineEvent ev;
  ev.kind = EngineEvent::Kind::kFinished;
  ev.finish = FinishReason::kError;
  ev.error = error;
  for (auto& sink : sinks) sink->finish_open(ev);
}

StepState ServingEngine::step_state() const {
  StepState s;
  s.completed = steps_completed_.load();
  s.started = steps_started_.load();
  if (s.in_step()) {
    const int64_t now = Clock::now().time_since_epoch().count();
    s.running_s = std::chrono::duration<double>(Clock::duration(now - step_since_ns_.load())).count();
  }
  return s;
}

Status ServingEngine::broadcast_step(std::vector<int64_t>& words) {
  // The step counts as started before its broadcast: a worker stuck between steps blocks the broadcast itself.
  step_since_ns_ = Clock::now().time_since_epoch().count();
  ++steps_started_;
  return broadcast_control(*ctx_.comm, words);
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
  i.communicator = ctx_.comm->name();
  i.devices = ctx_.devices;
  i.star_defaults = ctx_.star;
  i.kv_pages_total = ctx_.cache->pages_total();
  i.kv_pages_free = pages_free_snapshot_.load();
  {
    std::lock_guard<std::mutex> lock(stats_mu_);
    i.kv_pages_used = pages_used_snapshot_;
    i.merge_seconds_total = merge_seconds_snapshot_;
    i.merges_total = merges_snapshot_;
    i.phase1_steps = phase1_steps_snapshot_;
  }
  i.queue_depth = queue_depth_.load();
  i.running = running_.load();
  {
    std::lock_guard<std::mutex> lock(mu_);
    i.context_cache_max_pages = ctx_.scheduler.context_cache_pages;
    i.engine_schedule_s = 1e-9 * static_cast<double>(schedule_ns_.load());
    i.engine_prefill_s = 1e-9 * static_cast<double>(prefill_ns_.load());
    i.engine_forward_s = 1e-9 * static_cast<double>(forward_ns_.load());
    i.engine_tokens_s = 1e-9 * static_cast<double>(tokens_ns_.load());
    i.engine_forward_wait_s = forward_wait_s_.load();
    i.decode_steps = decode_steps_.load();
    i.decoded_sequences = decoded_sequences_.load();
    i.context_cache_entries = context_cache_.size();
    i.context_cache_pages = context_cache_.pages();
    i.context_cache_hits = context_cache_.stats().hits;
    i.context_cache_misses = context_cache_.stats().misses;
    i.context_cache_evictions = context_cache_.stats().evictions;
  }
  const KvCacheShape& kv = ctx_.cache->shape();
  i.kv_bytes_per_row = ctx_.cache->bytes_per_token();
  i.kv_dtype = ctx_.model->backend().compute_dtype() == DType::kBF16 ? "bf16" : "f32";
  i.kv_page_size = kv.page_size;
  i.kv_compressed_chunk = kv.compressed_chunk;
  if (hp.attamba.enabled()) i.kv_leading_tokens = hp.attamba.leading;
  i.kv_state_bytes_per_sequence = ctx_.model->sequence_state_bytes();
  return i;
}

void ServingEngine::finish(Active& a, FinishReason reason, Status error) {
  if (a.done) return;
  a.done = true;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (a.admitted) scheduler_.finish(a.id);
  }
  if (a.controller && reason != FinishReason::kError) a.controller->finish(reason);
  EngineEvent ev;
  ev.kind = EngineEvent::Kind::kFinished;
  ev.finish = reason;
  ev.error = std::move(error);
  ev.usage.context_tokens = static_cast<int64_t>(a.req.context.size());
  ev.usage.query_tokens = static_cast<int64_t>(a.req.query.size());
  ev.usage.completion_tokens = a.n_generated;
  ev.usage.cached_context_tokens = a.cached_context_tokens;
  ev.context_id = a.context_id;
  ev.timing.phase1_steps = a.phase1_steps;
  const auto now = Clock::now();
  if (a.phase1_start != Clock::time_point{}) {
    ev.timing.queue_ms = ms_between(a.submitted, a.phase1_start);
    if (a.phase1_end != Clock::time_point{}) ev.timing.phase1_ms = ms_between(a.phase1_start, a.phase1_end);
  }
  if (a.first_token != Clock::time_point{}) {
    ev.timing.time_to_first_token_ms = ms_between(a.submitted, a.first_token);
    ev.timing.decode_ms = ms_between(a.first_token, now);
    const double decode_s = ev.timing.decode_ms / 1000.0;
    if (a.n_generated > 1 && decode_s > 0) ev.timing.tokens_per_second = (a.n_generated - 1) / decode_s;
  }
  ev.choice = a.choice;
  ev.entropy = a.entropy;
  ev.prompt_logprobs = std::move(a.prompt_logprobs);
  // n > 1 ending before the other choices were forked: they end with it, with nothing generated.
  std::vector<EngineEvent> others;
  if (a.choice == 0 && !a.spawned) {
    for (int c = 1; c < a.req.n; ++c) {
      EngineEvent o = ev;
      o.choice = c;
      o.usage.completion_tokens = 0;
      o.entropy.reset();
      o.prompt_logprobs.clear();
      others.push_back(std::move(o));
    }
  }
  a.sink->deliver(ev);
  for (const EngineEvent& o : others) a.sink->deliver(o);
  bool closed = false;
  {
    std::lock_guard<std::mutex> lock(a.sink->mu);
    closed = a.sink->closed;
  }
  if (closed) {
    std::lock_guard<std::mutex> lock(mu_);
    sinks_.erase(a.group);
  }
}

// The request's TextController over its prompt (context + query), sending its tokens to the sink as its choice's.
void ServingEngine::make_controller(Active& a) {
  std::vector<int32_t> prompt = a.req.context;
  prompt.insert(prompt.end(), a.req.query.begin(), a.req.query.end());
  Active* raw = &a;
  a.controller = std::make_unique<TextController>(
      *ctx_.tokenizer, a.req.sampling, std::move(prompt), [raw](const TokenEvent& t) {
        EngineEvent ev;
        ev.kind = EngineEvent::Kind::kToken;
        ev.choice = raw->choice;
        ev.token = t;
        raw->sink->deliver(ev);
      });
}

// Moves what the scheduler admits from the queue into the active set and sets it up.
void ServingEngine::admit_waiting() {
  std::vector<std::unique_ptr<Active>> admitted;
  {
    std::lock_guard<std::mutex> lock(mu_);
    // One at a time (FIFO): a request whose context is cached now forks it and needs fewer pages; idle
    // cached contexts give their pages up before a request waits for them.
    while (const std::optional<RequestId> front = scheduler_.front()) {
      auto it = waiting_.find(*front);
      Active& a = *it->second;
      SeqId entry = -1;
      if (a.cacheable) {
        if (const ContextCache::Entry* e = context_cache_.find(a.req.context, a.cache_key)) entry = e->seq;
      }
      scheduler_.set_front_demand(entry >= 0 ? a.hit_demand : a.miss_demand);
      while (scheduler_.front_shortfall() > 0) {
        const std::optional<SeqId> victim = context_cache_.lru_idle(entry);
        if (!victim) break;
        evict_locked(*victim);
      }
      if (!scheduler_.admit_front()) break;
      if (entry >= 0) {
        context_cache_.pin(entry);
        a.from_entry = entry;
        a.context_id = context_cache_.get(entry)->id;
        a.cached_context_tokens = static_cast<int64_t>(a.req.context.size());
        ++context_cache_.stats().hits;
      } else if (a.cacheable) {
        ++context_cache_.stats().misses;
      }
      admitted.push_back(std::move(it->second));
      waiting_.erase(it);
    }
    queue_depth_ = scheduler_.waiting_count();
  }
  for (auto& a : admitted) {
    a->position = static_cast<int64_t>(a->req.context.size());
    a->next_tokens = a->req.query;
    make_controller(*a);
    if (a->req.return_entropy) {
      a->entropy.emplace();
      a->entropy->reset(ctx_.model->hparams().n_layers, ctx_.model->hparams().n_heads);
    }
    active_[a->id] = std::move(a);
  }
}

// Every rank frees the KV of what finished; the scheduler takes the pages back.
Status ServingEngine::release_finished() {
  ControlMessage msg(ControlCommand::kRelease);
  // n > 1: the first choice's KV holds the pages the others share (its context and query), so it goes last.
  const auto others_left = [&](const Active& a) {
    if (!a.spawned || a.choice != 0) return false;
    return std::any_of(active_.begin(), active_.end(),
                       [&](const auto& e) { return e.second.get() != &a && e.second->group == a.group; });
  };
  // Newest first: a request's other choices have larger ids than its first, so they go before it.
  std::vector<RequestId> ids;
  for (auto it = active_.rbegin(); it != active_.rend(); ++it) ids.push_back(it->first);
  for (RequestId id : ids) {
    auto it = active_.find(id);
    if (!it->second->done || others_left(*it->second)) continue;
    if (it->second->admitted) msg.add_release(static_cast<SeqId>(it->first));
    {
      std::lock_guard<std::mutex> lock(mu_);
      scheduler_.release(it->first);
      if (it->second->from_entry >= 0) context_cache_.unpin(it->second->from_entry);
    }
    active_.erase(it);
  }
  if (msg.empty()) return Status();
  SS_RETURN_IF_ERROR(broadcast_step(msg.words()));
  SS_RETURN_IF_ERROR(executor_->execute(msg.words(), nullptr));
  end_step();
  return Status();
}

void ServingEngine::evict_locked(SeqId entry) {
  scheduler_.return_pages(context_cache_.erase(entry));
  evicted_.push_back(entry);
  ++context_cache_.stats().evictions;
}

bool ServingEngine::make_room_locked(int64_t pages) {
  const int64_t limit = ctx_.scheduler.context_cache_pages;
  if (limit > 0) {
    while (context_cache_.pages() + pages > limit) {
      const std::optional<SeqId> victim = context_cache_.lru_idle();
      if (!victim) return false;
      evict_locked(*victim);
    }
  }
  while (!scheduler_.hold_pages(pages)) {
    const std::optional<SeqId> victim = context_cache_.lru_idle();
    if (!victim) return false;
    evict_locked(*victim);
  }
  return true;
}

Status ServingEngine::flush_evictions() {
  ControlMessage msg(ControlCommand::kRelease);
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (SeqId e : evicted_) msg.add_release(e);
    evicted_.clear();
  }
  if (msg.empty()) return Status();
  SS_RETURN_IF_ERROR(broadcast_step(msg.words()));
  SS_RETURN_IF_ERROR(executor_->execute(msg.words(), nullptr));
  end_step();
  return Status();
}

Status ServingEngine::step() {
  // Where the step's time goes (EngineInfo::engine_*_s).
  auto mark = Clock::now();
  const auto lap = [&mark](std::atomic<int64_t>& into) {
    const auto now = Clock::now();
    into += std::chrono::duration_cast<std::chrono::nanoseconds>(now - mark).count();
    mark = now;
  };
  // 1. Cancellations and deadlines. A request still queued is simply dropped.
  std::vector<RequestId> cancels;
  std::vector<std::unique_ptr<Active>> dropped;
  {
    std::lock_guard<std::mutex> lock(mu_);
    cancels.swap(cancel_requests_);
    for (RequestId id : cancels) {
      auto it = waiting_.find(id);
      if (it != waiting_.end() && scheduler_.drop_waiting(id)) {
        dropped.push_back(std::move(it->second));
        waiting_.erase(it);
      }
    }
    queue_depth_ = scheduler_.waiting_count();
  }
  for (auto& a : dropped) finish(*a, FinishReason::kCancelled);
  const auto now = Clock::now();
  for (RequestId id : cancels) {
    for (auto& [aid, a] : active_) {
      if (a->group == id || aid == id) finish(*a, FinishReason::kCancelled);  // the request's every choice
    }
  }
  for (auto& [id, a] : active_) {
    if (!a->done && a->req.deadline && now > *a->req.deadline) {
      finish(*a, FinishReason::kError, deadline_exceeded("the request's deadline passed"));
    }
  }

  // 2. Release what finished (every rank frees the KV).
  SS_RETURN_IF_ERROR(release_finished());

  // 3. New requests: every rank records them and derives their layout.
  admit_waiting();
  SS_RETURN_IF_ERROR(flush_evictions());  // before the ADMIT: a request forking a cached context takes pages
  ControlMessage admit(ControlCommand::kAdmit);
  for (auto& [id, a] : active_) {
    if (a->admitted) continue;
    a->admitted = true;
    a->phase1_start = Clock::now();
    if (a->from_entry >= 0) a->phase1_end = a->phase1_start;  // a cached context: no phase 1
    admit.add_admit(static_cast<SeqId>(id),
                    {a->req.mode, a->req.block_size, a->req.anchor_size, a->req.n_blocks, a->req.exact_layout},
                    a->layers_per_chunk, a->req.context, a->req.prompt_logprobs.value_or(-1), a->req.query.front(),
                    a->from_entry);
  }
  if (!admit.empty()) {
    SS_RETURN_IF_ERROR(broadcast_step(admit.words()));
    SS_RETURN_IF_ERROR(executor_->execute(admit.words(), nullptr));
    end_step();
  }
  running_ = static_cast<int>(active_.size());
  {
    std::lock_guard<std::mutex> lock(mu_);
    pages_free_snapshot_ = scheduler_.pages_free();
  }
  publish_stats();

  lap(schedule_ns_);
  // 4. Phase-1 steps of the requests still encoding, as many as the step's token budget leaves after the
  //    running decodes (engine/scheduler.h), interleaved with the decode step below.
  std::vector<std::pair<RequestId, int>> encoding;
  {
    std::lock_guard<std::mutex> lock(mu_);
    int64_t decode_tokens = 0;
    for (RequestId id : scheduler_.decode_batch()) {
      decode_tokens += static_cast<int64_t>(active_.at(id)->next_tokens.size());
    }
    encoding = scheduler_.encode_batch(decode_tokens);
  }
  if (!encoding.empty()) {
    ControlMessage msg(ControlCommand::kEncode);
    for (const auto& [id, k] : encoding) msg.add_encode(static_cast<SeqId>(id), k);
    SS_RETURN_IF_ERROR(broadcast_step(msg.words()));
    SS_RETURN_IF_ERROR(executor_->execute(msg.words(), nullptr));
    end_step();
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [id, k] : encoding) {
      Active& a = *active_.at(id);
      ++a.phase1_steps;
      if (scheduler_.encoded(id)) a.phase1_end = Clock::now();
    }
  }
  publish_stats();  // the KV pages phase 1 filled, live
  lap(prefill_ns_);

  // 5. One decode step over every request whose context is encoded: its query (first time) or its
  //    last sampled token.
  std::vector<RequestId> decode_ids;
  {
    std::lock_guard<std::mutex> lock(mu_);
    decode_ids = scheduler_.decode_batch();
  }
  if (decode_ids.empty()) return Status();
  // Context reuse: a context whose phase 1 just completed is kept as a cached context, forked from
  // the request's KV before its query is written.
  ControlMessage retain(ControlCommand::kRetain);
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (RequestId id : decode_ids) {
      Active& a = *active_.at(id);
      if (a.prefilled || !a.cacheable || a.from_entry >= 0 || !a.context_id.empty()) continue;
      if (const ContextCache::Entry* e = context_cache_.find(a.req.context, a.cache_key)) {
        a.context_id = e->id;  // another request's, cached meanwhile
        continue;
      }
      if (!make_room_locked(a.entry_pages)) continue;
      const SeqId entry = context_cache_.insert(a.req.context, a.layout, a.req.mode, a.entry_pages);
      a.context_id = context_cache_.get(entry)->id;
      retain.add_retain(static_cast<SeqId>(id), entry);
    }
  }
  SS_RETURN_IF_ERROR(flush_evictions());
  if (!retain.empty()) {
    SS_RETURN_IF_ERROR(broadcast_step(retain.words()));
    SS_RETURN_IF_ERROR(executor_->execute(retain.words(), nullptr));
    end_step();
  }
  ControlMessage msg(ControlCommand::kDecode);
  std::vector<Active*> decoding;
  for (RequestId id : decode_ids) {
    Active* a = active_.at(id).get();
    if (a->phase1_end == Clock::time_point{}) a->phase1_end = Clock::now();
    msg.add_decode(static_cast<SeqId>(id), a->position, a->next_tokens);
    decoding.push_back(a);
  }
  SS_RETURN_IF_ERROR(broadcast_step(msg.words()));
  // On a backend that samples on the device, only the tokens come back, unless a request of this
  // step needs its logits on the host (logprobs): then the whole step takes the host path.
  // n > 1: the query's logits are sampled by every choice, on the host.
  const bool on_device =
      ctx_.model->backend().can_sample_rows() &&
      std::all_of(decoding.begin(), decoding.end(), [](const Active* a) {
        return a->controller->can_sample_on_device() && (a->prefilled || a->req.n == 1);
      });
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
    if (!a->prefilled && a->entropy) executor_->phase2().track_entropy(static_cast<SeqId>(a->id), &*a->entropy);
  }
  std::vector<float> logits;
  lap(schedule_ns_);
  const double waited = ctx_.model->backend().wait_seconds();
  Status st = executor_->execute(msg.words(), on_device ? nullptr : &logits, rows, tokens);
  end_step();
  lap(forward_ns_);
  forward_wait_s_ = forward_wait_s_.load() + (ctx_.model->backend().wait_seconds() - waited);
  ++decode_steps_;
  decoded_sequences_ += static_cast<int64_t>(decoding.size());
  if (!st.ok()) {
    // A forward failure is a bug or a broken rank: fail the requests of this step, keep serving.
    for (Active* a : decoding) finish(*a, FinishReason::kError, st);
    return Status();
  }
  const int n_vocab = ctx_.model->hparams().n_vocab;
  ControlMessage fork(ControlCommand::kFork);
  for (size_t r = 0; r < decoding.size(); ++r) {
    Active& a = *decoding[r];
    std::vector<float> query_logits;  // n > 1: the others sample their first token from these too
    if (!a.prefilled && a.req.n > 1) query_logits.assign(logits.begin() + r * n_vocab, logits.begin() + (r + 1) * n_vocab);
    if (!a.prefilled && a.req.prompt_logprobs) {
      for (ScoredToken& t : executor_->take_prompt_scores(static_cast<SeqId>(a.id))) {
        a.prompt_logprobs.push_back(TokenLogprobs{t.target, t.logprob, {}});
        for (const TopToken& top : t.top) a.prompt_logprobs.back().top.push_back({top.token, top.logprob});
      }
    }
    a.prefilled = true;
    a.position += static_cast<int64_t>(a.next_tokens.size());
    const int32_t token =
        on_device ? tokens[r] : a.controller->choose(std::span<float>(logits.data() + r * n_vocab, n_vocab));
    if (a.first_token == Clock::time_point{}) a.first_token = Clock::now();
    ++a.n_generated;
    const FinishReason fr = a.controller->accept(token);
    a.next_tokens.assign(1, token);
    if (!query_logits.empty()) spawn_choices(a, query_logits, &fork);
    if (fr != FinishReason::kUnspecified) finish(a, fr);
  }
  if (!fork.empty()) {
    SS_RETURN_IF_ERROR(broadcast_step(fork.words()));
    SS_RETURN_IF_ERROR(executor_->execute(fork.words(), nullptr));
    end_step();
  }
  publish_stats();
  lap(tokens_ns_);
  return Status();
}

void ServingEngine::spawn_choices(Active& first, std::span<const float> logits, ControlMessage* fork) {
  first.spawned = true;
  for (int c = 1; c < first.req.n; ++c) {
    auto s = std::make_unique<Active>();
    {
      std::lock_guard<std::mutex> lock(mu_);
      s->id = next_id_++;
      scheduler_.split(first.id, s->id, first.fork_demand);
    }
    s->req = first.req;
    if (s->req.sampling.seed) s->req.sampling.seed = *s->req.sampling.seed + static_cast<uint64_t>(c);
    s->choice = c;
    s->group = first.group;
    s->spawned = true;
    s->sink = first.sink;
    s->admitted = true;
    s->prefilled = true;
    s->position = first.position;
    s->layers_per_chunk = first.layers_per_chunk;
    s->context_id = first.context_id;
    s->cached_context_tokens = first.cached_context_tokens;
    s->submitted = first.submitted;
    s->phase1_start = first.phase1_start;
    s->phase1_end = first.phase1_end;
    s->phase1_steps = first.phase1_steps;
    make_controller(*s);
    fork->add_fork(static_cast<SeqId>(first.id), static_cast<SeqId>(s->id));
    std::vector<float> row(logits.begin(), logits.end());
    const int32_t token = s->controller->choose(std::span<float>(row));
    s->first_token = Clock::now();
    s->n_generated = 1;
    s->next_tokens.assign(1, token);
    const FinishReason fr = s->controller->accept(token);
    const RequestId id = s->id;
    active_[id] = std::move(s);
    if (fr != FinishReason::kUnspecified) finish(*active_.at(id), fr);
  }
}

void ServingEngine::publish_stats() {
  std::lock_guard<std::mutex> lock(stats_mu_);
  if (!executor_->pages_used().empty()) pages_used_snapshot_ = executor_->pages_used();
  merge_seconds_snapshot_ = executor_->phase2().merge_seconds();
  merges_snapshot_ = executor_->phase2().merges();
  phase1_steps_snapshot_ = executor_->phase1_steps();
}

Status ServingEngine::run() {
  // Every rank has loaded the model once all are here (run_worker starts with the same barrier).
  SS_RETURN_IF_ERROR(ctx_.comm->barrier_idle());
  ready_ = true;
  while (true) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait_for(lock, std::chrono::milliseconds(50), [&] {
        return stopping_ || failed_ || draining_ || !waiting_.empty() || !cancel_requests_.empty() ||
               !active_.empty();
      });
    }
    if (stopping_ || failed_) break;
    if (draining_) {
      std::lock_guard<std::mutex> lock(mu_);
      if (waiting_.empty() && active_.empty() && cancel_requests_.empty()) break;
      // Past the grace: cancel what is left (queued ones are dropped, running ones end with their
      // output so far); the next steps finish and release them.
      if (!drain_cancelled_ && Clock::now() >= drain_deadline_) {
        drain_cancelled_ = true;
        for (const auto& [id, a] : waiting_) cancel_requests_.push_back(id);
        for (const auto& [id, a] : active_) cancel_requests_.push_back(id);
      }
    }
    Status st = step();
    if (!st.ok()) return st;
  }
  // Fail what is left, then tell the workers.
  std::vector<std::unique_ptr<Active>> left;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [id, a] : waiting_) {
      scheduler_.drop_waiting(id);
      left.push_back(std::move(a));
    }
    waiting_.clear();
    queue_depth_ = 0;
  }
  for (auto& a : left) finish(*a, FinishReason::kError, unavailable("the server is shutting down"));
  for (auto& [id, a] : active_) finish(*a, FinishReason::kError, unavailable("the server is shutting down"));
  SS_RETURN_IF_ERROR(release_finished());
  {
    // The cached contexts go too: every rank's pool ends as it began.
    std::lock_guard<std::mutex> lock(mu_);
    while (const std::optional<SeqId> e = context_cache_.lru_idle()) evict_locked(*e);
  }
  SS_RETURN_IF_ERROR(flush_evictions());
  std::vector<int64_t> stop_msg = ControlMessage(ControlCommand::kStop).words();
  stop_msg.resize(1);
  return broadcast_control(*ctx_.comm, stop_msg);
}

Status run_worker(const EngineContext& ctx) {
  StepExecutor executor(*ctx.model, *ctx.cache, *ctx.comm);
  const std::optional<int64_t> fail_at = injected_failure_step(ctx.comm->rank());
  if (fail_at) log_warn("STARSERVE_FAIL_STEP is set: this rank fails its step {} (fault injection for tests)", *fail_at);
  SS_RETURN_IF_ERROR(ctx.comm->barrier_idle());  // matches ServingEngine::run's: this rank has loaded
  std::vector<int64_t> msg;
  int64_t step = 0;
  while (true) {
    SS_RETURN_IF_ERROR(broadcast_control(*ctx.comm, msg));
    if (msg.empty()) return internal_error("empty control message from rank 0");
    if (static_cast<ControlCommand>(msg[0]) == ControlCommand::kStop) return Status();
    ++step;
    if (ctx.heartbeat) ctx.heartbeat->set_progress(progress_received(step));
    Status st = fail_at && step == *fail_at
                    ? internal_error("fault injected by STARSERVE_FAIL_STEP at step {}", step)
                    : executor.execute(msg, nullptr);
    if (!st.ok()) {
      // A worker that cannot execute a step cannot stay in step, and the others may wait for it inside a collective
      // of that step. Rank 0's watchdog learns it from the heartbeat, fails the requests naming this rank and ends
      // the job; where no watchdog runs (no heartbeat, or rank 0 does not end it in time) this rank ends it.
      log_error("step {} failed on this rank, ending the job: {}", step, st.to_string());
      if (ctx.heartbeat) {
        ctx.heartbeat->set_progress(progress_failed(step));
        std::this_thread::sleep_for(kFailureReportWait);
      }
      ctx.comm->abort_job(kStepFailedExitCode);
      return st;
    }
    if (ctx.heartbeat) ctx.heartbeat->set_progress(progress_completed(step));
  }
}

}  // namespace starserve
