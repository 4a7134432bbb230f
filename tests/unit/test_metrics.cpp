// The Prometheus endpoint (src/server/metrics.h): what it serves parses as the text exposition format 0.0.4 and
// follows the naming rules (counters end in _total and are typed counter, nothing else ends in _total, every family
// has HELP and TYPE), the engine's state reaches it under the documented names, and idle or concurrent connections
// do not block a scrape. The HTTP client here is plain POSIX sockets with a receive timeout of several seconds: a
// hang guard that turns a blocked scrape into a failure, not a performance assertion.
//
// The endpoint lives in starserve_server, which unit_tests links only in builds with gRPC; the generated protobuf
// header comes with it, so its presence says the server library is there. Otherwise the one test here says SKIPPED.
#include <gtest/gtest.h>

#if __has_include("starserve/v1/completion.pb.h")

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "common/check.h"
#include "server/metrics.h"

namespace starserve {
namespace {

// ---------------------------------------------------------------------------------------------------------------
// A strict reader of the text exposition format 0.0.4
// (https://prometheus.io/docs/instrumenting/exposition_formats/#text-based-format), plus the naming rules.

struct Sample {
  std::string name;
  std::map<std::string, std::string> labels;
  double value = 0;
};

struct Family {
  std::string type, help;
  bool has_help = false;
  std::vector<Sample> samples;
};

struct Exposition {
  std::map<std::string, Family> families;
  std::vector<std::string> errors;  // empty when the text is valid

