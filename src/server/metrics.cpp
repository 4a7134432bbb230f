#include "server/metrics.h"

#include <sys/socket.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <set>

#include <fmt/format.h>
#include <httplib.h>

#include "common/check.h"
#include "common/log.h"

namespace starserve {
namespace {

// Label values escape backslash, double quote and newline; HELP text backslash and newline (exposition format 0.0.4).
std::string escape(std::string_view v, bool quote) {
  std::string out;
  out.reserve(v.size());
  for (char c : v) {
    if (c == '\\') out += "\\\\";
    else if (c == '"' && quote) out += "\\\"";
    else if (c == '\n') out += "\\n";
    else out += c;
  }
  return out;
}

// {a="x",b="y"}, or "" without labels.
std::string render_labels(const MetricLabels& labels) {
  if (labels.empty()) return "";
  std::string out = "{";
  for (size_t i = 0; i < labels.size(); ++i) {
    if (i > 0) out += ',';
    out += fmt::format("{}=\"{}\"", labels[i].first, escape(labels[i].second, true));
  }
  out += '}';
  return out;
}

// Go's ParseFloat reads all of these; fmt's shortest round-trip form keeps integers integral ("12", "0.005").
std::string format_value(double v) {
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  if (std::isnan(v)) return "NaN";
  return fmt::format("{}", v);
}

// "{a="x"}" -> "a="x"" so a histogram's le label can be appended inside the braces.
std::string inner_labels(const std::string& rendered) {
  return rendered.empty() ? std::string() : rendered.substr(1, rendered.size() - 2);
}

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

// [a-zA-Z_][a-zA-Z0-9_]*: the metric name rule without colons (those are for recording rules) and the label name
// rule.
bool valid_name(std::string_view s) {
  if (s.empty()) return false;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
    if (!alpha && !(i > 0 && c >= '0' && c <= '9')) return false;
  }
  return true;
}

}  // namespace

Histogram::Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {
  SS_CHECK(std::is_sorted(bounds_.begin(), bounds_.end()), "histogram bounds must increase");
}

void Histogram::observe(double v) {
  // Bucket i holds observations in (bounds[i-1], bounds[i]]; the last one is (bounds.back(), +Inf).
  const size_t i = static_cast<size_t>(std::lower_bound(bounds_.begin(), bounds_.end(), v) - bounds_.begin());
  std::lock_guard<std::mutex> lock(mu_);
  counts_[i] += 1;
  sum_ += v;
  count_ += 1;
}

Histogram::Snapshot Histogram::snapshot() const {
  Snapshot s;
  s.bounds = bounds_;
  std::lock_guard<std::mutex> lock(mu_);
  s.cumulative.resize(counts_.size());
  uint64_t acc = 0;
  for (size_t i = 0; i < counts_.size(); ++i) {
    acc += counts_[i];
    s.cumulative[i] = acc;
  }
  s.sum = sum_;
  s.count = count_;
  return s;
}

MetricsRegistry::Family& MetricsRegistry::family(const std::string& name, const std::string& help, Type type,
                                                 const MetricLabels& labels) {
  SS_CHECK(valid_name(name), "metric name '{}' must match [a-zA-Z_][a-zA-Z0-9_]*", name);
  SS_CHECK(!help.empty(), "metric {} needs a HELP text", name);
  // Prometheus' naming rules: a counter's samples end in _total, and nothing else's do (a gauge named *_total reads
  // as a counter to every query and dashboard). A histogram's own series end in _bucket, _sum and _count.
  if (type == Type::kCounter) {
    SS_CHECK(ends_with(name, "_total") && name.size() > 6, "counter {} must end in _total", name);
  } else {
    SS_CHECK(!ends_with(name, "_total"), "{} {} must not end in _total (only counters do)",
             type == Type::kGauge ? "gauge" : "histogram", name);
  }
  if (type == Type::kHistogram) {
    SS_CHECK(!ends_with(name, "_bucket") && !ends_with(name, "_sum") && !ends_with(name, "_count"),
             "histogram {} must not end in _bucket, _sum or _count (its series add those)", name);
  }
  std::set<std::string_view> seen;
  for (const auto& [k, v] : labels) {
    SS_CHECK(valid_name(k) && k.rfind("__", 0) != 0, "label name '{}' of {} must match [a-zA-Z_][a-zA-Z0-9_]* "
             "and not start with __", k, name);
    SS_CHECK(type != Type::kHistogram || k != "le", "histogram {} must not have an le label (its buckets do)", name);
    SS_CHECK(seen.insert(k).second, "label {} given twice for {}", k, name);
  }
  auto [it, inserted] = families_.try_emplace(name);
  if (inserted) {
    it->second.type = type;
    it->second.help = help;
  }
  SS_CHECK(it->second.type == type, "metric {} registered twice with different types", name);
  return it->second;
}

