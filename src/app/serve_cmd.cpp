// `starserve serve`: the server. Rank 0: gRPC threads + the scheduler loop on the main thread
// (the only thread that calls MPI). Other ranks: the worker loop.
#include <csignal>
#include <thread>

#include "common/log.h"

#include "app/commands.h"
#include "app/runtime.h"
#include "engine/serving_engine.h"

#ifdef STARSERVE_HAVE_GRPC
#include "server/grpc_server.h"
#endif

namespace starserve {

namespace {
std::atomic<bool> g_stop{false};
extern "C" void on_signal(int) { g_stop = true; }
}  // namespace

int run_serve(const CommandLine& cl, int* argc, char*** argv) {
#ifndef STARSERVE_HAVE_GRPC
  (void)cl;
  (void)argc;
  (void)argv;
  std::fprintf(stderr, "error: this build has no gRPC (install libgrpc++-dev and protobuf-compiler-grpc)\n");
  return 1;
#else
  auto comm = start_communicator(argc, argv);
  if (!comm.ok()) {
    std::fprintf(stderr, "error: %s\n", comm.status().to_string().c_str());
    return 1;
  }
  Runtime rt;
  rt.comm = std::move(comm).value();
  Status st = start_runtime(cl.config, rt);
  if (!st.ok()) {
    log_error("{}", st.to_string());
    return 1;
  }
  const EngineContext ctx = engine_context(cl.config, rt);
  if (rt.comm->rank() != 0) {
    st = run_worker(ctx);
    if (!st.ok()) log_error("worker stopped: {}", st.to_string());
    return st.ok() ? 0 : 1;
  }

  std::optional<ChatTemplate> tmpl;
  auto t = cl.config.model.chat_template.empty() ? ChatTemplate::detect(rt.files.tokenizer->chat_template())
                                                 : ChatTemplate::builtin(cl.config.model.chat_template);
  if (t.ok()) {
    tmpl = std::move(t).value();
  } else if (!cl.config.model.chat_template.empty()) {
    log_error("{}", t.status().to_string());
    return 1;
  } else {
    log_warn("chat RPCs disabled: {}", t.status().to_string());
  }
  ServerConfig server_cfg = cl.config.server;
  if (server_cfg.max_prompt_tokens == 0) server_cfg.max_prompt_tokens = rt.max_context;
  ServingEngine engine(ctx);
  GrpcServer server(server_cfg, engine, *rt.files.tokenizer, std::move(tmpl));
  st = server.start();
  if (!st.ok()) {
    log_error("{}", st.to_string());
    // Workers wait for steps: end them cleanly.
    engine.stop();
    (void)engine.run();
    return 1;
  }
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  log_info("serving on {}:{} ({} ranks){}", server_cfg.host, server.port(), rt.comm->world_size(),
               server.metrics_port() ? fmt::format(", metrics on :{}", server.metrics_port()) : "");
  std::thread watcher([&] {
    while (!g_stop) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    log_info("shutting down");
    server.shutdown(std::chrono::seconds(5));
    engine.stop();
  });
  st = engine.run();
  g_stop = true;
  watcher.join();
  server.wait();
  if (!st.ok()) {
    log_error("engine stopped: {}", st.to_string());
    rt.comm->abort_job(1);  // a rank is gone: end the job rather than hang
    return 1;
  }
  return 0;
#endif
}

}  // namespace starserve
