// `starserve serve`: the server.
// Rank 0: the gRPC server starts first (health answers while the model loads), then the model loads, the engine is
// attached and the scheduler loop runs on the main thread. Other ranks: load, then the worker loop.
// Every rank runs a heartbeat thread; rank 0's watchdog fails the requests and ends the job when a rank goes
// silent (--watchdog-timeout). SIGTERM/SIGINT on rank 0 drains (--shutdown-grace); the other ranks ignore both
// and wait for rank 0's STOP (mpirun and container runtimes send them to every rank).
#include <csignal>
#include <thread>

#include "common/log.h"

#include "app/commands.h"
#include "app/runtime.h"
#include "engine/serving_engine.h"
#include "engine/watchdog.h"

#ifdef STARSERVE_HAVE_GRPC
#include "server/grpc_server.h"
#endif

namespace starserve {

namespace {
std::atomic<bool> g_stop{false};
extern "C" void on_signal(int) { g_stop = true; }

// The exit code of a job ended by the watchdog.
constexpr int kWatchdogExitCode = 3;
// How long the requests failed by the watchdog get for their statuses to reach the clients before the job ends.
constexpr auto kFailureDelivery = std::chrono::seconds(2);
// After the engine stopped: how long the RPCs get to write their last responses.
constexpr auto kFinalWrites = std::chrono::seconds(5);

std::chrono::milliseconds to_ms(double seconds) {
  return std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000.0));
}
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
  const int rank = rt.comm->rank();
  if (rank == 0) {
    std::signal(SIGINT, on_signal);
    std::signal(SIGTERM, on_signal);
  } else {
    std::signal(SIGINT, SIG_IGN);
    std::signal(SIGTERM, SIG_IGN);
  }
  Status st = start_logging(cl.config, rt);
  if (!st.ok()) {
    std::fprintf(stderr, "error: %s\n", st.to_string().c_str());
    return 1;
  }
  const ServerConfig& server_cfg = cl.config.server;
  const double timeout_s = server_cfg.watchdog_timeout_s;
  if (timeout_s > 0 && timeout_s < 2) {
    if (rank == 0) log_error("watchdog_timeout = {} s: at least 2 s (two heartbeats) or 0 (off)", timeout_s);
    return 1;
  }

  // Heartbeats from before the model loads, so that a rank that stops during the load is noticed too.
  std::unique_ptr<Heartbeat> heartbeat;
  if (timeout_s > 0 && rt.comm->world_size() > 1) {
    auto hb = rt.comm->start_heartbeat(std::chrono::seconds(1));
    if (hb.ok()) {
      heartbeat = std::move(hb).value();
    } else if (rank == 0) {
      log_warn("watchdog off: {}", hb.status().to_string());
    }
  }

  if (rank != 0) {
    st = load_runtime(cl.config, rt);
    if (!st.ok()) {
      log_error("{}", st.to_string());
      return 1;
    }
    EngineContext ctx = engine_context(cl.config, rt);
    ctx.heartbeat = heartbeat.get();
    // A stopped rank 0 cannot end the job itself; the first worker to notice does.
    std::unique_ptr<Watchdog> root_watchdog;
    if (heartbeat) {
      root_watchdog = std::make_unique<Watchdog>(*heartbeat, timeout_s, [&](const Status& why) {
        log_error("ending the job (exit code {}): {}", kWatchdogExitCode, why.message());
        rt.comm->abort_job(kWatchdogExitCode);
      });
    }
    st = run_worker(ctx);
    if (!st.ok()) log_error("worker stopped: {}", st.to_string());
    return st.ok() ? 0 : 1;
  }

  // Rank 0: health and the key check answer from here on; completion RPCs wait for attach().
  GrpcServer server(server_cfg);
  Status started = server.start();
  if (!started.ok()) log_error("{}", started.to_string());

  std::atomic<ServingEngine*> engine_ptr{nullptr};
  std::unique_ptr<Watchdog> watchdog;
  if (heartbeat) {
    watchdog = std::make_unique<Watchdog>(
        *heartbeat, timeout_s,
        [&] {
          ServingEngine* e = engine_ptr.load();
          return e ? e->step_state() : StepState{};
        },
        [&](const Status& why) {
          if (ServingEngine* e = engine_ptr.load()) e->fail_all(why);
          server.set_unavailable();
          std::this_thread::sleep_for(kFailureDelivery);
          log_error("ending the job (exit code {}): a rank stopped answering or failed a step", kWatchdogExitCode);
          rt.comm->abort_job(kWatchdogExitCode);
        });
    log_info("watchdog on: a rank silent for {} s ends the job", timeout_s);
  }

  st = load_runtime(cl.config, rt);
  if (!st.ok()) {
    log_error("{}", st.to_string());
    // The other ranks may wait for the engine's first barrier: end them.
    rt.comm->abort_job(1);
    return 1;
  }
  const EngineContext ctx = engine_context(cl.config, rt);
  std::optional<ChatTemplate> tmpl;
  auto t = select_chat_template(cl.config.model.chat_template_file, cl.config.model.chat_template,
                                cl.config.model.path, *rt.files.tokenizer);
  if (t.ok()) {
    tmpl = std::move(t).value();
  } else if (!cl.config.model.chat_template.empty() || !cl.config.model.chat_template_file.empty()) {
    log_error("{}", t.status().to_string());
    started = t.status();
  } else {
    log_warn("chat RPCs disabled: {}", t.status().to_string());
  }
  ServingEngine engine(ctx);
  engine_ptr = &engine;
  if (started.ok()) {
    started = server.attach(engine, *rt.files.tokenizer, std::move(tmpl));
    if (!started.ok()) log_error("{}", started.to_string());
  }
  if (!started.ok()) {
    // Workers wait for steps: end them cleanly.
    engine.stop();
    (void)engine.run();
    watchdog.reset();
    return 1;
  }
  log_info("model loaded; serving on {}:{} ({} ranks)", server_cfg.host, server.port(), rt.comm->world_size());

  std::atomic<bool> engine_done{false};
  std::thread watcher([&] {
    while (!g_stop && !engine_done) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    if (engine_done) return;
    log_info("signal received: draining ({} s for running requests, then they end as cancelled)",
             server_cfg.shutdown_grace_s);
    server.begin_shutdown();
    engine.drain(to_ms(server_cfg.shutdown_grace_s));
  });
  st = engine.run();
  engine_done = true;
  watcher.join();
  watchdog.reset();
  engine_ptr = nullptr;
  server.shutdown(kFinalWrites);
  server.wait();
  if (!st.ok()) {
    log_error("engine stopped: {}", st.to_string());
    rt.comm->abort_job(1);  // a rank is gone: end the job rather than hang
    return 1;
  }
  log_info("stopped");
  return 0;
#endif
}

}  // namespace starserve
