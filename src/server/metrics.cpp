#include "server/metrics.h"

#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>

#include <fmt/format.h>

#include "common/check.h"
#include "common/log.h"

namespace starserve {
namespace {

// Label values escape backslash, double quote and newline (exposition format 0.0.4).
std::string escape_label_value(std::string_view v) {
  std::string out;
  out.reserve(v.size());
  for (char c : v) {
    if (c == '\\') out += "\\\\";
    else if (c == '"') out += "\\\"";
    else if (c == '\n') out += "\\n";
    else out += c;
  }
  return out;
}

// {a="x",b="y"}, or "" without labels. `extra` is appended last (the histogram's le).
std::string render_labels(const MetricLabels& labels, std::string_view extra = {}) {
  if (labels.empty() && extra.empty()) return "";
  std::string out = "{";
  bool first = true;
  for (const auto& [k, v] : labels) {
    if (!first) out += ',';
    first = false;
    out += fmt::format("{}=\"{}\"", k, escape_label_value(v));
  }
  if (!extra.empty()) {
    if (!first) out += ',';
    out += extra;
  }
  out += '}';
  return out;
}

std::string format_value(double v) {
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  if (std::isnan(v)) return "NaN";
  return fmt::format("{}", v);
}

// "{a="x"}" -> "a="x"" so a histogram's le label can be appended inside the braces.
std::string inner_labels(const std::string& rendered) {
  return rendered.empty() ? std::string() : rendered.substr(1, rendered.size() - 2);
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

MetricsRegistry::Family& MetricsRegistry::family(const std::string& name, const std::string& help, Type type) {
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
  Family& f = family(name, help, Type::kCounter);
  auto& slot = f.counters[render_labels(labels)];
  if (!slot) slot = std::make_unique<Counter>();
  return *slot;
}

Histogram& MetricsRegistry::histogram(const std::string& name, const std::string& help,
                                      const std::vector<double>& bounds, const MetricLabels& labels) {
  std::lock_guard<std::mutex> lock(mu_);
  Family& f = family(name, help, Type::kHistogram);
  auto& slot = f.histograms[render_labels(labels)];
  if (!slot) slot = std::make_unique<Histogram>(bounds);
  return *slot;
}

void MetricsRegistry::gauge(const std::string& name, const std::string& help, const MetricLabels& labels,
                            std::function<double()> fn) {
  std::lock_guard<std::mutex> lock(mu_);
  Family& f = family(name, help, Type::kGauge);
  f.gauges[render_labels(labels)] = std::move(fn);
}

std::string MetricsRegistry::render() const {
  // Gauge callbacks may be slow (they ask the engine), so they run after the lock is released; counters and
  // histograms are never removed, so their pointers stay valid.
  struct Line {
    std::string name, help, type;
    std::vector<std::pair<std::string, const Counter*>> counters;
    std::vector<std::pair<std::string, const Histogram*>> histograms;
    std::vector<std::pair<std::string, std::function<double()>>> gauges;
  };
  std::vector<Line> lines;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [name, f] : families_) {
      Line l;
      l.name = name;
      l.help = f.help;
      l.type = f.type == Type::kCounter ? "counter" : f.type == Type::kGauge ? "gauge" : "histogram";
      for (const auto& [labels, c] : f.counters) l.counters.emplace_back(labels, c.get());
      for (const auto& [labels, h] : f.histograms) l.histograms.emplace_back(labels, h.get());
      for (const auto& [labels, g] : f.gauges) l.gauges.emplace_back(labels, g);
      lines.push_back(std::move(l));
    }
  }
  std::string out;
  for (const Line& l : lines) {
    out += fmt::format("# HELP {} {}\n# TYPE {} {}\n", l.name, l.help, l.name, l.type);
    for (const auto& [labels, c] : l.counters) out += fmt::format("{}{} {}\n", l.name, labels, format_value(c->value()));
    for (const auto& [labels, g] : l.gauges) out += fmt::format("{}{} {}\n", l.name, labels, format_value(g()));
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

void ServerMetrics::record_request(std::string_view rpc, std::string_view status) {
  registry_
      .counter("starserve_requests_total", "RPCs served, by method and final gRPC status.",
               {{"rpc", std::string(rpc)}, {"status", std::string(status)}})
      .inc();
}

// ---------------------------------------------------------------------------------------------------------------

MetricsHttpServer::~MetricsHttpServer() { stop(); }

Status MetricsHttpServer::start(const std::string& host, int port, RenderFn render) {
  SS_CHECK(listen_fd_ < 0, "metrics server started twice");
  render_ = std::move(render);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* res = nullptr;
  const std::string port_str = std::to_string(port);
  const int gai = getaddrinfo(host.empty() ? nullptr : host.c_str(), port_str.c_str(), &hints, &res);
  if (gai != 0) return unavailable("metrics endpoint: cannot resolve {}:{}: {}", host, port, gai_strerror(gai));
  std::string last_error = "no address";
  for (addrinfo* a = res; a != nullptr; a = a->ai_next) {
    const int fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) {
      last_error = std::strerror(errno);
      continue;
    }
    const int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, a->ai_addr, a->ai_addrlen) == 0 && listen(fd, 16) == 0) {
      listen_fd_ = fd;
      break;
    }
    last_error = std::strerror(errno);
    close(fd);
  }
  freeaddrinfo(res);
  if (listen_fd_ < 0) return unavailable("metrics endpoint: cannot listen on {}:{}: {}", host, port, last_error);
  sockaddr_storage bound{};
  socklen_t len = sizeof(bound);
  if (getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&bound), &len) == 0) {
    port_ = bound.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port)
                                        : ntohs(reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  }
  stop_.store(false);
  thread_ = std::thread([this] { serve(); });
  return Status();
}