  // The value of one series, or nullopt.
  std::optional<double> value(const std::string& name, const std::map<std::string, std::string>& labels = {}) const {
    for (const auto& [_, f] : families) {
      for (const Sample& s : f.samples) {
        if (s.name == name && s.labels == labels) return s.value;
      }
    }
    return std::nullopt;
  }
};

bool is_name(const std::string& s, bool allow_colon) {
  if (s.empty()) return false;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || (allow_colon && c == ':') ||
                    (i > 0 && c >= '0' && c <= '9');
    if (!ok) return false;
  }
  return true;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Go's strconv.ParseFloat forms that Prometheus writes: decimal or exponent notation, +Inf, -Inf, NaN.
std::optional<double> parse_value(const std::string& s) {
  if (s == "+Inf" || s == "Inf") return INFINITY;
  if (s == "-Inf") return -INFINITY;
  if (s == "NaN") return NAN;
  if (s.empty() || s.find_first_not_of("0123456789+-.eE") != std::string::npos) return std::nullopt;
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (end != s.c_str() + s.size()) return std::nullopt;
  return v;
}

// The family a sample name belongs to: itself, or a histogram's name without _bucket / _sum / _count.
std::string family_of(const std::string& sample, const std::map<std::string, Family>& families) {
  for (const char* suffix : {"_bucket", "_sum", "_count"}) {
    if (!ends_with(sample, suffix)) continue;
    const std::string base = sample.substr(0, sample.size() - std::string(suffix).size());
    auto it = families.find(base);
    if (it != families.end() && it->second.type == "histogram") return base;
  }
  return sample;
}

Exposition parse_exposition(const std::string& text) {
  Exposition ex;
  auto error = [&](size_t line_no, const std::string& what, const std::string& line) {
    ex.errors.push_back("line " + std::to_string(line_no) + ": " + what + ": '" + line + "'");
  };
  if (text.empty() || text.back() != '\n') ex.errors.push_back("the text must end with a newline");
  std::set<std::string> closed;  // families whose group of lines has ended
  std::string current;           // the family of the previous line
  std::set<std::string> series;  // name + rendered labels, for duplicates
  size_t line_no = 0;
  size_t pos = 0;
  while (pos < text.size()) {
    const size_t eol = text.find('\n', pos);
    const std::string line = text.substr(pos, eol == std::string::npos ? std::string::npos : eol - pos);
    pos = eol == std::string::npos ? text.size() : eol + 1;
    ++line_no;
    if (line.empty()) continue;
    auto enter = [&](const std::string& fam) {
      // All lines of one family form one group.
      if (fam != current) {
        if (closed.count(fam)) error(line_no, "family " + fam + " continues after another family", line);
        if (!current.empty()) closed.insert(current);
        current = fam;
      }
    };
    if (line[0] == '#') {
      // "# HELP name text" / "# TYPE name type"; any other comment is ignored.
      const bool help = line.rfind("# HELP ", 0) == 0, type = line.rfind("# TYPE ", 0) == 0;
      if (!help && !type) continue;
      const std::string rest = line.substr(7);
      const size_t sp = rest.find(' ');
      const std::string name = rest.substr(0, sp);
      const std::string arg = sp == std::string::npos ? "" : rest.substr(sp + 1);
      if (!is_name(name, true)) {
        error(line_no, "bad metric name", line);
        continue;
      }
      enter(name);
      Family& f = ex.families[name];
      if (help) {
        if (f.has_help) error(line_no, "second HELP", line);
        f.has_help = true;
        // Escapes in HELP: \\ and \n only.
        for (size_t i = 0; i < arg.size(); ++i) {
          if (arg[i] != '\\') {
            f.help += arg[i];
          } else if (i + 1 < arg.size() && (arg[i + 1] == '\\' || arg[i + 1] == 'n')) {
            f.help += arg[++i] == 'n' ? '\n' : '\\';
          } else {
            error(line_no, "bad escape in HELP", line);
          }
        }
      } else {
        static const std::set<std::string> kTypes = {"counter", "gauge", "histogram", "summary", "untyped"};
        if (!f.type.empty()) error(line_no, "second TYPE", line);
        if (!kTypes.count(arg)) error(line_no, "unknown type", line);
        if (!f.samples.empty()) error(line_no, "TYPE after the family's samples", line);
        f.type = arg;
      }
      continue;
    }
    // name [{label="value",...}] value [timestamp]
    Sample s;
    size_t i = 0;
    while (i < line.size() && line[i] != '{' && line[i] != ' ') ++i;
    s.name = line.substr(0, i);
    if (!is_name(s.name, true)) {
      error(line_no, "bad sample name", line);
      continue;
    }
    std::string rendered;
    bool ok = true;
    if (i < line.size() && line[i] == '{') {
      ++i;
      while (ok && i < line.size() && line[i] != '}') {
        const size_t eq = line.find('=', i);
        if (eq == std::string::npos) {
          ok = false;
          break;
        }
        const std::string key = line.substr(i, eq - i);
        if (!is_name(key, false) || eq + 1 >= line.size() || line[eq + 1] != '"') {
          ok = false;
          break;
        }
        std::string val;
        size_t j = eq + 2;
        for (; j < line.size() && line[j] != '"'; ++j) {
          if (line[j] == '\\') {
            if (j + 1 >= line.size()) {
              ok = false;
              break;
            }
            const char e = line[++j];
            if (e == '\\') val += '\\';
            else if (e == '"') val += '"';
            else if (e == 'n') val += '\n';
            else ok = false;
          } else {
            val += line[j];
          }
        }
        if (!ok || j >= line.size()) {
          ok = false;
          break;
        }
        if (!s.labels.emplace(key, val).second) error(line_no, "label " + key + " twice", line);
        i = j + 1;
        if (i < line.size() && line[i] == ',') ++i;
      }
      if (!ok || i >= line.size()) {
        error(line_no, "bad label set", line);
        continue;
      }
      rendered = line.substr(s.name.size(), i + 1 - s.name.size());
      ++i;  // '}'
    }
    if (i >= line.size() || line[i] != ' ') {
      error(line_no, "no value", line);
      continue;
    }
    const std::string tail = line.substr(i + 1);
    const std::string value_text = tail.substr(0, tail.find(' '));
    const std::optional<double> v = parse_value(value_text);
    if (!v) {
      error(line_no, "bad value", line);
      continue;
    }
    s.value = *v;
    const std::string fam = family_of(s.name, ex.families);
    enter(fam);
    auto it = ex.families.find(fam);
    if (it == ex.families.end() || it->second.type.empty()) {
      error(line_no, "sample without a TYPE line for " + fam, line);
      it = ex.families.emplace(fam, Family{}).first;
    }
    if (!series.insert(s.name + rendered).second) error(line_no, "duplicate series", line);
    if (it->second.type == "histogram" && ends_with(s.name, "_bucket") && !s.labels.count("le")) {
      error(line_no, "bucket without le", line);
    }
    it->second.samples.push_back(std::move(s));
  }

  for (const auto& [name, f] : ex.families) {
    if (!f.has_help) ex.errors.push_back(name + ": no HELP line");
    if (f.type.empty()) ex.errors.push_back(name + ": no TYPE line");
    if (f.type == "counter" && !ends_with(name, "_total")) ex.errors.push_back(name + ": a counter must end in _total");
    if (f.type != "counter" && ends_with(name, "_total")) {
      ex.errors.push_back(name + ": a " + f.type + " must not end in _total");
    }
    if (f.type == "counter") {
      for (const Sample& s : f.samples) {
        if (!(s.value >= 0)) ex.errors.push_back(name + ": a counter's value must be >= 0");
      }
    }
    if (f.type != "histogram") continue;
    // Per label set (without le): increasing le, cumulative counts, +Inf == _count, a _sum.
    std::map<std::map<std::string, std::string>, std::vector<std::pair<double, double>>> buckets;
    std::map<std::map<std::string, std::string>, double> counts;
    std::set<std::map<std::string, std::string>> sums;
    for (const Sample& s : f.samples) {
      auto labels = s.labels;
      if (ends_with(s.name, "_bucket")) {
        const std::optional<double> le = parse_value(labels["le"]);
        if (!le) ex.errors.push_back(name + ": bad le '" + labels["le"] + "'");
        labels.erase("le");
        buckets[labels].emplace_back(le.value_or(NAN), s.value);
      } else if (ends_with(s.name, "_count")) {
        counts[labels] = s.value;
      } else if (ends_with(s.name, "_sum")) {
        sums.insert(labels);
      } else {
        ex.errors.push_back(name + ": histogram sample " + s.name);
      }
    }
    for (const auto& [labels, b] : buckets) {
      for (size_t k = 1; k < b.size(); ++k) {
        if (!(b[k].first > b[k - 1].first)) ex.errors.push_back(name + ": le must increase");
        if (b[k].second < b[k - 1].second) ex.errors.push_back(name + ": bucket counts must be cumulative");
      }
      if (b.empty() || !std::isinf(b.back().first)) ex.errors.push_back(name + ": no +Inf bucket");
      if (!counts.count(labels) || counts.at(labels) != b.back().second) {
        ex.errors.push_back(name + ": _count must equal the +Inf bucket");
      }
      if (!sums.count(labels)) ex.errors.push_back(name + ": no _sum");
    }
  }
  return ex;
}

std::string joined(const std::vector<std::string>& v) {
  std::string out;
  for (const auto& s : v) out += s + "\n";
  return out;
}

// ---------------------------------------------------------------------------------------------------------------

// An engine whose info() is fixed: 2 ranks, 64 pages each, 4 reserved, 3 and 1 in use.
class FakeEngine : public Engine {
 public:
  Result<RequestId> submit(EngineRequest, EngineEventFn) override { return unavailable("fake engine"); }
  void cancel(RequestId) override {}
  EngineInfo info() const override {
    EngineInfo i;
    i.world_size = 2;
    i.kv_pages_total = 64;
    i.kv_pages_free = 60;
    i.kv_pages_used = {3, 1};
    i.merge_seconds_total = 0.25;
    i.merges_total = 7;
    i.queue_depth = 2;
    i.running = 1;
    return i;
  }
  int64_t plain_prompt_context_tokens(int64_t n_prompt) const override { return n_prompt; }
  bool ready() const override { return true; }
};

// The server's metrics with a little of everything recorded.
struct Fixture {
  FakeEngine engine;
  ServerMetrics metrics;
  Fixture() {
    metrics.register_engine(engine);
    metrics.record_request("Complete", "OK");
    metrics.record_request("Complete", "OK");
    metrics.record_request("StreamComplete", "INVALID_ARGUMENT");
    metrics.observe_time_to_first_token(0.03);
    metrics.observe_inter_token_latency(0.002);
    metrics.observe_phase1(0.5);
    metrics.observe_request_duration(1.5);
    metrics.add_generated_tokens(12);
    metrics.add_prompt_tokens(20);
  }
};

TEST(Metrics, ServerMetricsFollowTheExpositionFormatAndNamingRules) {
  Fixture fx;
  const std::string text = fx.metrics.registry().render();
  const Exposition ex = parse_exposition(text);
  ASSERT_TRUE(ex.errors.empty()) << joined(ex.errors) << text;

  // Every metric the server exports, with its type (README.md, "Metrics").
  const std::map<std::string, std::string> expected = {
      {"starserve_requests_total", "counter"},
      {"starserve_generated_tokens_total", "counter"},
      {"starserve_prompt_tokens_total", "counter"},
      {"starserve_merges_total", "counter"},
      {"starserve_merge_seconds_total", "counter"},
      {"starserve_time_to_first_token_seconds", "histogram"},
      {"starserve_inter_token_latency_seconds", "histogram"},
      {"starserve_phase1_seconds", "histogram"},
      {"starserve_request_duration_seconds", "histogram"},
      {"starserve_queue_depth", "gauge"},
      {"starserve_requests_running", "gauge"},
      {"starserve_kv_pages_used", "gauge"},
      {"starserve_kv_pages_capacity", "gauge"},
      {"starserve_kv_pages_reserved", "gauge"},
      {"starserve_ready", "gauge"},
      {"starserve_context_cache_pages", "gauge"},
      {"starserve_context_cache_entries", "gauge"},
      {"starserve_context_cache_hits_total", "counter"},
      {"starserve_context_cache_misses_total", "counter"},
      {"starserve_context_cache_evictions_total", "counter"},
      {"starserve_engine_seconds_total", "counter"},
      {"starserve_decode_steps_total", "counter"},
      {"starserve_decoded_sequences_total", "counter"},
  };
  std::map<std::string, std::string> got;
  for (const auto& [name, f] : ex.families) got[name] = f.type;
  EXPECT_EQ(got, expected);

  // The engine's numbers under their names.
  EXPECT_EQ(ex.value("starserve_kv_pages_capacity", {{"rank", "0"}}), 64);
  EXPECT_EQ(ex.value("starserve_kv_pages_capacity", {{"rank", "1"}}), 64);
  EXPECT_EQ(ex.value("starserve_kv_pages_used", {{"rank", "0"}}), 3);
  EXPECT_EQ(ex.value("starserve_kv_pages_used", {{"rank", "1"}}), 1);
  EXPECT_EQ(ex.value("starserve_kv_pages_reserved"), 4);
  EXPECT_EQ(ex.value("starserve_merges_total"), 7);
  EXPECT_EQ(ex.value("starserve_merge_seconds_total"), 0.25);
  EXPECT_EQ(ex.value("starserve_queue_depth"), 2);
  EXPECT_EQ(ex.value("starserve_requests_running"), 1);
  EXPECT_EQ(ex.value("starserve_ready"), 1);
  EXPECT_EQ(ex.value("starserve_requests_total", {{"rpc", "Complete"}, {"status", "OK"}}), 2);
  EXPECT_EQ(ex.value("starserve_requests_total", {{"rpc", "StreamComplete"}, {"status", "INVALID_ARGUMENT"}}), 1);
  EXPECT_EQ(ex.value("starserve_generated_tokens_total"), 12);
  EXPECT_EQ(ex.value("starserve_time_to_first_token_seconds_count"), 1);
  EXPECT_EQ(ex.value("starserve_time_to_first_token_seconds_bucket", {{"le", "0.025"}}), 0);
  EXPECT_EQ(ex.value("starserve_time_to_first_token_seconds_bucket", {{"le", "0.05"}}), 1);
  EXPECT_EQ(ex.value("starserve_time_to_first_token_seconds_bucket", {{"le", "+Inf"}}), 1);
}

TEST(Metrics, LabelValuesAndHelpAreEscaped) {
  MetricsRegistry r;
  const std::string odd = "a\"b\\c\nd";
  r.counter("odd_total", "line one\nline two \\ end", {{"v", odd}}).inc(2);
  r.histogram("odd_seconds", "h", {0.5, 1}, {{"v", odd}}).observe(0.75);
  const std::string text = r.render();
  const Exposition ex = parse_exposition(text);
  ASSERT_TRUE(ex.errors.empty()) << joined(ex.errors) << text;
  EXPECT_EQ(ex.families.at("odd_total").help, "line one\nline two \\ end");
  EXPECT_EQ(ex.value("odd_total", {{"v", odd}}), 2);
  EXPECT_EQ(ex.value("odd_seconds_bucket", {{"v", odd}, {"le", "1"}}), 1);
  EXPECT_EQ(ex.value("odd_seconds_bucket", {{"v", odd}, {"le", "0.5"}}), 0);
}

TEST(Metrics, ReaderRejectsWhatBreaksTheRules) {
  // The reader itself: each of these must be caught, or the tests above prove nothing.
  EXPECT_FALSE(parse_exposition("# HELP x_total h\n# TYPE x_total gauge\nx_total 1\n").errors.empty());
  EXPECT_FALSE(parse_exposition("# HELP x h\n# TYPE x counter\nx 1\n").errors.empty());
  EXPECT_FALSE(parse_exposition("# TYPE x gauge\nx 1\n").errors.empty());
  EXPECT_FALSE(parse_exposition("x 1\n").errors.empty());
  EXPECT_FALSE(parse_exposition("# HELP x h\n# TYPE x gauge\nx{a=\"1} 1\n").errors.empty());
  EXPECT_FALSE(parse_exposition("# HELP x h\n# TYPE x gauge\nx one\n").errors.empty());
  EXPECT_FALSE(parse_exposition("# HELP x h\n# TYPE x gauge\nx 1").errors.empty());
  EXPECT_FALSE(parse_exposition("# HELP h h\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\n"
                                "h_sum 1\nh_count 1\n").errors.empty());
  EXPECT_TRUE(parse_exposition("# HELP x h\n# TYPE x gauge\nx{a=\"1\"} 1.5e-3\n").errors.empty());
}

TEST(MetricsDeathTest, RegistryRefusesNamesAgainstTheRules) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH({ MetricsRegistry().gauge("pages_total", "h", {}, [] { return 0.0; }); }, "must not end in _total");
  EXPECT_DEATH({ MetricsRegistry().counter("merges", "h"); }, "must end in _total");
  EXPECT_DEATH({ MetricsRegistry().sampled_counter("merge_seconds", "h", {}, [] { return 0.0; }); },
               "must end in _total");
  EXPECT_DEATH({ MetricsRegistry().histogram("latency_total", "h", {1}); }, "must not end in _total");
  EXPECT_DEATH({ MetricsRegistry().histogram("latency_seconds", "h", {1}, {{"le", "1"}}); }, "le label");
  EXPECT_DEATH({ MetricsRegistry().gauge("1pages", "h", {}, [] { return 0.0; }); }, "must match");
  EXPECT_DEATH({ MetricsRegistry().gauge("pages", "h", {{"__x", "1"}}, [] { return 0.0; }); }, "label name");
  EXPECT_DEATH(
      {
        MetricsRegistry r;
        r.histogram("x_seconds", "h", {1});
        r.gauge("x_seconds", "h", {}, [] { return 0.0; });
      },
      "different types");
}

// ---------------------------------------------------------------------------------------------------------------
// HTTP, over plain sockets.

// Seconds a client waits for the server: the hang guard of every test below.
constexpr int kClientTimeoutS = 10;

class Socket {
 public:
  explicit Socket(int port) : fd_(socket(AF_INET, SOCK_STREAM, 0)) {
    timeval tv{kClientTimeoutS, 0};
    setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd_, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<uint16_t>(port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    connected_ = connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0;
  }
  ~Socket() { close(fd_); }
  Socket(const Socket&) = delete;
  Socket& operator=(const Socket&) = delete;

  bool connected() const { return connected_; }
  bool send_all(const std::string& s) {
    size_t sent = 0;
    while (sent < s.size()) {
      const ssize_t n = send(fd_, s.data() + sent, s.size() - sent, MSG_NOSIGNAL);
      if (n <= 0) return false;
      sent += static_cast<size_t>(n);
    }
    return true;
  }
  // Bytes until n arrived, the peer closed, or the timeout; "" on close or timeout.
  std::string recv_some() {
    char buf[4096];
    const ssize_t n = recv(fd_, buf, sizeof(buf), 0);
    return n > 0 ? std::string(buf, static_cast<size_t>(n)) : std::string();
  }
  // True when the peer closed the connection (recv returns 0) before the timeout.
  bool closed_by_peer() {
    char buf[256];
    for (;;) {
      const ssize_t n = recv(fd_, buf, sizeof(buf), 0);
      if (n == 0) return true;
      if (n < 0) return false;  // timeout or error
    }
  }

 private:
  int fd_;
  bool connected_ = false;
};

struct HttpReply {
  int status = 0;  // 0: no complete reply before the timeout
  std::map<std::string, std::string> headers;  // names lower-cased
  std::string body;
};

// Reads one response (status line, headers, Content-Length bytes of body unless head_only).
HttpReply read_reply(Socket& s, bool head_only = false) {
  HttpReply r;
  std::string data;
  size_t header_end;
  while ((header_end = data.find("\r\n\r\n")) == std::string::npos) {
    const std::string more = s.recv_some();
    if (more.empty()) return r;
    data += more;
  }
  const std::string head = data.substr(0, header_end);
  std::string body = data.substr(header_end + 4);
  size_t line_end = head.find("\r\n");
  const std::string status_line = head.substr(0, line_end);
  if (status_line.rfind("HTTP/1.1 ", 0) != 0) return r;
  const int status = std::atoi(status_line.c_str() + 9);
  while (line_end != std::string::npos) {
    const size_t next = head.find("\r\n", line_end + 2);
    const std::string line = head.substr(line_end + 2, next == std::string::npos ? std::string::npos : next - line_end - 2);
    const size_t colon = line.find(':');
    if (colon != std::string::npos) {
      std::string key = line.substr(0, colon);
      for (char& c : key) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      r.headers[key] = line.substr(line.find_first_not_of(' ', colon + 1));
    }
    line_end = next;
  }
  const size_t length = r.headers.count("content-length") ? std::stoul(r.headers["content-length"]) : 0;
  if (!head_only) {
    while (body.size() < length) {
      const std::string more = s.recv_some();
      if (more.empty()) return r;
      body += more;
    }
  }
  r.body = body.substr(0, head_only ? 0 : length);
  r.status = status;
  return r;
}

std::string request(const std::string& method, const std::string& path, bool keep_alive) {
  return method + " " + path + " HTTP/1.1\r\nHost: 127.0.0.1\r\n" +
         (keep_alive ? "" : "Connection: close\r\n") + "\r\n";
}

HttpReply scrape(int port, const std::string& path = "/metrics", const std::string& method = "GET") {
  Socket s(port);
  if (!s.connected() || !s.send_all(request(method, path, false))) return {};
  return read_reply(s, method == "HEAD");
}

// The endpoint over the fixture's metrics, on a free loopback port.
struct Endpoint {
  Fixture fx;
  MetricsHttpServer http;
  Endpoint() {
    const Status s = http.start("127.0.0.1", 0, [this] { return fx.metrics.registry().render(); });
    SS_CHECK(s.ok(), "metrics endpoint: {}", s.to_string());
  }
};

// Runs fn on a thread and aborts the test binary when it has not returned after `limit`: the guard for calls
// that would otherwise hang the test (ctest then reports the failure).
template <typename Fn>
void within(std::chrono::seconds limit, const char* what, Fn fn) {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  std::thread t([&] {
    fn();
    std::lock_guard<std::mutex> lock(mu);
    done = true;
    cv.notify_all();
  });
  std::unique_lock<std::mutex> lock(mu);
  if (!cv.wait_for(lock, limit, [&] { return done; })) {
    std::fprintf(stderr, "FATAL: %s did not return within %lld s\n", what, static_cast<long long>(limit.count()));
    std::abort();
  }
  lock.unlock();
  t.join();
}

TEST(MetricsHttp, ScrapeSucceedsWhileIdleConnectionsAreOpen) {
  Endpoint ep;
  // Issue 17: three idle sockets made a scrape wait for each of them in turn. Here they stay open (connected,
  // nothing sent) during the scrape, beside one that sent half a request line.
  std::vector<std::unique_ptr<Socket>> idle;
  for (int i = 0; i < 3; ++i) {
    idle.push_back(std::make_unique<Socket>(ep.http.port()));
    ASSERT_TRUE(idle.back()->connected());
  }
  idle.push_back(std::make_unique<Socket>(ep.http.port()));
  ASSERT_TRUE(idle.back()->send_all("GET /metr"));

  const HttpReply r = scrape(ep.http.port());
  ASSERT_EQ(r.status, 200) << "no reply within " << kClientTimeoutS << " s";
  EXPECT_EQ(r.headers.at("content-type"), "text/plain; version=0.0.4; charset=utf-8");
  const Exposition ex = parse_exposition(r.body);
  EXPECT_TRUE(ex.errors.empty()) << joined(ex.errors);
  EXPECT_EQ(ex.value("starserve_kv_pages_capacity", {{"rank", "1"}}), 64);
}

TEST(MetricsHttp, ConcurrentScrapesAllSucceed) {
  Endpoint ep;
  std::vector<std::unique_ptr<Socket>> idle;
  for (int i = 0; i < 3; ++i) idle.push_back(std::make_unique<Socket>(ep.http.port()));
  constexpr int kClients = 16;
  std::atomic<int> ok{0};
  std::vector<std::thread> clients;
  for (int i = 0; i < kClients; ++i) {
    clients.emplace_back([&] {
      const HttpReply r = scrape(ep.http.port());
      if (r.status == 200 && parse_exposition(r.body).errors.empty()) ok.fetch_add(1);
    });
  }
  for (auto& t : clients) t.join();
  EXPECT_EQ(ok.load(), kClients);
}

TEST(MetricsHttp, IdleConnectionsAreClosedAndNeverStarveAScrape) {
  Endpoint ep;
  // More idle connections than the endpoint has workers: each holds a worker until its idle timeout, after which
  // the server closes it and the scrape queued behind them is answered.
  constexpr int kIdle = 12;
  std::vector<std::unique_ptr<Socket>> idle;
  for (int i = 0; i < kIdle; ++i) {
    idle.push_back(std::make_unique<Socket>(ep.http.port()));
    ASSERT_TRUE(idle.back()->connected());
  }
  EXPECT_EQ(scrape(ep.http.port()).status, 200);
  for (int i = 0; i < kIdle; ++i) EXPECT_TRUE(idle[i]->closed_by_peer()) << "idle connection " << i << " still open";
}

TEST(MetricsHttp, KeepAliveConnectionServesSeveralScrapesThenTimesOut) {
  Endpoint ep;
  Socket s(ep.http.port());
  ASSERT_TRUE(s.connected());
  for (int i = 0; i < 2; ++i) {
    ASSERT_TRUE(s.send_all(request("GET", "/metrics", true)));
    const HttpReply r = read_reply(s);
    ASSERT_EQ(r.status, 200) << "request " << i;
    EXPECT_TRUE(parse_exposition(r.body).errors.empty());
  }
  // Left idle, the connection is closed by the server.
  EXPECT_TRUE(s.closed_by_peer());
}

TEST(MetricsHttp, OnlyGetAndHeadOfMetrics) {
  Endpoint ep;
  const HttpReply head = scrape(ep.http.port(), "/metrics", "HEAD");
  EXPECT_EQ(head.status, 200);
  EXPECT_TRUE(head.body.empty());
  EXPECT_EQ(scrape(ep.http.port(), "/").status, 404);
  EXPECT_EQ(scrape(ep.http.port(), "/metrics/x").status, 404);
  EXPECT_EQ(scrape(ep.http.port(), "/metrics?name=x").status, 200);
}

TEST(MetricsHttp, PortInUseIsAnError) {
  Endpoint ep;
  MetricsHttpServer second;
  const Status s = second.start("127.0.0.1", ep.http.port(), [] { return std::string(); });
  EXPECT_EQ(s.code(), StatusCode::kUnavailable);
  EXPECT_NE(s.message().find(std::to_string(ep.http.port())), std::string::npos) << s.message();
  // The first server still answers.
  EXPECT_EQ(scrape(ep.http.port()).status, 200);
}

TEST(MetricsHttp, StopReturnsWithAnIdleConnectionOpen) {
  auto ep = std::make_unique<Endpoint>();
  Socket idle(ep->http.port());
  ASSERT_TRUE(idle.connected());
  ASSERT_EQ(scrape(ep->http.port()).status, 200);
  within(std::chrono::seconds(30), "MetricsHttpServer::stop", [&] { ep->http.stop(); });
  EXPECT_TRUE(idle.closed_by_peer());
  ep.reset();
}

}  // namespace
}  // namespace starserve

#else

TEST(MetricsHttp, NeedsTheServerLibrary) { GTEST_SKIP() << "this build has no gRPC, so no starserve_server"; }

#endif