Counter& MetricsRegistry::counter(const std::string& name, const std::string& help, const MetricLabels& labels) {
  std::lock_guard<std::mutex> lock(mu_);
  Family& f = family(name, help, Type::kCounter, labels);
  const std::string key = render_labels(labels);
  SS_CHECK(!f.sampled.count(key), "counter {}{} is already a sampled counter", name, key);
  auto& slot = f.counters[key];
  if (!slot) slot = std::make_unique<Counter>();
  return *slot;
}

Histogram& MetricsRegistry::histogram(const std::string& name, const std::string& help,
                                      const std::vector<double>& bounds, const MetricLabels& labels) {
  std::lock_guard<std::mutex> lock(mu_);
  Family& f = family(name, help, Type::kHistogram, labels);
  auto& slot = f.histograms[render_labels(labels)];
  if (!slot) slot = std::make_unique<Histogram>(bounds);
  return *slot;
}

void MetricsRegistry::gauge(const std::string& name, const std::string& help, const MetricLabels& labels,
                            ValueFn fn) {
  std::lock_guard<std::mutex> lock(mu_);
  Family& f = family(name, help, Type::kGauge, labels);
  f.sampled[render_labels(labels)] = std::move(fn);
}

void MetricsRegistry::sampled_counter(const std::string& name, const std::string& help, const MetricLabels& labels,
                                      ValueFn fn) {
  std::lock_guard<std::mutex> lock(mu_);
  Family& f = family(name, help, Type::kCounter, labels);
  const std::string key = render_labels(labels);
  SS_CHECK(!f.counters.count(key), "counter {}{} already has a value of its own", name, key);
  f.sampled[key] = std::move(fn);
}

