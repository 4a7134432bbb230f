// Prometheus metrics: a small thread-safe registry rendered in the text exposition format (0.0.4), the metrics the
// server exports (ServerMetrics, with the engine's counters read from EngineInfo at scrape time), and the HTTP
// endpoint that serves them on ServerConfig.metrics_port (GET /metrics, through cpp-httplib with a worker pool).
//
// Naming follows Prometheus' rules, and the registry enforces them when a series is registered (a wrong name is a
// broken invariant, so it aborts): counters end in `_total`, gauges and histograms do not; names carry their base
// unit (`_seconds`, `_bytes`); every family has a HELP and a TYPE line.
//
// Thread-safety: every method may be called from any thread. Counters and histograms are updated by the RPC
// threads; gauges and sampled counters are read from callbacks at scrape time (the engine's counters are the source
// of truth, so they are sampled rather than mirrored), on the HTTP worker threads, possibly several at once.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "common/status.h"
#include "engine/engine.h"
#include "server/attention_health.h"

namespace httplib {
class Server;
}

namespace starserve {

using MetricLabels = std::vector<std::pair<std::string, std::string>>;

class Counter {
 public:
  void inc(double v = 1.0) { value_.fetch_add(v, std::memory_order_relaxed); }
  double value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

class Histogram {
 public:
  // bounds: upper bounds of the buckets, increasing; +Inf is implicit.
  explicit Histogram(std::vector<double> bounds);
  void observe(double v);

  struct Snapshot {
    std::vector<double> bounds;
    std::vector<uint64_t> cumulative;  // (bounds.size() + 1) observations <= bound, the last is +Inf
    double sum = 0.0;
    uint64_t count = 0;
  };
  Snapshot snapshot() const;

 private:
  const std::vector<double> bounds_;
  mutable std::mutex mu_;
  std::vector<uint64_t> counts_;  // (bounds_.size() + 1) per bucket, not cumulative
  double sum_ = 0.0;
  uint64_t count_ = 0;
};

class MetricsRegistry {
 public:
  using ValueFn = std::function<double()>;

  // The returned reference lives as long as the registry. Asking again with the same name and labels returns the
  // same series. Broken invariants (abort): a name registered with another type, a name or label that breaks the
  // rules above, a histogram with an `le` label.
  Counter& counter(const std::string& name, const std::string& help, const MetricLabels& labels = {});
  Histogram& histogram(const std::string& name, const std::string& help, const std::vector<double>& bounds,
                       const MetricLabels& labels = {});
  // Series whose value is read at scrape time: render() calls fn on the scraping thread, without the registry
  // lock held, so fn must be thread-safe and may be slow-ish (engine.info()). A sampled counter's fn must never
  // decrease (a running total kept elsewhere, e.g. EngineInfo::merges_total).
  void gauge(const std::string& name, const std::string& help, const MetricLabels& labels, ValueFn fn);
  void sampled_counter(const std::string& name, const std::string& help, const MetricLabels& labels, ValueFn fn);

  // Text exposition format 0.0.4, families in name order, series in label order.
  std::string render() const;

 private:
  enum class Type { kCounter, kGauge, kHistogram };
  struct Family {
    Type type;
    std::string help;
    // Keyed by the rendered label set ({a="x",b="y"}), so series render in a stable order.
    std::map<std::string, std::unique_ptr<Counter>> counters;
    std::map<std::string, std::unique_ptr<Histogram>> histograms;
    std::map<std::string, ValueFn> sampled;  // gauges, and counters read from a callback
  };
  Family& family(const std::string& name, const std::string& help, Type type, const MetricLabels& labels);  // mu_

  mutable std::mutex mu_;
  std::map<std::string, Family> families_;
};

// The metrics the server exports, on top of a registry. README.md ("Metrics") lists them.
class ServerMetrics {
 public:
  ServerMetrics();

  MetricsRegistry& registry() { return registry_; }

  // The engine's state, read from Engine::info() / ready() at every scrape: queue and running requests, KV pages
  // per rank (used, capacity) and reserved, cross-rank merges and their time, readiness. Call once, before the
  // endpoint serves; the engine must outlive the registry's scrapes.
  void register_engine(const Engine& engine);

  // One finished RPC: rpc is the method name ("Complete"), status the gRPC code name ("OK", "INVALID_ARGUMENT").
  void record_request(std::string_view rpc, std::string_view status);
  void observe_time_to_first_token(double seconds) { ttft_->observe(seconds); }
  void observe_inter_token_latency(double seconds) { itl_->observe(seconds); }
  void observe_phase1(double seconds) { phase1_->observe(seconds); }
  void observe_request_duration(double seconds) { duration_->observe(seconds); }
  void add_generated_tokens(int64_t n) { generated_->inc(static_cast<double>(n)); }
  void add_prompt_tokens(int64_t n) { prompt_->inc(static_cast<double>(n)); }
  // A request whose entropy was computed (it asked for it): each layer's mean entropy over its uniform maximum
  // into starserve_attention_entropy_ratio{layer}, and its judged, overloaded and collapsed heads into counters.
  // Series exist per layer seen, so the family holds at most n_layers x (kEntropyRatioBuckets + 3) series. These
  // families appear with the first such request.
  void observe_attention_health(const AttentionHealth& health);

 private:
  MetricsRegistry registry_;
  Histogram* ttft_;
  Histogram* itl_;
  Histogram* phase1_;
  Histogram* duration_;
  Counter* generated_;
  Counter* prompt_;
};

// The upper bounds of starserve_attention_entropy_ratio (+Inf implicit): fixed, a fraction of the uniform maximum.
inline const std::vector<double> kEntropyRatioBuckets = {0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0};

// GET /metrics (and HEAD) over HTTP/1.1, served by cpp-httplib: one thread accepts, kWorkerThreads (metrics.cpp)
// answer. A connection holds a worker while it is open, so the limits keep idle and slow clients from starving a
// scrape: a connection that sends nothing for 2 s (before its first request or between keep-alive requests) is
// closed, a started request must keep arriving (5 s per read), and a connection serves at most 5 requests. Fewer
// open connections than workers never delay a scrape; more only until the idle ones time out.
class MetricsHttpServer {
 public:
  using RenderFn = std::function<std::string()>;
  MetricsHttpServer();
  ~MetricsHttpServer();
  MetricsHttpServer(const MetricsHttpServer&) = delete;
  MetricsHttpServer& operator=(const MetricsHttpServer&) = delete;

  // Binds host:port (port 0 = any free port) and starts serving; returns once the server accepts connections.
  // render is called on the worker threads, possibly concurrently. kUnavailable when the address cannot be bound
  // (in use, or not an address of this host), naming it. A port in use is an error: the socket does not set
  // SO_REUSEPORT, so a second server cannot share the port silently.
  Status start(const std::string& host, int port, RenderFn render);
  int port() const { return port_; }
  // Stops accepting and waits for the workers: at most the idle or read timeout of a connection still open.
  void stop();

 private:
  RenderFn render_;
  std::unique_ptr<httplib::Server> http_;
  int port_ = 0;
  std::thread thread_;  // runs httplib's accept loop until stop()
};

}  // namespace starserve
