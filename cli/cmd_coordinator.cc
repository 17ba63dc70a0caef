// lorcserve coordinator: the gRPC server in front of N tensor-parallel workers.
#include <signal.h>

#include <iostream>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "cli/args.h"
#include "cli/commands.h"
#include "cli/security_flags.h"
#include "common/defaults.h"
#include "cli/session.h"
#include "cli/signals.h"
#include "common/status_macros.h"
#include "coordinator/coordinator_server.h"

namespace lorc::cli {
namespace {

absl::StatusOr<CoordinatorOptions> ParseOptions(const Args& args) {
  CoordinatorOptions o;
  ASSIGN_OR_RETURN(o.model, ParseModelSource(args));
  ASSIGN_OR_RETURN(o.kv, ParseKvCacheOptions(args));
  ASSIGN_OR_RETURN(o.listen, args.GetListenAddress("listen", "127.0.0.1:50051"));
  o.advertise_address = args.Get("advertise-address");
  if (args.Has("workers") == args.Has("local-workers")) {
    return absl::InvalidArgumentError("give exactly one of --workers and --local-workers");
  }
  if (args.Has("workers")) {
    o.worker_addresses = absl::StrSplit(args.Get("workers"), ',', absl::SkipWhitespace());
    if (o.worker_addresses.empty()) return absl::InvalidArgumentError("--workers: no addresses");
  } else {
    ASSIGN_OR_RETURN(o.local_workers.count, args.GetInt32("local-workers", 1, 1, 64));
    o.local_workers.backend = args.Get("backend", "cpu");
    ASSIGN_OR_RETURN(o.local_workers.threads_per_worker, args.GetInt32("threads", 0, 0));
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
  ASSIGN_OR_RETURN(int64_t drain_s,
                   args.GetIntInRange("drain-timeout-s", defaults::kDrainTimeoutS, 0, 86400));
  o.drain_timeout = absl::Seconds(drain_s);
  ASSIGN_OR_RETURN(ServerSecurity security, ParseServerSecurity(args));
  o.tls = security.tls;
  o.auth = security.auth;
  o.internal_tls = ParseInternalTls(args);
  o.local_workers.extra_args = InternalTlsArgs(o.internal_tls);
  return o;
}

}  // namespace

int RunCoordinator(int argc, char** argv) {
  std::vector<FlagSpec> flags = {
      {"model", true, "model directory (config.json, tokenizer.json; workers read the weights)", "DIR"},
      {"listen", true, "address to serve the API on (default 127.0.0.1:50051; port 0: pick one)", "ADDR"},
      {"workers", true, "worker addresses in rank order (started with 'lorcserve worker')", "A,B,..."},
      {"local-workers", true, "start and supervise N worker processes on this machine", "N"},
      {"backend", true, "local workers' backend: cpu (default) or cuda", "KIND"},
      {"threads", true, "local CPU workers: BLAS threads each (default: cores / N)", "N"},
      {"advertise-address", true, "how workers reach this server (default: from --listen)", "HOST:PORT"},
      {"random-weights", false, "workers use seeded random weights of config.json's shape"},
      {"weights-seed", true, "seed for --random-weights", "S"},
      {"lm-head", true, "split | replicated: the LM head under tensor parallelism (default: split on GPUs, and on CPUs from 4 workers; measured, docs/PERFORMANCE.md)", "HOW"},
      {"step-transport", true, "stream (default) or unary step RPCs", "KIND"},
      DisableCustomAllReduceFlag(),
      {"join-timeout-s", true, "seconds the ranks have to join the communicator (default 60)", "S"},
      {"max-restarts", true,
       absl::StrCat("worker-failure recoveries allowed within ",
                    absl::FormatDuration(CoordinatorOptions{}.restart_window),
                    " before staying NOT_SERVING (0: none; default ",
                    CoordinatorOptions{}.max_restarts, ")"),
       "K"},
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
  const char* synopsis = "--model DIR --listen ADDR (--workers A,B | --local-workers N) [flags]";
  int exit_code = 0;
  const std::optional<Args> args =
      ParseCommand("coordinator", synopsis, flags, argc, argv, &exit_code);
  if (!args.has_value()) return exit_code;
  absl::StatusOr<CoordinatorOptions> options = ParseOptions(*args);
  if (!options.ok()) return Fail("coordinator", options.status());
  InstallTerminationHandlers();
  absl::StatusOr<std::unique_ptr<CoordinatorServer>> server = CoordinatorServer::Start(*options);
  if (!server.ok()) return Fail("coordinator", server.status());
  std::cout << "LISTENING " << (*server)->address() << std::endl;
  std::cerr << "lorcserve coordinator: serving " << options->model.dir << " on " << (*server)->address()
            << "\n";
  {
    // Joined (destroyed) before the server goes: the callback never sees a destroyed server.
    // SIGTERM: a graceful drain (FinishDrain); SIGINT, or any signal during the drain: now.
    TerminationSignalWatcher signals(
        [s = server->get()](int sig) {
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
    (*server)->Wait();
    if ((*server)->draining()) {
      const int64_t aborted = (*server)->FinishDrain();
      std::cerr << "lorcserve coordinator: drained"
                << (aborted > 0 ? absl::StrCat(", ", aborted, " requests aborted") : "")
                << "; shutting down\n";
    }
  }
  (*server)->Shutdown();
  server->reset();
  return 0;
}

}  // namespace lorc::cli