void MetricsHttpServer::stop() {
  stop_.store(true);
  if (thread_.joinable()) thread_.join();
  if (listen_fd_ >= 0) {
    close(listen_fd_);
    listen_fd_ = -1;
  }
}

void MetricsHttpServer::serve() {
  while (!stop_.load()) {
    pollfd p{listen_fd_, POLLIN, 0};
    // 200 ms: how long stop() may wait for this thread.
    const int r = poll(&p, 1, 200);
    if (r <= 0 || !(p.revents & POLLIN)) continue;
    const int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    answer(fd);
    close(fd);
  }
}

void MetricsHttpServer::answer(int fd) {
  timeval tv{5, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  // The request head only; a scrape has no body. 8 KiB bounds what a client can make us buffer.
  std::string head;
  char buf[1024];
  while (head.find("\r\n\r\n") == std::string::npos && head.find("\n\n") == std::string::npos &&
         head.size() < 8192) {
    const ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n <= 0) break;
    head.append(buf, static_cast<size_t>(n));
  }
  const size_t eol = head.find_first_of("\r\n");
  const std::string request_line = head.substr(0, eol);
  // "GET /metrics HTTP/1.1"; a query string is allowed and ignored.
  const size_t sp1 = request_line.find(' ');
  const size_t sp2 = sp1 == std::string::npos ? std::string::npos : request_line.find(' ', sp1 + 1);
  const std::string method = request_line.substr(0, sp1);
  std::string target = sp1 == std::string::npos ? "" : request_line.substr(sp1 + 1, sp2 - sp1 - 1);
  target = target.substr(0, target.find('?'));

  std::string status = "200 OK";
  std::string content_type = "text/plain; version=0.0.4; charset=utf-8";
  std::string body;
  if (method != "GET" && method != "HEAD") {
    status = "405 Method Not Allowed";
    content_type = "text/plain";
    body = "only GET /metrics\n";
  } else if (target != "/metrics") {
    status = "404 Not Found";
    content_type = "text/plain";
    body = "only GET /metrics\n";
  } else {
    body = render_();
  }
  std::string response = fmt::format(
      "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", status,
      content_type, body.size());
  if (method != "HEAD") response += body;
  size_t sent = 0;
  while (sent < response.size()) {
    const ssize_t n = send(fd, response.data() + sent, response.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) break;
    sent += static_cast<size_t>(n);
  }
}

}  // namespace starserve
