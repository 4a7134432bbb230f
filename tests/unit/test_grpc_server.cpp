// The gRPC front end in process (src/server/grpc_server.h), over real gRPC on loopback, with an engine that ends
// every request at once: requests whose string fields are not valid UTF-8 are refused INVALID_ARGUMENT naming the
// field (not gRPC's INTERNAL with no message); with an API key, every service (starserve.v1, health Check and Watch,
// reflection v1 and v1alpha) answers UNAUTHENTICATED without it, and health can be exempted; reflection answers
// from the descriptor pool; the server listens on IPv4 and IPv6 hosts, bracketed or not.
//
// The clients set invalid UTF-8 into proto3 string fields; the protobuf library serializes them as given (logging
// an error line), which is what any client sending raw bytes does.
#include <gtest/gtest.h>

#if __has_include("starserve/v1/completion.grpc.pb.h")

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <google/protobuf/descriptor.pb.h>
#include <grpcpp/grpcpp.h>

#include "common/check.h"
#include "engine/engine.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpc/reflection/v1/reflection.grpc.pb.h"
#include "grpc/reflection/v1alpha/reflection.grpc.pb.h"
#include "model/chat_template.h"
#include "model/tokenizer.h"
#include "server/checked_service.h"
#include "server/grpc_server.h"
#include "server/health_service.h"
#include "server/request_registry.h"
#include "starserve/v1/completion.grpc.pb.h"

#ifndef STARSERVE_GOLDEN_DIR
#error "STARSERVE_GOLDEN_DIR must name tests/golden"
#endif

namespace starserve {
namespace {

using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;

const Tokenizer& tiny() {
  static const Tokenizer tok = [] {
    const std::string dir = std::string(STARSERVE_GOLDEN_DIR) + "/tokenizer/";
    auto t = Tokenizer::from_hf_json(dir + "tiny.tokenizer.json", dir + "tiny_tokenizer_config.json");
    SS_CHECK(t.ok(), "tiny tokenizer: {}", t.status().to_string());
    return std::move(t).value();
  }();
  return tok;
}

// Ready at once; every request finishes (length) as soon as it is submitted, with no token.
// What the test engines report: the tiny tokenizer's model on one CPU rank.
EngineInfo tiny_engine_info() {
  EngineInfo i;
  i.model_name = "tiny";
  i.max_context = 256;
  i.n_vocab = tiny().n_vocab();
  i.devices = {"cpu"};
  return i;
}

class InstantEngine final : public Engine {
 public:
  std::function<void(EngineInfo*)> adjust_info;  // a test's own values on top of tiny_engine_info
  Result<RequestId> submit(EngineRequest request, EngineEventFn on_event) override {
    submitted.fetch_add(1);
    EngineEvent done;
    done.kind = EngineEvent::Kind::kFinished;
    done.finish = FinishReason::kLength;
    done.usage.query_tokens = static_cast<int64_t>(request.query.size());
    on_event(done);
    return next_id_.fetch_add(1);
  }
  void cancel(RequestId) override {}
  EngineInfo info() const override {
    EngineInfo i = tiny_engine_info();
    i.star_defaults = star_defaults;
    if (adjust_info) adjust_info(&i);
    return i;
  }
  int64_t plain_prompt_context_tokens(int64_t n_prompt) const override { return n_prompt / 2; }
  bool ready() const override { return true; }

  std::atomic<int> submitted{0};
  StarConfig star_defaults;

 private:
  std::atomic<RequestId> next_id_{1};
};

// An engine whose requests run until cancelled: each submit sends one token at once, then holds; cancel() ends the
// request with FINISH_REASON_CANCELLED (as the serving engine does at its next step) and the output it has.
class HoldingEngine final : public Engine {
 public:
  Result<RequestId> submit(EngineRequest request, EngineEventFn on_event) override {
    (void)request;
    std::lock_guard<std::mutex> lock(mu);
    const RequestId id = next_id_++;
    EngineEvent token;
    token.kind = EngineEvent::Kind::kToken;
    token.token.token = 5;
    token.token.text = "x";
    on_event(token);
    held_[id] = std::move(on_event);
    cv.notify_all();
    return id;
  }
  void cancel(RequestId id) override {
    EngineEventFn fn;
    {
      std::lock_guard<std::mutex> lock(mu);
      auto it = held_.find(id);
      if (it == held_.end()) return;
      fn = std::move(it->second);
      held_.erase(it);
      ++cancelled;
    }
    EngineEvent done;
    done.kind = EngineEvent::Kind::kFinished;
    done.finish = FinishReason::kCancelled;
    done.usage.completion_tokens = 1;
    fn(done);
  }
  EngineInfo info() const override { return tiny_engine_info(); }
  int64_t plain_prompt_context_tokens(int64_t n_prompt) const override { return n_prompt / 2; }
  bool ready() const override { return true; }
  // Waits until `n` requests are held.
  bool wait_held(size_t n) {
    std::unique_lock<std::mutex> lock(mu);
    return cv.wait_for(lock, std::chrono::seconds(20), [&] { return held_.size() >= n; });
  }

