// lorcserve worker: one tensor-parallel rank, serving lorcserve.internal.Worker.
#include <signal.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <iostream>
#include <optional>

#include "absl/strings/str_cat.h"
#include "cli/args.h"
#include "cli/commands.h"
#include "cli/security_flags.h"
#include "cli/session.h"
#include "cli/signals.h"
#include "common/status_macros.h"
#include "grpcpp/grpcpp.h"
#include "worker/worker_service.h"

namespace lorc::cli {

int RunWorker(int argc, char** argv) {
  std::vector<FlagSpec> flags = {
      {"listen", true, "address to serve on (port 0: pick one; printed as 'LISTENING host:port')", "ADDR"},
      {"backend", true, "cpu (default) or cuda", "KIND"},
      {"device", true, "CUDA device ordinal (default 0)", "K"},
      {"threads", true, "CPU backend: BLAS threads (default: all cores)", "N"},
      {"comm-address", true, "address peers reach this worker at for Gloo (default: the listen host)", "HOST"},
      {"rank-hint", true, "rank, for log messages only", "R"},
      {"parent-pid", true, "exit when this process (the supervising coordinator) is gone", "PID"},
      {"owner-lease-s", true,
       absl::StrCat("seconds the coordinator serving this worker may stay silent before another may "
                    "take it (default ", absl::FormatDuration(WorkerOptions().owner_lease), ")"),
       "S"},
      {"help", false, "show this help"},
  };
  for (const FlagSpec& f : InternalTlsFlags()) flags.insert(flags.end() - 1, f);  // before --help
  const char* synopsis = "--listen ADDR [--backend cpu|cuda] [--device K]";
  int exit_code = 0;
  const std::optional<Args> args = ParseCommand("worker", synopsis, flags, argc, argv, &exit_code);
  if (!args.has_value()) return exit_code;
  InstallTerminationHandlers();
  if (args->Has("parent-pid")) {
    // Started by a coordinator: die with it, even when it is killed outright.
    absl::StatusOr<int64_t> parent = args->GetInt("parent-pid", 0);
    if (!parent.ok()) return Fail("worker", parent.status());
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != static_cast<pid_t>(*parent)) return Fail("worker", absl::AbortedError("parent already gone"));
  }
  WorkerOptions wo;
  absl::StatusOr<BackendKind> kind = ParseBackendKind(args->Get("backend", "cpu"));
  absl::StatusOr<int32_t> device = args->GetInt32("device", 0, 0);
  absl::StatusOr<int32_t> threads = args->GetInt32("threads", 0, 0);
  absl::StatusOr<double> lease_s =
      args->GetDouble("owner-lease-s", absl::ToDoubleSeconds(wo.owner_lease));
  for (const absl::Status& s : {kind.status(), device.status(), threads.status(), lease_s.status()}) {
    if (!s.ok()) return Fail("worker", s);
  }
  if (!(*lease_s > 0)) {
    return Fail("worker", absl::InvalidArgumentError(
                              absl::StrCat("--owner-lease-s must be > 0 seconds, got ", *lease_s)));
  }
  wo.owner_lease = absl::Seconds(*lease_s);
  wo.backend.kind = *kind;
  wo.backend.device = static_cast<int>(*device);
  wo.backend.threads = static_cast<int>(*threads);
  const absl::StatusOr<std::string> listen_or = args->GetListenAddress("listen", "127.0.0.1:0");
  if (!listen_or.ok()) return Fail("worker", listen_or.status());
  const std::string& listen = *listen_or;
  const std::string host = listen.substr(0, listen.rfind(':'));
  wo.comm_address = args->Get("comm-address", host == "0.0.0.0" || host.empty() ? "" : host);

  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> creds =
      security::InternalServerCredentials(ParseInternalTls(*args));
  if (!creds.ok()) return Fail("worker", creds.status());
  WorkerService service(wo);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(listen, *creds, &port);
  builder.SetMaxReceiveMessageSize(256 << 20);
  builder.SetMaxSendMessageSize(256 << 20);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    return Fail("worker", absl::UnavailableError(absl::StrCat("cannot listen on ", listen)));
  }
  std::cout << "LISTENING " << host << ":" << port << std::endl;
  std::cerr << "lorcserve worker " << args->Get("rank-hint", "?") << ": serving on " << host << ":"
            << port << " (" << args->Get("backend", "cpu") << ")\n";
  {
    // Joined before `server` is destroyed (it was detached, racing the destructor).
    TerminationSignalWatcher signals([s = server.get()](int) {
      s->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
    });
    server->Wait();
  }
  return 0;
}

}  // namespace lorc::cli