std::string MetricsRegistry::render() const {
  // Callbacks may be slow (they ask the engine), so they run after the lock is released; counters and histograms
  // are never removed, so their pointers stay valid.
  struct Lines {
    std::string name, help, type;
    std::map<std::string, const Counter*> counters;
    std::map<std::string, ValueFn> sampled;
    std::vector<std::pair<std::string, const Histogram*>> histograms;
  };
  std::vector<Lines> families;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [name, f] : families_) {
      Lines l;
      l.name = name;
      l.help = f.help;
      l.type = f.type == Type::kCounter ? "counter" : f.type == Type::kGauge ? "gauge" : "histogram";
      for (const auto& [labels, c] : f.counters) l.counters.emplace(labels, c.get());
      l.sampled = f.sampled;
      for (const auto& [labels, h] : f.histograms) l.histograms.emplace_back(labels, h.get());
      families.push_back(std::move(l));
    }
  }
  std::string out;
  for (const Lines& l : families) {
    out += fmt::format("# HELP {} {}\n# TYPE {} {}\n", l.name, escape(l.help, false), l.name, l.type);
    // A family's plain series in label order, whichever kind holds their value (keys never collide: checked when
    // they are registered).
    std::map<std::string, double> values;
    for (const auto& [labels, c] : l.counters) values[labels] = c->value();
    for (const auto& [labels, fn] : l.sampled) values[labels] = fn();
    for (const auto& [labels, v] : values) out += fmt::format("{}{} {}\n", l.name, labels, format_value(v));
    for (const auto& [labels, h] : l.histograms) {
      const Histogram::Snapshot s = h->snapshot();
      const std::string inner = inner_labels(labels);
      const std::string sep = inner.empty() ? "" : ",";
      for (size_t i = 0; i < s.cumulative.size(); ++i) {
        const std::string le = i < s.bounds.size() ? format_value(s.bounds[i]) : "+Inf";
        out += fmt::format("{}_bucket{{{}{}le=\"{}\"}} {}\n", l.name, inner, sep, le, s.cumulative[i]);
      }
      out += fmt::format("{}_sum{} {}\n", l.name, labels, format_value(s.sum));
      out += fmt::format("{}_count{} {}\n", l.name, labels, s.count);
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------------

namespace {
// Seconds. Time to first token spans a short chat prompt (tens of ms) up to a long context's phase 1 (minutes on
// CPU); inter-token latency spans one decode step on a GPU (~ms) to a CPU step of a large model.
const std::vector<double> kLatencyBuckets = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                                             2.5,   5,    10,    30,   60,  120,  300};
const std::vector<double> kTokenBuckets = {0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08,
                                           0.15,  0.3,    0.6,   1.2,  2.5,  5};
}  // namespace

ServerMetrics::ServerMetrics() {
  ttft_ = &registry_.histogram("starserve_time_to_first_token_seconds",
                               "Time from the RPC's arrival to its first generated token.", kLatencyBuckets);
  itl_ = &registry_.histogram("starserve_inter_token_latency_seconds",
                              "Time between consecutive generated tokens of a request.", kTokenBuckets);
  phase1_ = &registry_.histogram("starserve_phase1_seconds",
                                 "Context encoding (Star Attention phase 1) per request, slowest rank.",
                                 kLatencyBuckets);
  duration_ = &registry_.histogram("starserve_request_duration_seconds",
                                   "Time from the RPC's arrival to the end of generation.", kLatencyBuckets);
  generated_ = &registry_.counter("starserve_generated_tokens_total", "Tokens generated.");
  prompt_ = &registry_.counter("starserve_prompt_tokens_total", "Prompt tokens (context + query) admitted.");
}

// The attention families appear with the first request that asks for entropy (a server whose clients never do shows
// none of them); the registry returns the same series on every call.
void ServerMetrics::observe_attention_health(const AttentionHealth& health) {
  registry_
      .counter("starserve_attention_health_requests_total",
               "Requests whose attention entropy was computed (they asked for it).")
      .inc();
  registry_
      .counter("starserve_attention_judged_heads_total",
               "Attention (layer, head) pairs judged for overload and collapse, all requests.")
      .inc(health.n_judged);
  registry_
      .counter("starserve_attention_overloaded_heads_total",
               "Attention heads in entropic overload (mean entropy > ratio x uniform maximum), all requests.")
      .inc(static_cast<double>(health.overloaded.size()));
  registry_
      .counter("starserve_attention_collapsed_heads_total",
               "Attention heads collapsed (mean entropy < collapse nats), all requests.")
      .inc(static_cast<double>(health.collapsed.size()));
  for (size_t l = 0; l < health.layer_ratio.size(); ++l) {
    if (!health.layer_ratio[l]) continue;
    registry_
        .histogram("starserve_attention_entropy_ratio",
                   "Per-layer mean attention entropy of a request over its uniform maximum (mean ln of visible keys).",
                   kEntropyRatioBuckets, {{"layer", std::to_string(l)}})
        .observe(*health.layer_ratio[l]);
  }
  if (health.rank_ratio) {
    registry_
        .histogram("starserve_attention_rank_entropy_ratio",
                   "A request's mean rank entropy over ln(ranks): how evenly its attention mass divides among the "
                   "ranks' shards in phase 2 (requests on several ranks that asked for entropy).",
                   kEntropyRatioBuckets)
        .observe(*health.rank_ratio);
  }
}

void ServerMetrics::register_engine(const Engine& engine) {
  MetricsRegistry& r = registry_;
  const Engine* e = &engine;
  r.gauge("starserve_queue_depth", "Requests waiting for admission.", {},
          [e] { return static_cast<double>(e->info().queue_depth); });
  r.gauge("starserve_requests_running", "Requests admitted and being processed.", {},
          [e] { return static_cast<double>(e->info().running); });
  const int world = std::max(1, e->info().world_size);
  for (int rank = 0; rank < world; ++rank) {
    const MetricLabels rank_label = {{"rank", std::to_string(rank)}};
    r.gauge("starserve_kv_pages_used", "KV cache pages holding KV, per rank (as of the last step).", rank_label,
            [e, rank] {
              const EngineInfo info = e->info();
              return rank < static_cast<int>(info.kv_pages_used.size())
                         ? static_cast<double>(info.kv_pages_used[rank]) : 0.0;
            });
    // Every rank has a pool of the same size (the scheduler's mirrored budget), so each reports the engine's one
    // number.
    r.gauge("starserve_kv_pages_capacity", "KV cache pages in the pool, per rank.", rank_label,
            [e] { return static_cast<double>(e->info().kv_pages_total); });
  }
  r.gauge("starserve_kv_pages_reserved", "KV pages reserved by admitted requests (largest rank share).", {}, [e] {
    const EngineInfo info = e->info();
    return static_cast<double>(info.kv_pages_total - info.kv_pages_free - info.context_cache_pages);
  });
  for (const char* part : {"schedule", "prefill", "forward", "forward_wait", "tokens"}) {
    r.sampled_counter("starserve_engine_seconds_total",
                      "Rank 0's engine thread, time in each part of its steps (schedule, prefill, forward, tokens; "
                      "forward_wait: the part of forward spent blocked on the device).",
                      {{"part", part}}, [e, p = std::string(part)] {
                        const EngineInfo i = e->info();
                        return p == "schedule"       ? i.engine_schedule_s
                               : p == "prefill"      ? i.engine_prefill_s
                               : p == "forward"      ? i.engine_forward_s
                               : p == "forward_wait" ? i.engine_forward_wait_s
                                                     : i.engine_tokens_s;
                      });
  }
  r.sampled_counter("starserve_decode_steps_total", "Decode steps run (each a forward over every decoding sequence).",
                    {}, [e] { return static_cast<double>(e->info().decode_steps); });
  r.sampled_counter("starserve_decoded_sequences_total", "Sequences decoded, summed over the decode steps.", {},
                    [e] { return static_cast<double>(e->info().decoded_sequences); });
  r.gauge("starserve_context_cache_pages", "KV pages held by cached contexts (largest rank share).", {},
          [e] { return static_cast<double>(e->info().context_cache_pages); });
  r.gauge("starserve_context_cache_entries", "Contexts whose KV is cached for later requests.", {},
          [e] { return static_cast<double>(e->info().context_cache_entries); });
  r.sampled_counter("starserve_context_cache_hits_total", "Requests whose context was found cached (no phase 1).", {},
                    [e] { return static_cast<double>(e->info().context_cache_hits); });
  r.sampled_counter("starserve_context_cache_misses_total", "Requests with a context that had to encode it.", {},
                    [e] { return static_cast<double>(e->info().context_cache_misses); });
  r.sampled_counter("starserve_context_cache_evictions_total",
                    "Cached contexts dropped for their pages (least recently used first).", {},
                    [e] { return static_cast<double>(e->info().context_cache_evictions); });
  r.sampled_counter("starserve_merge_seconds_total",
                    "Time in the cross-rank attention merge (rank 0, collectives included).", {},
                    [e] { return e->info().merge_seconds_total; });
  r.sampled_counter("starserve_merges_total", "Cross-rank attention merges (one per layer per decode step).", {},
                    [e] { return static_cast<double>(e->info().merges_total); });
  r.gauge("starserve_ready", "1 once every rank has loaded the model.", {}, [e] { return e->ready() ? 1.0 : 0.0; });
}

void ServerMetrics::record_request(std::string_view rpc, std::string_view status) {
  registry_
      .counter("starserve_requests_total", "RPCs served, by method and final gRPC status.",
               {{"rpc", std::string(rpc)}, {"status", std::string(status)}})
      .inc();
}

// ---------------------------------------------------------------------------------------------------------------

namespace {
// Workers of the endpoint. An open connection holds one (httplib serves a connection on one thread for its
// lifetime), so this many clients may sit idle before a scrape waits for their timeout. Scrapers are a few
// Prometheus replicas and the odd curl; a worker is a parked thread.
constexpr size_t kWorkerThreads = 8;
// Seconds a connection may send nothing, before its first request or between two: a scraper sends its request as
// soon as it connects, and stop() waits this long at most for a connection left open.
constexpr time_t kIdleTimeoutS = 2;
// Seconds one read or write of a started request or its response may block.
constexpr time_t kIoTimeoutS = 5;
// Requests one connection may make before the server closes it.
constexpr size_t kMaxRequestsPerConnection = 5;
// A scrape has no body.
constexpr size_t kMaxPayloadBytes = 8192;
constexpr char kContentType[] = "text/plain; version=0.0.4; charset=utf-8";
// Connections the kernel queues before the accept loop takes them.
constexpr int kListenBacklog = 128;

// httplib 0.11 listens with a backlog of 5, so a burst of more connections than that (scrapers and idle clients
// arriving together) waits for the clients' SYN retransmission (1 s, then 3 s). Listening again on the bound socket
// sets a larger one (Linux updates the backlog of a listening socket); the socket is httplib's protected member.
class HttpServer : public httplib::Server {
 public:
  void raise_backlog(int n) {
    if (::listen(svr_sock_, n) != 0) log_warn("metrics endpoint: cannot raise the listen backlog to {}", n);
  }
};
}  // namespace

MetricsHttpServer::MetricsHttpServer() = default;

MetricsHttpServer::~MetricsHttpServer() { stop(); }

Status MetricsHttpServer::start(const std::string& host, int port, RenderFn render) {
  SS_CHECK(!http_, "metrics server started twice");
  render_ = std::move(render);
  auto http = std::make_unique<HttpServer>();
  http->new_task_queue = [] { return new httplib::ThreadPool(kWorkerThreads); };
  // httplib's default sets SO_REUSEPORT, which lets a second server bind the same port and take half its
  // connections; SO_REUSEADDR alone rebinds after a restart (TIME_WAIT) but refuses a port another socket listens on.
  http->set_socket_options([](socket_t fd) {
    const int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  });
  http->set_keep_alive_timeout(kIdleTimeoutS);
  http->set_keep_alive_max_count(kMaxRequestsPerConnection);
  http->set_read_timeout(kIoTimeoutS, 0);
  http->set_write_timeout(kIoTimeoutS, 0);
  http->set_payload_max_length(kMaxPayloadBytes);
  // HEAD is answered by the GET handler, without the body.
  http->Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(render_(), kContentType);
  });
  http->set_error_handler([](const httplib::Request&, httplib::Response& res) {
    if (res.body.empty()) res.set_content("only GET /metrics\n", "text/plain");
  });

  const std::string bind_host = host.empty() ? "0.0.0.0" : host;
  if (port == 0) {
    port_ = http->bind_to_any_port(bind_host);
  } else {
    port_ = http->bind_to_port(bind_host, port) ? port : -1;
  }
  if (port_ <= 0) {
    port_ = 0;
    return unavailable("metrics endpoint: cannot listen on {}:{} (address in use, or not an address of this host)",
                       bind_host, port);
  }
  http->raise_backlog(kListenBacklog);
  http_ = std::move(http);
  // Shared with the thread, which may outlive this call's frame.
  auto returned = std::make_shared<std::atomic<bool>>(false);
  thread_ = std::thread([this, returned] {
    if (!http_->listen_after_bind()) log_warn("metrics endpoint on port {} stopped with an error", port_);
    returned->store(true);
  });
  // stop() only reaches a server whose accept loop has begun, so wait for it (it begins at once).
  while (!http_->is_running() && !returned->load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  if (!http_->is_running()) {
    thread_.join();
    http_.reset();
    port_ = 0;
    return unavailable("metrics endpoint: the server on {}:{} did not start", bind_host, port);
  }
  return Status();
}

void MetricsHttpServer::stop() {
  if (!http_) return;
  http_->stop();
  if (thread_.joinable()) thread_.join();
  http_.reset();
}

}  // namespace starserve
