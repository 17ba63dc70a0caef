// lorcserve coordinator: the gRPC server in front of N tensor-parallel workers.
#include <cstdlib>
#include <signal.h>

#include <atomic>
#include <filesystem>
#include <iostream>
#include <optional>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "cli/args.h"
#include "cli/commands.h"
#include "cli/security_flags.h"
#include "common/defaults.h"
#include "cli/session.h"
#include "cli/process_memory.h"
#include "cli/signals.h"
#include "common/defaults.h"
#include "common/status_macros.h"
#include "coordinator/coordinator_server.h"
#include "metrics/metrics_exposer.h"

namespace lorc::cli {
namespace {

absl::StatusOr<CoordinatorOptions> ParseOptions(const Args& args) {
  CoordinatorOptions o;
  ASSIGN_OR_RETURN(o.model, ParseModelSource(args));
  // Absolute (against this process's working directory) and normalized, without a trailing '/':
  // ModelInfo reports it to clients (the gateway reads the tokenizer and the chat template
  // there, from its own working directory), and the workers load it (local ones share our
  // working directory; remote ones see the same path).
  if (!o.model.dir.empty()) {
    std::error_code ec;
    std::filesystem::path dir = std::filesystem::absolute(o.model.dir, ec).lexically_normal();
    if (!ec) {
      if (dir.has_relative_path() && dir.filename().empty()) dir = dir.parent_path();
      o.model.dir = dir.string();
    }
  }
  ASSIGN_OR_RETURN(o.kv, ParseKvCacheOptions(args));
  ASSIGN_OR_RETURN(o.listen, args.GetListenAddress("listen", "127.0.0.1:50051"));
  if (args.Has("internal-listen")) {
    ASSIGN_OR_RETURN(o.internal_listen, args.GetListenAddress("internal-listen", ""));
  }
  o.advertise_address = args.Get("advertise-address");
  if (args.Has("advertise-address")) {
    // HOST:PORT, as the worker's flag: the workers dial it as given.
    const size_t colon = o.advertise_address.rfind(':');
    int port = 0;
    const std::string host = colon == std::string::npos ? "" : o.advertise_address.substr(0, colon);
    const bool bracketed = host.size() > 2 && host.front() == '[' && host.back() == ']';
    if (host.empty() || (!bracketed && host.find_first_of(":[]") != std::string::npos) ||
        !absl::SimpleAtoi(o.advertise_address.substr(colon + 1), &port) || port < 1 || port > 65535) {
      return absl::InvalidArgumentError(
          absl::StrCat("--advertise-address: '", o.advertise_address,
                       "' is not HOST:PORT (port 1-65535; an IPv6 host in brackets)"));
    }
  }
  if (args.Has("tensor-parallel-size")) {
    ASSIGN_OR_RETURN(o.tensor_parallel_size, args.GetInt32("tensor-parallel-size", 1, 1, 1024));
  }
  if (args.Has("workers") && args.Has("local-workers")) {
    return absl::InvalidArgumentError("give at most one of --workers and --local-workers");
  }
  if (args.Has("workers")) {
    ASSIGN_OR_RETURN(o.worker_addresses, args.GetAddressList("workers"));
  } else {
    o.local_workers.count = 0;
    if (args.Has("local-workers")) {
      ASSIGN_OR_RETURN(o.local_workers.count, args.GetInt32("local-workers", 1, 1, 64));
    }
    o.local_workers.backend = args.Get("backend", "cpu");
    ASSIGN_OR_RETURN(o.local_workers.threads_per_worker, ParseThreads(args));
    if (!args.Has("tensor-parallel-size") && std::getenv("LWS_GROUP_SIZE") != nullptr) {
      // The LeaderWorkerSet leader: as many local workers on each pod as here.
      int64_t pods = 0;
      if (!absl::SimpleAtoi(std::getenv("LWS_GROUP_SIZE"), &pods) || pods < 1 || pods > 1024) {
        return absl::InvalidArgumentError(absl::StrCat("LWS_GROUP_SIZE: '", std::getenv("LWS_GROUP_SIZE"),
                                                       "' is not an integer in [1, 1024]"));
      }
      if (o.local_workers.count == 0) {
        return absl::InvalidArgumentError(
            "LWS_GROUP_SIZE is set but --local-workers is not: give --tensor-parallel-size (the leader "
            "runs no worker) or --local-workers N (N per pod)");
      }
      o.tensor_parallel_size = static_cast<int32_t>(pods) * o.local_workers.count;
    }
    if (o.local_workers.count == 0 && o.tensor_parallel_size == 0) {
      return absl::InvalidArgumentError(
          "no workers: give --workers A,B,..., --local-workers N or --tensor-parallel-size N (workers join)");
    }
  }
  RETURN_IF_ERROR(ParseBackendKind(args.Get("backend", "cpu")).status());
  ASSIGN_OR_RETURN(o.engine, ParseEngineOptions(args));
  const std::string transport = args.Get("step-transport", "stream");
  if (transport != "stream" && transport != "unary") {
    return absl::InvalidArgumentError("--step-transport must be stream or unary");
  }
  o.step_stream = transport == "stream";
  ASSIGN_OR_RETURN(int64_t join_s, args.GetIntInRange("join-timeout-s", 60, 1, 86400));
  o.join_timeout = absl::Seconds(join_s);
  ASSIGN_OR_RETURN(o.max_restarts, args.GetInt32("max-restarts", o.max_restarts, 0, 1000));
  o.disable_custom_all_reduce = args.Has("disable-custom-all-reduce");
  ASSIGN_OR_RETURN(o.log_format, ParseLogFormat(args.Get("log-format", "text")));
  ASSIGN_OR_RETURN(int64_t drain_s,
                   args.GetIntInRange("drain-timeout-s", defaults::kDrainTimeoutS, 0, 86400));
  o.drain_timeout = absl::Seconds(drain_s);
  ASSIGN_OR_RETURN(ServerSecurity security, ParseServerSecurity(args));
  o.tls = security.tls;
  o.auth = security.auth;
  o.internal_tls = ParseInternalTls(args);
  o.local_workers.extra_args = [a = InternalTlsArgs(o.internal_tls)](int) { return a; };
  return o;
}

}  // namespace

int RunCoordinator(int argc, char** argv) {
  std::vector<FlagSpec> flags = {
      {"model", true,
       "model directory (config.json, tokenizer.json; workers read the weights); made absolute "
       "against the working directory (ModelInfo reports that path)",
       "DIR"},
      {"listen", true, "address to serve the API on (default 127.0.0.1:50051; port 0: pick one)", "ADDR"},
      {"workers", true, "worker addresses in rank order (started with 'lorcserve worker')", "A,B,..."},
      {"local-workers", true, "start and supervise N worker processes on this machine (ranks 0..N-1)", "N"},
      {"tensor-parallel-size", true,
       "total ranks; those beyond --local-workers join with 'lorcserve worker --join' (default: "
       "--workers' count, --local-workers, or LWS_GROUP_SIZE x --local-workers)",
       "N"},
      {"internal-listen", true,
       absl::StrCat("address of the internal services (rendezvous, worker join; default: the --listen host, port ",
                    defaults::kInternalPort, ", or 0 when --listen's port is 0)"),
       "ADDR"},
      {"backend", true, "local workers' backend: cpu (default) or cuda", "KIND"},
      {"threads", true, "local CPU workers: BLAS threads each, at least 1 (default: cores / N)", "N"},
      {"advertise-address", true, "how listed and local workers reach the internal port (default: from --internal-listen)", "HOST:PORT"},
      {"random-weights", false, "workers use seeded random weights of config.json's shape"},
      {"weights-seed", true, "seed for --random-weights", "S"},
      {"lm-head", true, "split | replicated: the LM head under tensor parallelism (default: split on GPUs, and on CPUs from 4 workers; measured, docs/PERFORMANCE.md)", "HOW"},
      {"step-transport", true, "stream (default) or unary step RPCs", "KIND"},
      DisableCustomAllReduceFlag(),
      {"join-timeout-s", true,
       "seconds the workers have to be reachable (--workers) and the ranks to join the communicator; with joining workers, the missing ranks are "
       "reported after this long (and again every S seconds) while the coordinator keeps waiting (default 60)",
       "S"},
      {"max-restarts", true,
       absl::StrCat("worker-failure recoveries allowed within ",
                    absl::FormatDuration(CoordinatorOptions{}.restart_window),
                    " before staying NOT_SERVING (0: none; default ",
                    CoordinatorOptions{}.max_restarts, ")"),
       "K"},
      {"metrics-port", true, "serve Prometheus metrics on --metrics-host:PORT/metrics (default: off; 0: pick one)", "PORT"},
      {"metrics-host", true,
       absl::StrCat("address the metrics endpoint binds, with --metrics-port (default ", defaults::kMetricsHost,
                    ": all interfaces; 127.0.0.1: this machine only; plaintext, no token)"),
       "HOST"},
      {"log-format", true, "request and worker-event log lines on stderr: text (default) or json", "FMT"},
      {"drain-timeout-s", true,
       absl::StrCat("on SIGTERM: NOT_SERVING at once, new requests UNAVAILABLE, in-flight ones get S "
                    "seconds to finish before they are aborted (default ", defaults::kDrainTimeoutS,
                    "; a second signal aborts at once)"),
       "S"},
      {"help", false, "show this help"},
  };
  for (std::vector<FlagSpec> group :
       {KvCacheFlags(), SchedulerFlags(), ServerSecurityFlags(), InternalTlsFlags()}) {
    flags.insert(flags.end() - 1, group.begin(), group.end());  // before --help
  }
  const char* synopsis =
      "--model DIR [--listen ADDR] (--workers A,B | --local-workers N | --tensor-parallel-size N [--local-workers K]) [flags]";
  int exit_code = 0;
  const std::optional<Args> args =
      ParseCommand("coordinator", synopsis, flags, argc, argv, &exit_code);
  if (!args.has_value()) return exit_code;
  LimitMallocArenas();  // before any thread (process_memory.h)
  InstallTerminationHandlers();  // before any thread (the metrics endpoint's, the server's)
  UseFixedMmapThreshold();  // before the engine and its buffers (process_memory.h)
  absl::StatusOr<CoordinatorOptions> options = ParseOptions(*args);
  if (!options.ok()) return Fail("coordinator", options.status());
  // The metrics endpoint comes up first (a busy port fails fast; scrapes see the load).
  std::unique_ptr<MetricsExposer> metrics_exposer;
  if (args->Has("metrics-host") && !args->Has("metrics-port")) {
    return Fail("coordinator", absl::InvalidArgumentError(
                                   "--metrics-host needs --metrics-port (the endpoint is off without it)"));
  }
  if (args->Has("metrics-port")) {
    absl::StatusOr<int64_t> port = args->GetIntInRange("metrics-port", 0, 0, 65535);
    if (!port.ok()) return Fail("coordinator", port.status());
    options->metrics = std::make_shared<ServingMetrics>();
    absl::StatusOr<std::unique_ptr<MetricsExposer>> e =
        MetricsExposer::Start(args->Get("metrics-host", defaults::kMetricsHost), static_cast<int>(*port),
                              options->metrics->registry());
    if (!e.ok()) return Fail("coordinator", e.status());
    metrics_exposer = *std::move(e);
  }
  absl::StatusOr<std::unique_ptr<CoordinatorServer>> server = CoordinatorServer::Create(*options);
  if (!server.ok()) return Fail("coordinator", server.status());
  {
    // Watching from before the load (Start blocks through it: minutes for a large model, more
    // than Kubernetes' 30 s grace): a signal then ends Start and the process, exit 0. Joined
    // (destroyed) before the server goes: the callback never sees a destroyed server. Once
    // serving: SIGTERM drains (FinishDrain); SIGINT, or any signal during the drain: now.
    std::atomic<bool> started{false};
    std::atomic<bool> stopped_while_loading{false};
    TerminationSignalWatcher signals(
        [s = server->get(), &started, &stopped_while_loading](int sig) {
          if (!started.load()) {
            std::cerr << "lorcserve coordinator: " << TerminationSignalName(sig)
                      << " during the model load: stopping\n";
            stopped_while_loading = true;
            s->RequestShutdown();
            return;
          }
          if (sig == SIGTERM && !s->draining()) {
            std::cerr << "lorcserve coordinator: SIGTERM, draining (NOT_SERVING; new requests "
                         "UNAVAILABLE)\n";
            s->RequestDrain();
            return;
          }
          std::cerr << "lorcserve coordinator: signal " << sig << ", shutting down\n";
          s->RequestShutdown();
        },
        /*every_signal=*/true);
    const absl::Status start = (*server)->Start();
    started = true;
    if (!start.ok()) {
      if (stopped_while_loading.load()) {
        // Whatever the load ended with (CANCELLED, or a worker that took the same Ctrl-C).
        std::cerr << "lorcserve coordinator: stopped before serving ("
                  << absl::StatusCodeToString(start.code()) << ": " << start.message() << ")\n";
      } else {
        exit_code = Fail("coordinator", start);
      }
    } else {
      std::cout << "LISTENING " << (*server)->address() << "\nINTERNAL_LISTENING "
                << (*server)->internal_address() << std::endl;
      if (metrics_exposer != nullptr) {
        std::cout << "METRICS_LISTENING " << metrics_exposer->address() << std::endl;
      }
      std::cerr << "lorcserve coordinator: serving " << options->model.dir << " on "
                << (*server)->address()
                << (options->kv.kv_policy.enabled() ? ", kv policy " + options->kv.kv_policy.Describe() : "")
                << "\n";
      if (options->kv.kv_policy.enabled() && options->engine.enable_prefix_caching) {
        // A tester sent one prompt three times under MiKV and saw 0 cached tokens each time.
        std::cerr << "lorcserve coordinator: with --kv-policy, a request's prompt blocks leave the prefix "
                     "cache at its first compaction: a later request with the same prompt recomputes it; "
                     "sessions (session_id) and requests running at the same time share it "
                     "(kvpolicy/README.md \"Compaction\")\n";
      }
      (*server)->Wait();
      if ((*server)->draining()) {
        const int64_t aborted = (*server)->FinishDrain();
        std::cerr << "lorcserve coordinator: drained"
                  << (aborted > 0 ? absl::StrCat(", ", aborted, aborted == 1 ? " request" : " requests", " aborted")
                                  : "")
                  << "; shutting down\n";
      }
    }
  }
  (*server)->Shutdown();  // ends and reaps the local workers
  server->reset();
  return exit_code;
}

}  // namespace lorc::cli