  std::mutex mu;
  std::condition_variable cv;
  int cancelled = 0;  // guarded by mu

 private:
  RequestId next_id_ = 1;
  std::map<RequestId, EngineEventFn> held_;
};

ServerConfig config_for(const std::string& host, const std::string& api_key = "") {
  ServerConfig c;
  c.host = host;
  c.port = 0;
  c.metrics_port = 0;
  c.api_key = api_key;
  return c;
}

struct Served {
  InstantEngine engine;
  std::unique_ptr<GrpcServer> server;

  Status start(const ServerConfig& config) {
    server = std::make_unique<GrpcServer>(config, engine, tiny(), ChatTemplate::builtin("llama3").value());
    return server->start();
  }
  std::shared_ptr<grpc::Channel> channel(const std::string& host = "127.0.0.1") const {
    return grpc::CreateChannel(fmt::format("{}:{}", host, server->port()), grpc::InsecureChannelCredentials());
  }
};

void with_key(grpc::ClientContext* ctx, const std::string& key) {
  ctx->AddMetadata("authorization", "Bearer " + key);
}

void expect_status(const grpc::Status& s, grpc::StatusCode code, const std::string& fragment) {
  EXPECT_EQ(s.error_code(), code) << s.error_code() << ": " << s.error_message();
  EXPECT_NE(s.error_message().find(fragment), std::string::npos)
      << "\"" << s.error_message() << "\" lacks \"" << fragment << "\"";
}

// ---- requests that do not parse ----

TEST(GrpcServer, InvalidUtf8IsInvalidArgumentNamingTheField) {
  Served s;
  ASSERT_TRUE(s.start(config_for("127.0.0.1")).ok());
  auto stub = v1::CompletionService::NewStub(s.channel());
  const auto complete = [&](const v1::CompleteRequest& r) {
    grpc::ClientContext ctx;
    v1::CompleteResponse resp;
    return stub->Complete(&ctx, r, &resp);
  };

  v1::CompleteRequest r;
  r.set_prompt("The capital of \xff");
  expect_status(complete(r), grpc::StatusCode::INVALID_ARGUMENT, "prompt is not valid UTF-8");
  r.set_prompt("fine");
  r.mutable_params()->add_stop()->assign("ok");
  r.mutable_params()->add_stop()->assign("\xc3");  // a lead byte with nothing after it
  expect_status(complete(r), grpc::StatusCode::INVALID_ARGUMENT, "params.stop[1] is not valid UTF-8");
  r.mutable_params()->clear_stop();
  r.set_model("\xfe\xfe");
  expect_status(complete(r), grpc::StatusCode::INVALID_ARGUMENT, "model is not valid UTF-8");
  r.clear_model();
  r.mutable_split()->set_context("doc \xed\xa0\x80");  // a UTF-16 surrogate written as UTF-8
  r.mutable_split()->set_query("q");
  expect_status(complete(r), grpc::StatusCode::INVALID_ARGUMENT, "split.context is not valid UTF-8");

  // A server stream, a chat message and Tokenize take the same path.
  v1::StreamCompleteRequest sr;
  sr.set_prompt("\x80");
  {
    grpc::ClientContext ctx;
    auto reader = stub->StreamComplete(&ctx, sr);
    v1::StreamCompleteResponse m;
    EXPECT_FALSE(reader->Read(&m));
    expect_status(reader->Finish(), grpc::StatusCode::INVALID_ARGUMENT, "prompt is not valid UTF-8");
  }
  v1::ChatCompleteRequest cr;
  cr.add_messages()->set_content("hi");
  cr.mutable_messages(0)->set_role("user");
  cr.add_messages()->set_content("bad \xc0\xaf");  // an overlong encoding of '/'
  cr.mutable_messages(1)->set_role("user");
  {
    grpc::ClientContext ctx;
    v1::ChatCompleteResponse resp;
    expect_status(stub->ChatComplete(&ctx, cr, &resp), grpc::StatusCode::INVALID_ARGUMENT,
                  "messages[1].content is not valid UTF-8");
  }
  v1::TokenizeRequest tr;
  tr.set_prompt("\xff");
  {
    grpc::ClientContext ctx;
    v1::TokenizeResponse resp;
    expect_status(stub->Tokenize(&ctx, tr, &resp), grpc::StatusCode::INVALID_ARGUMENT, "prompt is not valid UTF-8");
  }
  EXPECT_EQ(s.engine.submitted.load(), 0);

  // Valid text still goes through.
  v1::CompleteRequest ok;
  ok.set_prompt("caf\xc3\xa9");
  EXPECT_TRUE(complete(ok).ok());
  EXPECT_EQ(s.engine.submitted.load(), 1);
}

TEST(GrpcServer, BytesThatAreNoMessageAreInvalidArgument) {
  const google::protobuf::Descriptor& type = *v1::CompleteRequest::descriptor();
  // Field 2 (prompt), length 100, but only 3 bytes follow.
  const std::string truncated = std::string("\x12\x64", 2) + "abc";
  expect_status(diagnose_unparsed_request(type, truncated), grpc::StatusCode::INVALID_ARGUMENT,
                "not a valid starserve.v1.CompleteRequest message");
  v1::ChatCompleteRequest chat;
  chat.add_messages()->set_content("\xff");
  expect_status(diagnose_unparsed_request(*v1::ChatCompleteRequest::descriptor(), chat.SerializeAsString()),
                grpc::StatusCode::INVALID_ARGUMENT, "messages[0].content is not valid UTF-8");
}

// ---- the API key on every service ----

std::vector<std::string> list_services_v1(const std::shared_ptr<grpc::Channel>& channel, const std::string& key,
                                          grpc::Status* status) {
  auto stub = grpc::reflection::v1::ServerReflection::NewStub(channel);
  grpc::ClientContext ctx;
  if (!key.empty()) with_key(&ctx, key);
  auto stream = stub->ServerReflectionInfo(&ctx);
  grpc::reflection::v1::ServerReflectionRequest req;
  req.set_list_services("");
  std::vector<std::string> names;
  if (stream->Write(req)) {
    grpc::reflection::v1::ServerReflectionResponse resp;
    if (stream->Read(&resp)) {
      for (const auto& svc : resp.list_services_response().service()) names.push_back(svc.name());
    }
  }
  stream->WritesDone();
  *status = stream->Finish();
  return names;
}

std::vector<std::string> list_services_v1alpha(const std::shared_ptr<grpc::Channel>& channel, const std::string& key,
                                               grpc::Status* status) {
  auto stub = grpc::reflection::v1alpha::ServerReflection::NewStub(channel);
  grpc::ClientContext ctx;
  if (!key.empty()) with_key(&ctx, key);
  auto stream = stub->ServerReflectionInfo(&ctx);
  grpc::reflection::v1alpha::ServerReflectionRequest req;
  req.set_list_services("");
  std::vector<std::string> names;
  if (stream->Write(req)) {
    grpc::reflection::v1alpha::ServerReflectionResponse resp;
    if (stream->Read(&resp)) {
      for (const auto& svc : resp.list_services_response().service()) names.push_back(svc.name());
    }
  }
  stream->WritesDone();
  *status = stream->Finish();
  return names;
}

// Health Watch: the first status sent, then the call is ended by the client.
grpc::Status watch_first(const std::shared_ptr<grpc::Channel>& channel, const std::string& key,
                         const std::string& service, HealthCheckResponse* first) {
  auto stub = grpc::health::v1::Health::NewStub(channel);
  grpc::ClientContext ctx;
  if (!key.empty()) with_key(&ctx, key);
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  HealthCheckRequest req;
  req.set_service(service);
  auto reader = stub->Watch(&ctx, req);
  if (reader->Read(first)) {
    ctx.TryCancel();
    while (reader->Read(first)) {
    }
    reader->Finish();
    return grpc::Status::OK;
  }
  return reader->Finish();
}

TEST(GrpcServer, EveryServiceNeedsTheApiKey) {
  const std::string key = "unit-test-key";
  Served s;
  ASSERT_TRUE(s.start(config_for("127.0.0.1", key)).ok());
  const auto channel = s.channel();

  // starserve.v1
  auto completion = v1::CompletionService::NewStub(channel);
  {
    grpc::ClientContext ctx;
    v1::GetServerInfoResponse info;
    expect_status(completion->GetServerInfo(&ctx, v1::GetServerInfoRequest(), &info),
                  grpc::StatusCode::UNAUTHENTICATED, "authorization");
  }
  // grpc.health.v1: Check and Watch
  auto health = grpc::health::v1::Health::NewStub(channel);
  {
    grpc::ClientContext ctx;
    HealthCheckResponse resp;
    expect_status(health->Check(&ctx, HealthCheckRequest(), &resp), grpc::StatusCode::UNAUTHENTICATED,
                  "authorization");
  }
  HealthCheckResponse first;
  expect_status(watch_first(channel, "", "", &first), grpc::StatusCode::UNAUTHENTICATED, "authorization");
  // grpc.reflection v1 and v1alpha
  grpc::Status status;
  EXPECT_TRUE(list_services_v1(channel, "", &status).empty());
  expect_status(status, grpc::StatusCode::UNAUTHENTICATED, "authorization");
  EXPECT_TRUE(list_services_v1alpha(channel, "", &status).empty());
  expect_status(status, grpc::StatusCode::UNAUTHENTICATED, "authorization");
  {
    auto stub = grpc::reflection::v1::ServerReflection::NewStub(channel);
    grpc::ClientContext ctx;
    ctx.AddMetadata("authorization", "Bearer wrong");
    auto stream = stub->ServerReflectionInfo(&ctx);
    stream->WritesDone();
    expect_status(stream->Finish(), grpc::StatusCode::UNAUTHENTICATED, "invalid API key");
  }

  // With the key, all of them answer.
  {
    grpc::ClientContext ctx;
    with_key(&ctx, key);
    v1::GetServerInfoResponse info;
    EXPECT_TRUE(completion->GetServerInfo(&ctx, v1::GetServerInfoRequest(), &info).ok());
    EXPECT_TRUE(info.auth_required());
  }
  {
    grpc::ClientContext ctx;
    with_key(&ctx, key);
    HealthCheckResponse resp;
    ASSERT_TRUE(health->Check(&ctx, HealthCheckRequest(), &resp).ok());
    EXPECT_EQ(resp.status(), HealthCheckResponse::SERVING);
  }
  ASSERT_TRUE(watch_first(channel, key, "", &first).ok());
  EXPECT_EQ(first.status(), HealthCheckResponse::SERVING);
  const std::vector<std::string> expected = {"starserve.v1.CompletionService", "grpc.health.v1.Health",
                                             "grpc.reflection.v1.ServerReflection",
                                             "grpc.reflection.v1alpha.ServerReflection"};
  EXPECT_EQ(list_services_v1(channel, key, &status), expected);
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(list_services_v1alpha(channel, key, &status), expected);
  EXPECT_TRUE(status.ok()) << status.error_message();
}

TEST(GrpcServer, ServerInfoReportsTheStarDefaults) {
  const std::vector<std::pair<ExactLayout, v1::ExactLayout>> layouts = {
      {ExactLayout::kAuto, v1::EXACT_LAYOUT_UNSPECIFIED},
      {ExactLayout::kContiguous, v1::EXACT_LAYOUT_CONTIGUOUS},
      {ExactLayout::kZigzag, v1::EXACT_LAYOUT_ZIGZAG}};
  for (const auto& [layout, expected] : layouts) {
    Served s;
    s.engine.star_defaults.mode = AttentionMode::kExact;
    s.engine.star_defaults.block_size = 96;
    s.engine.star_defaults.anchor_size = 32;
    s.engine.star_defaults.exact_layout = layout;
    ASSERT_TRUE(s.start(config_for("127.0.0.1")).ok());
    auto stub = v1::CompletionService::NewStub(s.channel());
    grpc::ClientContext ctx;
    v1::GetServerInfoResponse info;
    ASSERT_TRUE(stub->GetServerInfo(&ctx, v1::GetServerInfoRequest(), &info).ok());
    EXPECT_EQ(info.star().attention_mode(), v1::ATTENTION_MODE_EXACT);
    EXPECT_EQ(info.star().block_size(), 96);
    EXPECT_EQ(info.star().anchor_size(), 32);
    EXPECT_EQ(info.star().exact_layout(), expected);
  }
}

// GetServerInfo reports the parallel layout (ranks, devices, communicator), the KV budget per rank and the context
// cache, from the engine's numbers.
TEST(GrpcServer, ServerInfoReportsTheLayoutTheKvBudgetAndTheContextCache) {
  Served s;
  s.engine.adjust_info = [](EngineInfo* i) {
    i->world_size = 2;
    i->devices = {"NVIDIA H200", "NVIDIA H200"};
    i->communicator = "nccl+mpi";
    i->kv_pages_total = 100;
    i->kv_pages_free = 40;
    i->kv_page_size = 64;
    i->kv_bytes_per_row = 1000;
    i->context_cache_max_pages = -1;
    i->context_cache_entries = 3;
    i->context_cache_pages = 12;
    i->context_cache_hits = 7;
    i->context_cache_misses = 4;
    i->context_cache_evictions = 1;
  };
  ASSERT_TRUE(s.start(config_for("127.0.0.1")).ok());
  auto stub = v1::CompletionService::NewStub(s.channel());
  grpc::ClientContext ctx;
  v1::GetServerInfoResponse info;
  ASSERT_TRUE(stub->GetServerInfo(&ctx, v1::GetServerInfoRequest(), &info).ok());
  EXPECT_EQ(info.world_size(), 2);
  EXPECT_EQ(info.devices_size(), 2);
  EXPECT_EQ(info.communicator(), "nccl+mpi");
  EXPECT_EQ(info.kv_pages_total(), 100);
  EXPECT_EQ(info.kv_pages_free(), 40);
  EXPECT_EQ(info.kv_page_size(), 64);
  EXPECT_EQ(info.kv_bytes_per_rank(), 100 * 64 * 1000);
  EXPECT_TRUE(info.context_cache().enabled());
  EXPECT_EQ(info.context_cache().max_pages(), -1);
  EXPECT_EQ(info.context_cache().entries(), 3);
  EXPECT_EQ(info.context_cache().pages(), 12);
  EXPECT_EQ(info.context_cache().hits(), 7);
  EXPECT_EQ(info.context_cache().misses(), 4);
  EXPECT_EQ(info.context_cache().evictions(), 1);
}

// Abort by the client's x-request-id ends a running unary request with its output so far and
// FINISH_REASON_CANCELLED; a second request with an id in use is ALREADY_EXISTS; unknown ids are reported, bad ones
// refused; without an x-request-id the id Abort takes is the response's own (here read from a stream's first message).
TEST(GrpcServer, AbortEndsRunningRequestsByTheirId) {
  HoldingEngine engine;
  GrpcServer server(config_for("127.0.0.1"), engine, tiny(), ChatTemplate::builtin("llama3").value());
  ASSERT_TRUE(server.start().ok());
  auto channel =
      grpc::CreateChannel(fmt::format("127.0.0.1:{}", server.port()), grpc::InsecureChannelCredentials());
  auto stub = v1::CompletionService::NewStub(channel);

  v1::CompleteRequest req;
  req.set_prompt("hello there");
  grpc::Status held_status;
  v1::CompleteResponse held;
  std::thread unary([&] {
    grpc::ClientContext ctx;
    ctx.AddMetadata("x-request-id", "job-42");
    held_status = stub->Complete(&ctx, req, &held);
  });
  ASSERT_TRUE(engine.wait_held(1));
  {
    grpc::ClientContext ctx;
    ctx.AddMetadata("x-request-id", "job-42");
    v1::CompleteResponse r;
    expect_status(stub->Complete(&ctx, req, &r), grpc::StatusCode::ALREADY_EXISTS, "job-42");
  }
  {
    grpc::ClientContext ctx;
    ctx.AddMetadata("x-request-id", std::string(kMaxClientRequestIdBytes + 1, 'a'));
    v1::CompleteResponse r;
    expect_status(stub->Complete(&ctx, req, &r), grpc::StatusCode::INVALID_ARGUMENT, "x-request-id");
  }
  {
    grpc::ClientContext ctx;
    v1::AbortRequest a;
    a.add_ids("job-42");
    a.add_ids("nobody");
    v1::AbortResponse r;
    ASSERT_TRUE(stub->Abort(&ctx, a, &r).ok());
    ASSERT_EQ(r.aborted_size(), 1);
    EXPECT_EQ(r.aborted(0), "job-42");
    ASSERT_EQ(r.not_found_size(), 1);
    EXPECT_EQ(r.not_found(0), "nobody");
  }
  unary.join();
  ASSERT_TRUE(held_status.ok()) << held_status.error_message();
  EXPECT_EQ(held.id(), "job-42");
  ASSERT_EQ(held.choices_size(), 1);
  EXPECT_EQ(held.choices(0).finish_reason(), v1::FINISH_REASON_CANCELLED);
  EXPECT_EQ(held.choices(0).text(), "x");
  {  // finished: the id is free again, and no longer found
    grpc::ClientContext ctx;
    v1::AbortRequest a;
    a.add_ids("job-42");
    v1::AbortResponse r;
    ASSERT_TRUE(stub->Abort(&ctx, a, &r).ok());
    EXPECT_EQ(r.aborted_size(), 0);
    EXPECT_EQ(r.not_found_size(), 1);
  }

  // A stream without an x-request-id: its first message's id.
  grpc::ClientContext stream_ctx;
  v1::StreamCompleteRequest sreq;
  sreq.set_prompt("hello there");
  auto reader = stub->StreamComplete(&stream_ctx, sreq);
  v1::StreamCompleteResponse m;
  ASSERT_TRUE(reader->Read(&m));
  const std::string id = m.id();
  EXPECT_EQ(id.rfind("cmpl-", 0), 0u) << id;
  {
    grpc::ClientContext ctx;
    v1::AbortRequest a;
    a.add_ids(id);
    v1::AbortResponse r;
    ASSERT_TRUE(stub->Abort(&ctx, a, &r).ok());
    EXPECT_EQ(r.aborted_size(), 1);
  }
  v1::FinishReason last = v1::FINISH_REASON_UNSPECIFIED;
  while (reader->Read(&m)) {
    EXPECT_EQ(m.id(), id);
    if (m.choices_size() > 0) last = m.choices(0).finish_reason();
  }
  EXPECT_TRUE(reader->Finish().ok());
  EXPECT_EQ(last, v1::FINISH_REASON_CANCELLED);

  // Bad calls.
  {
    grpc::ClientContext ctx;
    v1::AbortResponse r;
    expect_status(stub->Abort(&ctx, v1::AbortRequest(), &r), grpc::StatusCode::INVALID_ARGUMENT, "at least one");
  }
  {
    grpc::ClientContext ctx;
    v1::AbortRequest a;
    a.add_ids("ok");
    a.add_ids("has space");
    v1::AbortResponse r;
    expect_status(stub->Abort(&ctx, a, &r), grpc::StatusCode::INVALID_ARGUMENT, "ids[1]");
  }
  std::lock_guard<std::mutex> lock(engine.mu);
  EXPECT_EQ(engine.cancelled, 2);
}

// Abort needs the API key like every RPC.
TEST(GrpcServer, AbortNeedsTheApiKey) {
  Served s;
  ASSERT_TRUE(s.start(config_for("127.0.0.1", "k")).ok());
  auto stub = v1::CompletionService::NewStub(s.channel());
  grpc::ClientContext ctx;
  v1::AbortRequest a;
  a.add_ids("x");
  v1::AbortResponse r;
  expect_status(stub->Abort(&ctx, a, &r), grpc::StatusCode::UNAUTHENTICATED, "authorization");
}

// The registry alone: an abort between reservation and binding is applied at the binding; ids are released with
// their handle.
TEST(RequestRegistry, AbortBeforeBindCancelsAtBind) {
  HoldingEngine engine;
  RequestRegistry registry;
  RequestRegistry::Handle h;
  ASSERT_TRUE(registry.reserve("a", &h));
  RequestRegistry::Handle dup;
  EXPECT_FALSE(registry.reserve("a", &dup));
  EXPECT_TRUE(registry.abort("a"));
  EXPECT_TRUE(h.aborted());
  std::atomic<int> finished{0};
  Result<RequestId> id = engine.submit(EngineRequest{}, [&](const EngineEvent& e) {
    if (e.kind == EngineEvent::Kind::kFinished) finished.fetch_add(1);
  });
  ASSERT_TRUE(id.ok());
  h.bind(engine, *id);
  EXPECT_EQ(finished.load(), 1);
  EXPECT_EQ(registry.running(), 1u);
  h = RequestRegistry::Handle();
  EXPECT_EQ(registry.running(), 0u);
  EXPECT_FALSE(registry.abort("a"));
  EXPECT_TRUE(registry.reserve("a", &h));
  EXPECT_NE(RequestRegistry::check_client_id("").find("empty"), std::string::npos);
  EXPECT_NE(RequestRegistry::check_client_id("a\x01").find("0x01"), std::string::npos);
  EXPECT_TRUE(RequestRegistry::check_client_id("req-1.2:3_x").empty());
}

TEST(GrpcServer, ReflectionAnswersFromTheDescriptorPool) {
  Served s;
  ASSERT_TRUE(s.start(config_for("127.0.0.1")).ok());
  auto stub = grpc::reflection::v1::ServerReflection::NewStub(s.channel());
  grpc::ClientContext ctx;
  auto stream = stub->ServerReflectionInfo(&ctx);
  using Request = grpc::reflection::v1::ServerReflectionRequest;
  using Response = grpc::reflection::v1::ServerReflectionResponse;
  const auto ask = [&](const Request& req) {
    Response resp;
    EXPECT_TRUE(stream->Write(req));
    EXPECT_TRUE(stream->Read(&resp));
    return resp;
  };
  const auto file_names = [](const Response& resp) {
    std::vector<std::string> names;
    for (const std::string& bytes : resp.file_descriptor_response().file_descriptor_proto()) {
      google::protobuf::FileDescriptorProto file;
      EXPECT_TRUE(file.ParseFromString(bytes));
      names.push_back(file.name());
    }
    return names;
  };
  Request req;
  req.set_file_containing_symbol("starserve.v1.CompletionService");
  Response resp = ask(req);
  ASSERT_FALSE(file_names(resp).empty()) << resp.DebugString();
  EXPECT_EQ(file_names(resp)[0], "starserve/v1/completion.proto");
  EXPECT_EQ(resp.original_request().file_containing_symbol(), "starserve.v1.CompletionService");
  req.set_file_containing_symbol("starserve.v1.CompletionService.Complete");  // a method
  EXPECT_EQ(file_names(ask(req)).at(0), "starserve/v1/completion.proto");
  req.set_file_by_filename("grpc/health/v1/health.proto");
  EXPECT_EQ(file_names(ask(req)), std::vector<std::string>{"grpc/health/v1/health.proto"});
  req.set_file_containing_symbol("grpc.reflection.v1alpha.ServerReflection");
  EXPECT_EQ(file_names(ask(req)).at(0), "grpc/reflection/v1alpha/reflection.proto");
  req.set_file_containing_symbol("no.such.Symbol");
  resp = ask(req);
  EXPECT_EQ(resp.error_response().error_code(), static_cast<int>(grpc::StatusCode::NOT_FOUND));
  req.set_all_extension_numbers_of_type("starserve.v1.CompleteRequest");
  resp = ask(req);
  EXPECT_EQ(resp.all_extension_numbers_response().base_type_name(), "starserve.v1.CompleteRequest");
  EXPECT_EQ(resp.all_extension_numbers_response().extension_number_size(), 0);
  resp = ask(Request());
  EXPECT_EQ(resp.error_response().error_code(), static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
}

// --health-without-key: health answers probes without the key; the other services still need it.
TEST(HealthService, WithoutKeyAnswersProbes) {
  auto key = std::make_shared<ApiKeyCheck>("k");
  HealthService health(key, /*without_key=*/true);
  health.set_serving("", true);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&health);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_TRUE(server && port > 0);
  const auto channel = grpc::CreateChannel(fmt::format("127.0.0.1:{}", port), grpc::InsecureChannelCredentials());
  auto stub = grpc::health::v1::Health::NewStub(channel);
  {
    grpc::ClientContext ctx;
    HealthCheckResponse resp;
    ASSERT_TRUE(stub->Check(&ctx, HealthCheckRequest(), &resp).ok());
    EXPECT_EQ(resp.status(), HealthCheckResponse::SERVING);
  }
  {
    grpc::ClientContext ctx;
    HealthCheckRequest req;
    req.set_service("unknown");
    HealthCheckResponse resp;
    EXPECT_EQ(stub->Check(&ctx, req, &resp).error_code(), grpc::StatusCode::NOT_FOUND);
  }
  HealthCheckResponse first;
  ASSERT_TRUE(watch_first(channel, "", "unknown", &first).ok());
  EXPECT_EQ(first.status(), HealthCheckResponse::SERVICE_UNKNOWN);

  // Shutdown: a running Watch sees NOT_SERVING, then its call ends UNAVAILABLE.
  grpc::ClientContext ctx;
  auto reader = stub->Watch(&ctx, HealthCheckRequest());
  HealthCheckResponse m;
  ASSERT_TRUE(reader->Read(&m));
  EXPECT_EQ(m.status(), HealthCheckResponse::SERVING);
  health.shutdown();
  ASSERT_TRUE(reader->Read(&m));
  EXPECT_EQ(m.status(), HealthCheckResponse::NOT_SERVING);
  EXPECT_FALSE(reader->Read(&m));
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::UNAVAILABLE);
  server->Shutdown();
}

// ServerConfig::health_without_key through the whole server: with a key and the setting, health answers without
// the key and the other services still need it; without the setting health is UNAUTHENTICATED too.
TEST(GrpcServer, HealthWithoutKeyExemptsHealthOnly) {
  const std::string key = "unit-test-key";
  for (const bool exempt : {true, false}) {
    ServerConfig c = config_for("127.0.0.1", key);
    c.health_without_key = exempt;
    Served s;
    ASSERT_TRUE(s.start(c).ok());
    auto health = grpc::health::v1::Health::NewStub(s.channel());
    grpc::ClientContext ctx;
    HealthCheckResponse resp;
    const grpc::Status st = health->Check(&ctx, HealthCheckRequest(), &resp);
    if (exempt) {
      EXPECT_TRUE(st.ok()) << st.error_message();
      EXPECT_EQ(resp.status(), HealthCheckResponse::SERVING);
    } else {
      expect_status(st, grpc::StatusCode::UNAUTHENTICATED, "authorization");
    }
    auto completion = v1::CompletionService::NewStub(s.channel());
    grpc::ClientContext info_ctx;
    v1::GetServerInfoResponse info;
    expect_status(completion->GetServerInfo(&info_ctx, v1::GetServerInfoRequest(), &info),
                  grpc::StatusCode::UNAUTHENTICATED, "authorization");
  }
}

// `starserve serve` starts the server before the model loads: liveness SERVING, readiness NOT_SERVING, every
// completion RPC UNAVAILABLE "loading" (after the key check); once the engine is attached and ready, readiness
// turns SERVING and the RPCs go to it. begin_shutdown() (a drain) turns readiness NOT_SERVING and refuses new
// RPCs while liveness stays SERVING.
TEST(GrpcServer, AnswersHealthBeforeTheModelIsAttached) {
  InstantEngine engine;
  ServerConfig c = config_for("127.0.0.1", "k");
  GrpcServer server(c);
  ASSERT_TRUE(server.start().ok());
  const auto channel =
      grpc::CreateChannel(fmt::format("127.0.0.1:{}", server.port()), grpc::InsecureChannelCredentials());
  auto completion = v1::CompletionService::NewStub(channel);
  const auto complete = [&](const std::string& key) {
    grpc::ClientContext ctx;
    if (!key.empty()) with_key(&ctx, key);
    v1::CompleteRequest r;
    r.set_prompt("hi");
    v1::CompleteResponse resp;
    return completion->Complete(&ctx, r, &resp);
  };
  const auto health_of = [&](const std::string& service) {
    auto health = grpc::health::v1::Health::NewStub(channel);
    grpc::ClientContext ctx;
    with_key(&ctx, "k");
    HealthCheckRequest req;
    req.set_service(service);
    HealthCheckResponse resp;
    const grpc::Status st = health->Check(&ctx, req, &resp);
    EXPECT_TRUE(st.ok()) << st.error_message();
    return resp.status();
  };
  EXPECT_EQ(health_of(""), HealthCheckResponse::SERVING);
  EXPECT_EQ(health_of("starserve.v1.CompletionService"), HealthCheckResponse::NOT_SERVING);
  expect_status(complete(""), grpc::StatusCode::UNAUTHENTICATED, "authorization");
  expect_status(complete("k"), grpc::StatusCode::UNAVAILABLE, "model loading");
  {
    grpc::ClientContext ctx;
    with_key(&ctx, "k");
    v1::GetServerInfoResponse info;
    expect_status(completion->GetServerInfo(&ctx, v1::GetServerInfoRequest(), &info), grpc::StatusCode::UNAVAILABLE,
                  "model loading");
  }
  EXPECT_EQ(engine.submitted.load(), 0);

  ASSERT_TRUE(server.attach(engine, tiny(), ChatTemplate::builtin("llama3").value()).ok());
  HealthCheckResponse::ServingStatus ready = HealthCheckResponse::NOT_SERVING;
  for (int i = 0; i < 600 && ready != HealthCheckResponse::SERVING; ++i) {  // the readiness poll: 100 ms
    ready = health_of("starserve.v1.CompletionService");
    if (ready != HealthCheckResponse::SERVING) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(ready, HealthCheckResponse::SERVING);
  EXPECT_TRUE(complete("k").ok());
  EXPECT_EQ(engine.submitted.load(), 1);

  server.begin_shutdown();
  EXPECT_EQ(health_of("starserve.v1.CompletionService"), HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(health_of(""), HealthCheckResponse::SERVING);
  expect_status(complete("k"), grpc::StatusCode::UNAVAILABLE, "shutting down");
  EXPECT_EQ(engine.submitted.load(), 1);
  server.shutdown(std::chrono::milliseconds(0));
  server.wait();
}

// ---- model info ----

// GetModelInfo names the tokenizer kind of the tokenizer the server holds: byte-level BPE for the tiny
// HF tokenizer, SentencePiece BPE for a SentencePiece one (tests/golden/tokenizer/families/sp_legacy).
TEST(GrpcServer, ModelInfoNamesTheTokenizerKind) {
  auto sp = Tokenizer::from_hf_json(std::string(STARSERVE_GOLDEN_DIR) + "/tokenizer/families/sp_legacy.tokenizer.json", "");
  ASSERT_TRUE(sp.ok()) << sp.status().to_string();
  struct Case {
    const Tokenizer* tokenizer;
    std::string kind;
  };
  for (const Case& c : {Case{&tiny(), "byte-level BPE"}, Case{&*sp, "SentencePiece BPE"}}) {
    InstantEngine engine;
    GrpcServer server(config_for("127.0.0.1"), engine, *c.tokenizer, std::nullopt);
    ASSERT_TRUE(server.start().ok());
    auto stub = v1::CompletionService::NewStub(
        grpc::CreateChannel(fmt::format("127.0.0.1:{}", server.port()), grpc::InsecureChannelCredentials()));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    v1::GetModelInfoResponse info;
    const grpc::Status st = stub->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &info);
    ASSERT_TRUE(st.ok()) << st.error_message();
    EXPECT_EQ(info.tokenizer(), c.kind);
    EXPECT_EQ(info.tokenizer(), c.tokenizer->kind());
    server.shutdown(std::chrono::milliseconds(0));
    server.wait();
  }
}

// ---- listen addresses ----

bool ipv6_loopback_available() {
  const int fd = socket(AF_INET6, SOCK_STREAM, 0);
  if (fd < 0) return false;
  sockaddr_in6 addr{};
  addr.sin6_family = AF_INET6;
  addr.sin6_addr = in6addr_loopback;
  const bool ok = bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  close(fd);
  return ok;
}

TEST(GrpcServer, ListensOnIpv4AndIpv6Hosts) {
  struct Case {
    std::string host;     // --host
    std::string connect;  // where a client reaches it
    bool ipv6;
  };
  const std::vector<Case> cases = {{"127.0.0.1", "127.0.0.1", false}, {"0.0.0.0", "127.0.0.1", false},
                                   {"localhost", "localhost", false}, {"::1", "[::1]", true},
                                   {"[::1]", "[::1]", true},           {"::", "[::1]", true}};
  const bool v6 = ipv6_loopback_available();
  for (const Case& c : cases) {
    if (c.ipv6 && !v6) {
      std::printf("no IPv6 loopback here: --host %s not tried\n", c.host.c_str());
      continue;
    }
    Served s;
    const Status started = s.start(config_for(c.host));
    ASSERT_TRUE(started.ok()) << c.host << ": " << started.to_string();
    auto stub = v1::CompletionService::NewStub(s.channel(c.connect));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    v1::GetModelInfoResponse info;
    const grpc::Status st = stub->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &info);
    EXPECT_TRUE(st.ok()) << c.host << " via " << c.connect << ": " << st.error_message();
    EXPECT_EQ(info.model(), "tiny");
  }
  // A port in --host is refused with what to do instead; so is text that is no address.
  for (const std::string host : {"127.0.0.1:50051", "[::1]:50051", "::1::2::3", ""}) {
    Served s;
    const Status started = s.start(config_for(host));
    EXPECT_EQ(started.code(), StatusCode::kInvalidArgument) << host << ": " << started.to_string();
  }
  if (!v6) GTEST_SKIP() << "IPv6 hosts not tried: this machine has no IPv6 loopback";
}

}  // namespace
}  // namespace starserve

#else  // unit_tests is not linked with starserve_server

TEST(GrpcServer, NeedsTheServerLibrary) {
  GTEST_SKIP() << "unit_tests is built without starserve_server (no gRPC, or tests/CMakeLists.txt does not link it)";
}

#endif
