// Prometheus metrics: a small thread-safe registry rendered in the text exposition format (0.0.4), and a minimal
// HTTP/1.1 endpoint that serves it on ServerConfig.metrics_port (GET /metrics). No client library: the format is a
// few lines per series and the endpoint answers one request per connection.
//
// Thread-safety: every method may be called from any thread. Counters and histograms are updated by the RPC
// threads; gauges are read from callbacks at scrape time (the engine's counters are the source of truth, so they
// are sampled rather than mirrored).
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
  // The returned reference lives as long as the registry. Asking again with the same name and labels returns the
  // same series; a name registered with another type is a broken invariant.
  Counter& counter(const std::string& name, const std::string& help, const MetricLabels& labels = {});
  Histogram& histogram(const std::string& name, const std::string& help, const std::vector<double>& bounds,
                       const MetricLabels& labels = {});
  // A gauge whose value is read at scrape time: render() calls fn on the scraping thread, without the registry
  // lock held, so fn must be thread-safe and may be slow-ish (engine.info()).
  void gauge(const std::string& name, const std::string& help, const MetricLabels& labels, std::function<double()> fn);

  // Text exposition format, families in name order.
  std::string render() const;

 private:
  enum class Type { kCounter, kGauge, kHistogram };
  struct Family {
    Type type;
    std::string help;
    // Keyed by the rendered label set ({a="x",b="y"}), so series render in a stable order.
    std::map<std::string, std::unique_ptr<Counter>> counters;
    std::map<std::string, std::unique_ptr<Histogram>> histograms;
    std::map<std::string, std::function<double()>> gauges;
  };
  Family& family(const std::string& name, const std::string& help, Type type);  // mu_ held

  mutable std::mutex mu_;
  std::map<std::string, Family> families_;
};

// The metrics the server exports, on top of a registry.
class ServerMetrics {
 public:
  ServerMetrics();

  MetricsRegistry& registry() { return registry_; }

  // One finished RPC: rpc is the method name ("Complete"), status the gRPC code name ("OK", "INVALID_ARGUMENT").
  void record_request(std::string_view rpc, std::string_view status);
  void observe_time_to_first_token(double seconds) { ttft_->observe(seconds); }
  void observe_inter_token_latency(double seconds) { itl_->observe(seconds); }
  void observe_phase1(double seconds) { phase1_->observe(seconds); }
  void observe_request_duration(double seconds) { duration_->observe(seconds); }
  void add_generated_tokens(int64_t n) { generated_->inc(static_cast<double>(n)); }
  void add_prompt_tokens(int64_t n) { prompt_->inc(static_cast<double>(n)); }

 private:
  MetricsRegistry registry_;
  Histogram* ttft_;
  Histogram* itl_;
  Histogram* phase1_;
  Histogram* duration_;
  Counter* generated_;
  Counter* prompt_;
};

// GET /metrics on a plain TCP socket. One thread accepts and answers connections one at a time (a scrape every few
// seconds is the whole load); each connection gets a 5 s budget so a stuck client cannot block the next scrape.
class MetricsHttpServer {
 public:
  using RenderFn = std::function<std::string()>;
  MetricsHttpServer() = default;
  ~MetricsHttpServer();
  MetricsHttpServer(const MetricsHttpServer&) = delete;
  MetricsHttpServer& operator=(const MetricsHttpServer&) = delete;

  // Binds host:port (port 0 = any free port) and starts the serving thread. kUnavailable when the address cannot
  // be bound, naming it and the OS error.
  Status start(const std::string& host, int port, RenderFn render);
  int port() const { return port_; }
  void stop();

 private:
  void serve();
  void answer(int fd);

  RenderFn render_;
  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace starserve
